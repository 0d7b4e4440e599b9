// Decode attention over the paged KV cache, and the cache write (kernels.h lists the files).
//
// Legend: B decode sequences, g KV heads, r query heads per KV head, d head dim, S cache slots,
// nb block-table width, L_b the context length of sequence b.

#include "kernels.h"

namespace {

// Ask for the next block of one head before its rows are needed: blocks sit at random places in
// the cache, so the hardware prefetcher (which stops at page boundaries) does not see them coming.
inline void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
#endif
}

// Calls row(l, K or V row) for positions l = 0..L-1 of one sequence in one KV head's slot array,
// through the sequence's block table, asking for each next block while the current one is read.
template <typename T, typename Row>
inline void for_each_cached_row(const T* head, const int64_t* table, int64_t L, int64_t block_size, int64_t d,
                                Row&& row) {
  for (int64_t l0 = 0; l0 < L; l0 += block_size) {
    const T* block = head + table[l0 / block_size] * block_size * d;
    if (l0 + block_size < L)
      prefetch_bytes(head + table[l0 / block_size + 1] * block_size * d, block_size * d * int64_t(sizeof(T)));
    const int64_t n = std::min(block_size, L - l0);
    for (int64_t s = 0; s < n; ++s) row(l0 + s, block + s * d);
  }
}

#ifdef __AVX512F__
// 16 cached values widened to float32 (bfloat16: the bits shifted into a float's high half).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// The four sums of a0..a3 as the four lanes of one register: a transpose-and-add tree, 13
// instructions where four separate reductions take ~30.
inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

// s[j, l] = q_j · K_l · scale for the r queries of one (sequence, KV head) and its L cached rows
// (s has L columns). NC = d / 16 registers a row with AVX-512: each K row is read once, its scores
// four queries at a time; NC = 0 is the scalar loop (vectorised by the compiler within a row).
template <int NC, typename T>
inline void head_scores(const float* q, int64_t r, int64_t d, const T* kh, const int64_t* table, int64_t L,
                        int64_t block_size, float sc, float* s) {
  if constexpr (NC == 0) {
    for_each_cached_row(kh, table, L, block_size, d, [&](int64_t l, const T* __restrict__ kr) {
      for (int64_t j = 0; j < r; ++j) {
        const float* __restrict__ qj = q + j * d;
        float acc = 0.f;
        for (int64_t t = 0; t < d; ++t) acc += qj[t] * static_cast<float>(kr[t]);
        s[j * L + l] = acc * sc;
      }
    });
  } else {
#ifdef __AVX512F__
    for_each_cached_row(kh, table, L, block_size, d, [&](int64_t l, const T* __restrict__ kr) {
      __m512 k[NC];
      for (int c = 0; c < NC; ++c) k[c] = load16(kr + 16 * c);
      auto dot = [&](int64_t j) {
        const float* qj = q + j * d;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qj), k[0]);
        for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 16 * c), k[c], a);
        return a;
      };
      int64_t j = 0;
      for (; j + 4 <= r; j += 4) {
        alignas(16) float four[4];
        _mm_store_ps(four, _mm_mul_ps(sum4(dot(j), dot(j + 1), dot(j + 2), dot(j + 3)), _mm_set1_ps(sc)));
        for (int u = 0; u < 4; ++u) s[(j + u) * L + l] = four[u];
      }
      for (; j < r; ++j) s[j * L + l] = _mm512_reduce_add_ps(dot(j)) * sc;
    });
#endif
  }
}

// Each row of s [r, L] replaced by its softmax (float32).
inline void softmax_rows(float* s, int64_t r, int64_t L) {
  for (int64_t j = 0; j < r; ++j) {
    float* row = s + j * L;
    int64_t l = 0;
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
#ifdef __AVX512F__
    __m512 m16 = _mm512_set1_ps(mx);
    for (; l + 16 <= L; l += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(row + l));
    mx = _mm512_reduce_max_ps(m16);
#endif
    for (; l < L; ++l) mx = std::max(mx, row[l]);
    l = 0;
#ifdef __AVX512F__
    __m512 s16 = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(mx);
    for (; l + 16 <= L; l += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + l), mv));
      _mm512_storeu_ps(row + l, e);
      s16 = _mm512_add_ps(s16, e);
    }
    sum = _mm512_reduce_add_ps(s16);
