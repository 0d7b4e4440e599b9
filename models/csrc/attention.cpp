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