#endif
    for (; l < L; ++l) {
      row[l] = std::exp(row[l] - mx);
      sum += row[l];
    }
    const float inv = 1.f / sum;
    for (l = 0; l < L; ++l) row[l] *= inv;
  }
}

// o[j] = Σ_l p[j, l] · V_l for the r queries of one (sequence, KV head). With AVX-512 each V row is
// read once into the sums of as many queries as the registers hold (16 / NC at a time).
template <int NC, typename T>
inline void head_values(const float* p, int64_t r, int64_t d, const T* vh, const int64_t* table, int64_t L,
                        int64_t block_size, float* o) {
  if constexpr (NC == 0) {
    std::fill(o, o + r * d, 0.f);
    for_each_cached_row(vh, table, L, block_size, d, [&](int64_t l, const T* __restrict__ vr) {
      for (int64_t j = 0; j < r; ++j) {
        const float pj = p[j * L + l];
        float* __restrict__ oj = o + j * d;
        for (int64_t t = 0; t < d; ++t) oj[t] += pj * static_cast<float>(vr[t]);
      }
    });
  } else {
#ifdef __AVX512F__
    constexpr int G = NC >= 16 ? 1 : 16 / NC;
    for (int64_t j0 = 0; j0 < r; j0 += G) {
      const int64_t n = std::min<int64_t>(G, r - j0);
      __m512 acc[G][NC];
      for (int u = 0; u < G; ++u)
        for (int c = 0; c < NC; ++c) acc[u][c] = _mm512_setzero_ps();
      for_each_cached_row(vh, table, L, block_size, d, [&](int64_t l, const T* __restrict__ vr) {
        __m512 v[NC];
        for (int c = 0; c < NC; ++c) v[c] = load16(vr + 16 * c);
        for (int u = 0; u < G && u < n; ++u) {
          const __m512 pu = _mm512_set1_ps(p[(j0 + u) * L + l]);
          for (int c = 0; c < NC; ++c) acc[u][c] = _mm512_fmadd_ps(pu, v[c], acc[u][c]);
        }
      });
      for (int u = 0; u < n; ++u)
        for (int c = 0; c < NC; ++c) _mm512_storeu_ps(o + (j0 + u) * d + 16 * c, acc[u][c]);
    }
#endif
  }
}

// The decode attention itself, over a cache of T (float or bfloat16: each cached value is widened
// to float as it is read; q and out in T as well, widened and rounded a head at a time), sums and
// softmax in float32: for each (sequence, KV head), split over torch's threads, its scores, their
// softmax and the weighted sum of its V rows, back to back while that head's rows are still in
// cache. NC: see head_scores. Steps with few cached rows in all (batch 1, short contexts) run on the
// calling thread: a parallel region costs more than the work.
template <int NC, typename T>
void paged_decode_impl(const T* qp, const T* kp, const T* vp, const int64_t* bt, const int64_t* lp, int64_t B,
                       int64_t g, int64_t r, int64_t d, int64_t S, int64_t nb, int64_t block_size, int64_t max_len,
                       float sc, T* op) {
  int64_t rows = 0;
  for (int64_t b = 0; b < B; ++b) rows += lp[b] * g;
  const int64_t grain = rows < 256 ? B * g + 1 : 1;      // at::parallel_for runs a range below its grain inline
  if (rows < 256) {
    // The calling thread alone: ask for every cached row the step reads (K and V, at most 256 rows
    // each) before the first is needed. Its rows are cold after a step's weights went through the
    // cache, and one block asked for at a time left each head waiting on memory once per block.
    for (int64_t i = 0; i < B * g; ++i) {
      const int64_t b = i / g, h = i % g;
      for (int64_t l0 = 0; l0 < lp[b]; l0 += block_size) {
        const int64_t at = (h * S + bt[b * nb + l0 / block_size] * block_size) * d;
        const int64_t bytes = std::min(block_size, lp[b] - l0) * d * int64_t(sizeof(T));
        prefetch_bytes(kp + at, bytes);
        prefetch_bytes(vp + at, bytes);
      }
    }
  }
  at::parallel_for(0, B * g, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(r * max_len), qf, of;
    if constexpr (!std::is_same_v<T, float>) {
      qf.resize(r * d);
      of.resize(r * d);
    }
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / g, h = i % g, L = lp[b];
      const float* q;
      float* o;
      if constexpr (std::is_same_v<T, float>) {
        q = qp + i * r * d;
        o = op + i * r * d;
      } else {
        for (int64_t j = 0; j < r * d; ++j) qf[j] = static_cast<float>(qp[i * r * d + j]);
        q = qf.data();
        o = of.data();
      }
      head_scores<NC>(q, r, d, kp + h * S * d, bt + b * nb, L, block_size, sc, scores.data());
      softmax_rows(scores.data(), r, L);
      head_values<NC>(scores.data(), r, d, vp + h * S * d, bt + b * nb, L, block_size, o);
      if constexpr (!std::is_same_v<T, float>)
        for (int64_t j = 0; j < r * d; ++j) op[i * r * d + j] = T(of[j]);
    }
  });
}

template <typename T>
void paged_decode_dispatch(const T* qp, const T* kp, const T* vp, const int64_t* bt, const int64_t* lp, int64_t B,
                           int64_t g, int64_t r, int64_t d, int64_t S, int64_t nb, int64_t block_size, int64_t max_len,
                           float sc, T* op) {
  switch (d) {      // the head dims of the models we serve; others take the scalar loops
#ifdef __AVX512F__
    case 32: return paged_decode_impl<2>(qp, kp, vp, bt, lp, B, g, r, d, S, nb, block_size, max_len, sc, op);
    case 64: return paged_decode_impl<4>(qp, kp, vp, bt, lp, B, g, r, d, S, nb, block_size, max_len, sc, op);
    case 128: return paged_decode_impl<8>(qp, kp, vp, bt, lp, B, g, r, d, S, nb, block_size, max_len, sc, op);
    case 256: return paged_decode_impl<16>(qp, kp, vp, bt, lp, B, g, r, d, S, nb, block_size, max_len, sc, op);
#endif
    default: return paged_decode_impl<0>(qp, kp, vp, bt, lp, B, g, r, d, S, nb, block_size, max_len, sc, op);
  }
}

}  // namespace

// q [B, g, r, d], k_cache / v_cache [g, S, d] (one layer), blocks [B, nb] int64, lens [B] int64
// → out [B, g, r, d] = softmax(q·Kᵀ·scale) · V over each sequence's first L_b cached positions.
// q and the caches are all float32 or all bfloat16; sums and the softmax are float32 either way.
at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor blocks,
                           at::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 3 && v_cache.dim() == 3 && blocks.dim() == 2 && lens.dim() == 1,
              "paged_decode: expected q [B, g, r, d], caches [g, S, d], blocks [B, nb], lens [B]");
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k_cache.scalar_type() == dtype
              && v_cache.scalar_type() == dtype, "paged_decode: float32 or bfloat16 only, the same for q and both caches");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "paged_decode: int64 blocks and lens");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && blocks.is_contiguous()
              && lens.is_contiguous(), "paged_decode: contiguous tensors only");
  const int64_t B = q.size(0), g = q.size(1), r = q.size(2), d = q.size(3);
  const int64_t S = k_cache.size(1), nb = blocks.size(1);
  TORCH_CHECK(k_cache.size(0) == g && v_cache.size(0) == g && k_cache.size(2) == d && v_cache.sizes() == k_cache.sizes()
              && blocks.size(0) == B && lens.size(0) == B, "paged_decode: shapes disagree");
  const int64_t* lp = lens.data_ptr<int64_t>();
  int64_t max_len = 0;
  const int64_t* bt = blocks.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= nb * block_size, "paged_decode: a context length is outside its block table");
    for (int64_t i = 0; i * block_size < lp[b]; ++i)
      TORCH_CHECK(bt[b * nb + i] >= 0 && (bt[b * nb + i] + 1) * block_size <= S, "paged_decode: block id out of range");
    max_len = std::max(max_len, lp[b]);
  }
  auto out = at::empty(q.sizes(), q.options());
  const float sc = static_cast<float>(scale);
  if (dtype == at::kFloat)
    paged_decode_dispatch<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), bt, lp, B, g,
                                 r, d, S, nb, block_size, max_len, sc, out.data_ptr<float>());
  else
    paged_decode_dispatch<c10::BFloat16>(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                                         v_cache.data_ptr<c10::BFloat16>(), bt, lp, B, g, r, d, S, nb, block_size, max_len,
                                         sc, out.data_ptr<c10::BFloat16>());
  return out;
}

// The KV cache write: index_copy_ along the slot dimension took ~40 µs a layer at 64 tokens.
namespace {

template <typename T>
void kv_write_impl(T* kc, T* vc, const int64_t* slots, const T* k, const T* v, int64_t T_, int64_t g, int64_t S,
                   int64_t d, int64_t k_st, int64_t k_sh, int64_t v_st, int64_t v_sh) {
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t h = 0; h < g; ++h) {
      std::copy(k + t * k_st + h * k_sh, k + t * k_st + h * k_sh + d, kc + (h * S + slots[t]) * d);
      std::copy(v + t * v_st + h * v_sh, v + t * v_st + h * v_sh + d, vc + (h * S + slots[t]) * d);
    }
}

}  // namespace

// k_cache / v_cache [g, S, d] (one layer), slots [T] int64, k / v [T, g, d] (each head's d values
// contiguous) → k_cache[h, slots[t]] = k[t, h], the same for v.
void kv_write(at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots, at::Tensor k, at::Tensor v) {
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "kv_write: expected contiguous caches [g, S, d] of one shape");
  const int64_t g = k_cache.size(0), S = k_cache.size(1), d = k_cache.size(2), T_ = slots.numel();
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(), "kv_write: int64 slots [T]");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) == T_ && v.size(0) == T_ && k.size(1) == g && v.size(1) == g &&
              k.size(2) == d && v.size(2) == d && k.stride(2) == 1 && v.stride(2) == 1,
              "kv_write: expected k and v [T, g, d] with contiguous heads, got ", k.sizes(), " and ", v.sizes());
  const auto dt = k_cache.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && v_cache.scalar_type() == dt && k.scalar_type() == dt &&
              v.scalar_type() == dt, "kv_write: float32 or bfloat16 caches, k and v of one dtype");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "kv_write: slot ", sp[t], " out of range for ", S);
  if (dt == at::kFloat)
    kv_write_impl(k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), sp, k.data_ptr<float>(), v.data_ptr<float>(), T_,
                  g, S, d, k.stride(0), k.stride(1), v.stride(0), v.stride(1));
  else
    kv_write_impl(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), sp, k.data_ptr<c10::BFloat16>(),
                  v.data_ptr<c10::BFloat16>(), T_, g, S, d, k.stride(0), k.stride(1), v.stride(0), v.stride(1));
}

// ---- prefill_attention ----------------------------------------------------------------------------
// A prefill chunk's causal attention in one pass over its keys (flash-style): per KV head, four rows
// (query, head) at a time against 64 keys at a time, their scores in registers, an online softmax
// (running max and sum), and the values added in with the rows' weights; nothing [rows, C] is
// written. The torch path (matrix products through MKL in blocks of 128 queries, the scores
// written out, scaled, masked and softmaxed by separate ops) ran at ~86 GFLOP/s of the products it
// computed (docs/performance.md).
namespace {

#ifdef __AVX512F__
// Four rows (query, head) of one KV head against keys [0, max(last) + 1) of its context, 64 keys at a
// time: kt [d, Cp] (K transposed, float32, Cp a multiple of 64, zero past the context), v [C, d]
// float32, q [4, d] float32 pre-scaled; row i sees keys up to last[i]. Each k step loads four K
// registers and broadcasts four query values for 16 products; each key's V row is loaded once for the
// four rows. o [4, d]: the rows' outputs (divided by their sums).
template <int NC>
void prefill_quad(const float* q, int64_t d, const float* kt, int64_t Cp, const float* v, const int64_t* last, float* o) {
  const int64_t upto = *std::max_element(last, last + 4) + 1;
  float m[4];                            // each row's running max, and its running sums (16 lanes)
  __m512 l[4];
  alignas(64) float p[4][64];
  for (int i = 0; i < 4; ++i) {
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = _mm512_setzero_ps();
  }
  std::fill(o, o + 4 * d, 0.f);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c0 = 0; c0 < upto; c0 += 64) {
    __m512 s[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) s[i][j] = _mm512_setzero_ps();
    for (int64_t e = 0; e < d; ++e) {
      __m512 kr[4];
      for (int j = 0; j < 4; ++j) kr[j] = _mm512_loadu_ps(kt + e * Cp + c0 + 16 * j);
      for (int i = 0; i < 4; ++i) {
        const __m512 b = _mm512_set1_ps(q[i * d + e]);
        for (int j = 0; j < 4; ++j) s[i][j] = _mm512_fmadd_ps(b, kr[j], s[i][j]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      // keys past the row's last visible one (and the padding past the context) count as -inf; the
      // max is finite from the first tile on (key 0 is seen by every row)
      __m512 mv = minus_inf;
      for (int j = 0; j < 4; ++j) {
        const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(int32_t(c0 + 16 * j)), lane);
        s[i][j] = _mm512_mask_blend_ps(_mm512_cmple_epi32_mask(key, _mm512_set1_epi32(int32_t(last[i]))), minus_inf, s[i][j]);
        mv = _mm512_max_ps(mv, s[i][j]);
      }
      const float mx = _mm512_reduce_max_ps(mv);
      if (mx > m[i]) {                   // a new max: the sums so far rescaled (nothing to rescale at first)
        const float corr = c0 == 0 ? 0.f : std::exp(m[i] - mx);
        l[i] = _mm512_mul_ps(l[i], _mm512_set1_ps(corr));
        for (int64_t e = 0; e < d; e += 16)
          _mm512_storeu_ps(o + i * d + e, _mm512_mul_ps(_mm512_loadu_ps(o + i * d + e), _mm512_set1_ps(corr)));
        m[i] = mx;
      }
      // e^(x − max), held above −200 (exp16 of −inf is NaN; e^−200 is 0 in float32): 0 where masked
      const __m512 mi = _mm512_set1_ps(m[i]), floor = _mm512_set1_ps(-200.f);
      for (int j = 0; j < 4; ++j) {
        const __m512 pj = exp16(_mm512_max_ps(_mm512_sub_ps(s[i][j], mi), floor));
        l[i] = _mm512_add_ps(l[i], pj);
        _mm512_store_ps(p[i] + 16 * j, pj);
      }
    }
    // o[i] += Σ_j p[i][j] · v[c0 + j]
    const int64_t nk = std::min<int64_t>(64, upto - c0);
    for (int64_t e0 = 0; e0 < d; e0 += 16 * NC) {
      __m512 acc[4][NC];
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_loadu_ps(o + i * d + e0 + 16 * c);
      for (int64_t j = 0; j < nk; ++j) {
        __m512 vr[NC];
        for (int c = 0; c < NC; ++c) vr[c] = _mm512_loadu_ps(v + (c0 + j) * d + e0 + 16 * c);
        for (int i = 0; i < 4; ++i) {
          const __m512 w = _mm512_set1_ps(p[i][j]);
          for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_fmadd_ps(w, vr[c], acc[i][c]);
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < NC; ++c) _mm512_storeu_ps(o + i * d + e0 + 16 * c, acc[i][c]);
    }
  }
  for (int i = 0; i < 4; ++i) {
    const float inv = 1.f / _mm512_reduce_add_ps(l[i]);
    for (int64_t e = 0; e < d; ++e) o[i * d + e] *= inv;
  }
}

template <typename T>
void prefill_impl(const T* qp, const T* kp, const T* vp, int64_t n, int64_t h, int64_t g, int64_t C, int64_t d,
                  float scale, T* op) {
  const int64_t r = h / g, Cp = (C + 63) / 64 * 64;
  const int NC = d % 64 == 0 ? 4 : d % 32 == 0 ? 2 : 1;
  // One KV head at a time, so that its K transposed [d, Cp] and V [C, d] in float32 are all the
  // memory a call adds (at 128k tokens of context and d 128: 64 MB, bfloat16 V as much again).
  std::vector<float> kt(d * Cp), vf(std::is_same_v<T, float> ? 0 : C * d);
  // A head's rows (query, head) in query order, four at a time; a task is a pair of quads, an early
  // one and a late one, so that every task has about as many keys to go through.
  const int64_t quads = (n * r + 3) / 4, pairs = (quads + 1) / 2;
  for (int64_t hk = 0; hk < g; ++hk) {
    const T* kh = kp + hk * C * d;
    at::parallel_for(0, d, 1, [&](int64_t b, int64_t e) {
      for (int64_t x = b; x < e; ++x) {
        float* row = kt.data() + x * Cp;
        for (int64_t c = 0; c < C; ++c) row[c] = static_cast<float>(kh[c * d + x]);
        std::fill(row + C, row + Cp, 0.f);                    // padding keys: masked, but never garbage
      }
    });
    const float* vh;
    if constexpr (std::is_same_v<T, float>) {
      vh = vp + hk * C * d;
    } else {
      at::parallel_for(0, C, 256, [&](int64_t b, int64_t e) {
        for (int64_t i = b * d; i < e * d; ++i) vf[i] = static_cast<float>(vp[hk * C * d + i]);
      });
      vh = vf.data();
    }
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> q(4 * d), o(4 * d);
      int64_t last[4], row[4];
      for (int64_t pr = begin; pr < end; ++pr) {
        const int64_t which[2] = {pr, quads - 1 - pr};
        for (int w = 0; w < (which[1] == which[0] ? 1 : 2); ++w) {   // (an odd count's middle quad: once)
          for (int i = 0; i < 4; ++i) {
            row[i] = std::min(which[w] * 4 + i, n * r - 1);           // a short last quad repeats its last row
            const int64_t qi = row[i] / r, head = hk * r + row[i] % r;
            last[i] = C - n + qi;
            for (int64_t x = 0; x < d; ++x) q[i * d + x] = static_cast<float>(qp[(qi * h + head) * d + x]) * scale;
          }
          if (NC == 4) prefill_quad<4>(q.data(), d, kt.data(), Cp, vh, last, o.data());
          else if (NC == 2) prefill_quad<2>(q.data(), d, kt.data(), Cp, vh, last, o.data());
          else prefill_quad<1>(q.data(), d, kt.data(), Cp, vh, last, o.data());
          for (int i = 0; i < 4; ++i) {
            if (i > 0 && row[i] == row[i - 1]) break;
            const int64_t qi = row[i] / r, head = hk * r + row[i] % r;
            for (int64_t x = 0; x < d; ++x) op[(qi * h + head) * d + x] = T(o[i * d + x]);
          }
        }
      }
    });
  }
}
#endif

}  // namespace

bool has_prefill_attention() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

// q [n, h, d]: a prefill chunk's queries, the last n positions of its context; k, v [g, C, d]: the
// context (C ≥ n); → [n, h, d] = softmax(q·Kᵀ·scale + causal mask) · V, query i seeing keys up to
// C − n + i. float32 or bfloat16 (all three alike); sums, softmax and the output's accumulation in
// float32. Heads h = g · r, query head j of KV head j / r (as torch's grouped-query layout).
at::Tensor prefill_attention(at::Tensor q, at::Tensor k, at::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && v.sizes() == k.sizes(),
              "prefill_attention: expected q [n, h, d] and k, v [g, C, d]");
  const int64_t n = q.size(0), h = q.size(1), d = q.size(2), g = k.size(0), C = k.size(1);
  TORCH_CHECK(k.size(2) == d && g > 0 && h % g == 0 && C >= n && n > 0 && d % 16 == 0,
              "prefill_attention: shapes q ", q.sizes(), ", k ", k.sizes(), " (need h a multiple of g, C ≥ n, d a multiple of 16)");
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && k.scalar_type() == dt && v.scalar_type() == dt,
              "prefill_attention: float32 or bfloat16, the same for q, k and v");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "prefill_attention: contiguous tensors only");
  auto out = at::empty(q.sizes(), q.options());
#ifdef __AVX512F__
  if (dt == at::kFloat)
    prefill_impl<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), n, h, g, C, d, float(scale),
                        out.data_ptr<float>());
  else
    prefill_impl<c10::BFloat16>(q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), n, h,
                                g, C, d, float(scale), out.data_ptr<c10::BFloat16>());
#else
  TORCH_CHECK(false, "prefill_attention: this build has no AVX-512");
#endif
  return out;
}
