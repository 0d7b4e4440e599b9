// Shuttle's CPU kernels (float32 and bfloat16), built on first use by torch.utils.cpp_extension
// (models/cpu_kernels.py, which says why each exists and what it measured):
//  - paged_decode: decode attention straight from the paged KV cache; each (sequence, KV head)
//    walks its own block table and reads each cached K and V row once, only up to its own length.
//  - panel_linear: y = x · Wᵀ for a weight packed once into column panels, the few-to-some rows
//    (1-256) that decode and chunked prefill multiply by expert and projection weights: float32 in
//    8-column panels (AVX2 FMA), bfloat16 in 16-column panels of k pairs (AVX-512 BF16 dot products).
//  - moe_ffn: one expert rank's whole expert layer in one call, on either kind of panel.
//
// Legend (paged_decode): B decode sequences, g KV heads, r query heads per KV head, d head dim,
// S cache slots, nb block-table width, L_b the context length of sequence b.

// The few headers used, not <torch/extension.h> (all of torch's C++ API): the first build takes
// ~16 s instead of ~36 on the 2-core VM.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>
#include <limits>

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

// Runs fn(i, b, h) for every (sequence b, KV head h), i = b·g + h, split over torch's threads.
template <typename Fn>
inline void for_each_sequence_head(int64_t B, int64_t g, Fn&& fn) {
  at::parallel_for(0, B * g, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i, i / g, i % g);
  });
}

// The decode attention itself, on float32 queries, over a cache of T (float or bfloat16: each
// cached value is widened to float as it is read), into float32 out.
template <typename T>
void paged_decode_impl(const float* qp, const T* kp, const T* vp, const int64_t* bt, const int64_t* lp, int64_t B,
                       int64_t g, int64_t r, int64_t d, int64_t S, int64_t nb, int64_t block_size, int64_t max_len,
                       float sc, const at::TensorOptions& fopt, float* op) {
  auto scores = at::empty({B, g, r, max_len}, fopt);
  float* sp = scores.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // scores[b, h, j, l] = q[b, h, j] · K[h, slot(b, l)] · scale; -inf past L_b
  for_each_sequence_head(B, g, [&](int64_t i, int64_t b, int64_t h) {
    const float* qi = qp + i * r * d;
    float* si = sp + i * r * max_len;
    for_each_cached_row(kp + h * S * d, bt + b * nb, lp[b], block_size, d, [&](int64_t l, const T* __restrict__ kr) {
      for (int64_t j = 0; j < r; ++j) {
        const float* __restrict__ qj = qi + j * d;
        float acc = 0.f;
        for (int64_t t = 0; t < d; ++t) acc += qj[t] * static_cast<float>(kr[t]);
        si[j * max_len + l] = acc * sc;
      }
    });
    for (int64_t j = 0; j < r; ++j) std::fill(si + j * max_len + lp[b], si + (j + 1) * max_len, neg_inf);
  });

  auto probs = scores.softmax(-1);
  const float* pp = probs.data_ptr<float>();

  // out[b, h, j] = Σ_l probs[b, h, j, l] · V[h, slot(b, l)]
  for_each_sequence_head(B, g, [&](int64_t i, int64_t b, int64_t h) {
    const float* pi = pp + i * r * max_len;
    float* oi = op + i * r * d;
    for_each_cached_row(vp + h * S * d, bt + b * nb, lp[b], block_size, d, [&](int64_t l, const T* __restrict__ vr) {
      for (int64_t j = 0; j < r; ++j) {
        const float p = pi[j * max_len + l];
        float* __restrict__ oj = oi + j * d;
        for (int64_t t = 0; t < d; ++t) oj[t] += p * static_cast<float>(vr[t]);
      }
    });
  });
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
  const auto fopt = q.options().dtype(at::kFloat);
  const at::Tensor qf = dtype == at::kFloat ? q : q.to(at::kFloat);
  auto out = at::zeros(q.sizes(), fopt);
  const float sc = static_cast<float>(scale);
  if (dtype == at::kFloat)
    paged_decode_impl<float>(qf.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), bt, lp, B, g, r,
                             d, S, nb, block_size, max_len, sc, fopt, out.data_ptr<float>());
  else
    paged_decode_impl<c10::BFloat16>(qf.data_ptr<float>(), k_cache.data_ptr<c10::BFloat16>(),
                                     v_cache.data_ptr<c10::BFloat16>(), bt, lp, B, g, r, d, S, nb, block_size, max_len,
                                     sc, fopt, out.data_ptr<float>());
  return dtype == at::kFloat ? out : out.to(dtype);
}

// ---- rms_norm, rotary ----------------------------------------------------------------------------
// Decode runs these once or twice per layer on a handful of rows, where torch's composite ops cost
// ~30 µs a call (F.rms_norm is six kernels) against ~1 µs here. Each rounds as the Hugging Face
// modules do in the input's dtype: in bfloat16, the normalised row is rounded before the weight
// multiplies it, and q·cos and rotate_half(q)·sin are rounded before they are added.

namespace {

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * H;
      T* yr = y + r * H;
      float ss = 0.f;
      for (int64_t i = 0; i < H; ++i) {
        const float v = static_cast<float>(xr[i]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      for (int64_t i = 0; i < H; ++i)
        yr[i] = T(static_cast<float>(w[i]) * static_cast<float>(T(static_cast<float>(xr[i]) * inv)));
    }
  });
}

template <typename T>
void rotary_rows(const T* x, int64_t T_, int64_t n, int64_t d, int64_t stride_t, int64_t stride_n, const T* cos,
                 const T* sin, T* y) {
  const int64_t half = d / 2;
  at::parallel_for(0, T_ * n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = i / n, h = i % n;
      const T* xr = x + t * stride_t + h * stride_n;
      const T* c = cos + t * d;
      const T* s = sin + t * d;
      T* yr = y + i * d;
      for (int64_t j = 0; j < d; ++j) {
        const float rot = j < half ? -static_cast<float>(xr[j + half]) : static_cast<float>(xr[j - half]);
        const T a = T(static_cast<float>(xr[j]) * static_cast<float>(c[j]));
        const T r = T(rot * static_cast<float>(s[j]));
        yr[j] = T(static_cast<float>(a) + static_cast<float>(r));
      }
    }
  });
}

}  // namespace

// x [..., H] (rows contiguous), weight [H] → weight · x / sqrt(mean(x²) + eps), float32 or bfloat16.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: expected x [..., H] and "
              "weight [H], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && weight.scalar_type() == x.scalar_type()
              && x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: float32 or bfloat16 CPU x and weight of one dtype");
  x = x.contiguous();
  weight = weight.contiguous();
  auto y = at::empty_like(x);
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), rows, H, float(eps));
  else
    rms_norm_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows, H,
                  float(eps));
  return y;
}

// x [T, n, d] (each head's d values contiguous; any T and n strides), cos / sin [T, d] → [T, n, d]
// = x·cos + rotate_half(x)·sin, rotate_half(x) = (−x[d/2:], x[:d/2]).
at::Tensor rotary(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rotary: expected x [T, n, d] with contiguous "
              "heads and an even d, got ", x.sizes(), " strides ", x.strides());
  const int64_t T_ = x.size(0), n = x.size(1), d = x.size(2);
  cos = cos.reshape({-1, d}).contiguous();
  sin = sin.reshape({-1, d}).contiguous();
  TORCH_CHECK(cos.size(0) == T_ && sin.size(0) == T_, "rotary: cos and sin need one row of ", d, " per token (", T_,
              "), got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && cos.scalar_type() == x.scalar_type()
              && sin.scalar_type() == x.scalar_type() && x.device().is_cpu(), "rotary: float32 or bfloat16 CPU tensors of one dtype");
  auto y = at::empty({T_, n, d}, x.options());
  if (x.scalar_type() == at::kFloat)
    rotary_rows(x.data_ptr<float>(), T_, n, d, x.stride(0), x.stride(1), cos.data_ptr<float>(), sin.data_ptr<float>(),
                y.data_ptr<float>());
  else
    rotary_rows(x.data_ptr<c10::BFloat16>(), T_, n, d, x.stride(0), x.stride(1), cos.data_ptr<c10::BFloat16>(),
                sin.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>());
  return y;
}

// ---- row_max, kv_write --------------------------------------------------------------------------
// The sampler's greedy pick over [N, V] logits: torch's argmax on rows took ~1 ms at 64 × 32000
// (float32; bfloat16 3.7 ms) against ~0.1 here. The KV cache write: index_copy_ along the slot
// dimension, ~40 µs a layer at 64 tokens, a copy loop here.

// x [N, V] float32 → (max [N], argmax [N] int64) as torch's amax and argmax give them: a row with a
// NaN has max NaN and the first NaN's index; otherwise the first index of the largest value
// (an all -inf row: 0).
std::tuple<at::Tensor, at::Tensor> row_max(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "row_max: expected contiguous float32 CPU logits [N, V], got ", x.scalar_type(), " ", x.sizes());
  const int64_t N = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0, "row_max: rows of no values");
  auto values = at::empty({N}, x.options());
  auto index = at::empty({N}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = xp + r * V;
      float m = -std::numeric_limits<float>::infinity();
      bool nan = false;
      int64_t i = 0;
#ifdef __AVX512F__
      __m512 mv = _mm512_set1_ps(m);
      __mmask16 unordered = 0;
      for (; i + 16 <= V; i += 16) {
        const __m512 v = _mm512_loadu_ps(row + i);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        mv = _mm512_max_ps(v, mv);                   // v NaN: keeps mv (NaN is flagged above)
      }
      m = _mm512_reduce_max_ps(mv);
      nan = unordered != 0;
#endif
      for (; i < V; ++i) {
        const float v = row[i];
        m = v > m ? v : m;
        nan |= v != v;
      }
      int64_t at = 0;
#ifdef __AVX512F__
      const __m512 target = _mm512_set1_ps(m);
      for (; at + 16 <= V; at += 16) {
        const __m512 v = _mm512_loadu_ps(row + at);
        const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
        if (hit) {
          at += __builtin_ctz(hit);
          break;
        }
      }
#endif
      if (nan) {
        while (!(row[at] != row[at])) ++at;
        m = row[at];
      } else {
        while (row[at] != m) ++at;
      }
      vp[r] = m;
      ip[r] = at;
    }
  });
  return {values, index};
}

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

// ---- panel_linear ------------------------------------------------------------------------------
// float32: the weight W [N, K] is stored as panels [N/8, K, 8] (panel j holds rows 8j..8j+7,
// interleaved by k), so one AVX register load gives W[8j..8j+7, k]. Threads split the panels; each
// streams its panels from memory once, the row tiles after the first finding them in cache.
//  - up to 8 rows (decode): one tile of 8 accumulators per panel: a single pass, so the FMAs hide
//    under the weight stream (the product is bound by memory bandwidth here);
//  - more rows: tiles of up to 6 rows over two neighbouring panels (16 columns: 12 accumulators, the
//    most AVX2's 16 registers hold beside the two weight vectors and a broadcast), with the rows
//    spread evenly over the tiles. 8 accumulators cannot hide the FMA latency (2 units × 4-5 cycles)
//    and need a broadcast per FMA; 12 can, with a broadcast per 2 FMAs. Expert FFN products, both
//    cores: +12-40% over 8-row tiles from 9 to 256 rows (e.g. 38 rows 142 → 157-169 GFLOP/s).
// bfloat16 (where the CPU has AVX-512 BF16): W [N, K] as panels [N/16, K/2, 32]: panel j, pair kk
// holds W[16j + c, 2kk + e] at 2c + e, so one 64-byte load gives 16 columns × 2 k, which one
// vdpbf16ps multiplies by a broadcast pair (x[2kk], x[2kk + 1]) and adds into 16 float32 sums: half
// the bytes of float32 and twice the products per instruction. Tiles of up to 12 rows per panel.
// Both stream the weight with a software prefetch 4 KB ahead: with only the hardware prefetcher,
// 8-row expert products out of cache ran at ~16 GB/s (the FMAs stall the stream); with it ~21.

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_ahead(const void* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// The tiles read element (m, k) of x at x[k·sk + m·sm]. Row blocks of up to 8 rows are packed
// transposed once per call (sk = M, sm = 1): the M values one k step broadcasts then sit in one or
// two cache lines instead of M rows K floats apart (8-row expert products out of cache, both cores:
// 34 → 25 ms for 8 layers' up projections); bigger blocks are read in place (sk = 1, sm = K), where
// transposing cost more than it saved in prefill.
// Both tiles are inlined into panel_linear's switches: called through a pointer, GCC spilled the
// accumulators to the stack on every k (2.3x slower).
//
// M rows × 8 columns, k unrolled U times into U sets of sums: an FMA waits ~4 cycles for the one
// before it on the same sum, and two issue per cycle, so fewer than 8 independent sums leave the
// FMA units idle (one row: a quarter of the rate, and the weight stream with it).
template <int M, int U>
__attribute__((always_inline)) inline void panel_tile(const float* __restrict__ x, int64_t sk, int64_t sm, int64_t K,
                                                      const float* __restrict__ p, float* __restrict__ y, int64_t ldy) {
  __m256 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; u += 2) prefetch_ahead(p + (k + u) * 8);
    for (int u = 0; u < U; ++u) {
      const __m256 w = _mm256_loadu_ps(p + (k + u) * 8);
      for (int m = 0; m < M; ++m) acc[u][m] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (k + u) * sk + m * sm), w, acc[u][m]);
    }
  }
  for (; k < K; ++k) {
    const __m256 w = _mm256_loadu_ps(p + k * 8);
    for (int m = 0; m < M; ++m) acc[0][m] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k * sk + m * sm), w, acc[0][m]);
  }
  for (int m = 0; m < M; ++m) {
    __m256 sum = acc[0][m];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][m]);
    _mm256_storeu_ps(y + m * ldy, sum);
  }
}

// M rows × 16 columns: panels p0 and p1 = p0 + 8K side by side.
template <int M>
__attribute__((always_inline)) inline void pair_tile(const float* __restrict__ x, int64_t sk, int64_t sm, int64_t K,
                                                     const float* __restrict__ p0, float* __restrict__ y, int64_t ldy) {
  const float* __restrict__ p1 = p0 + K * 8;
  __m256 a0[M], a1[M];
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 1) == 0) {
      prefetch_ahead(p0 + k * 8);
      prefetch_ahead(p1 + k * 8);
    }
    const __m256 w0 = _mm256_loadu_ps(p0 + k * 8), w1 = _mm256_loadu_ps(p1 + k * 8);
    for (int m = 0; m < M; ++m) {
      const __m256 b = _mm256_broadcast_ss(x + k * sk + m * sm);
      a0[m] = _mm256_fmadd_ps(b, w0, a0[m]);
      a1[m] = _mm256_fmadd_ps(b, w1, a1[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm256_storeu_ps(y + m * ldy, a0[m]);
    _mm256_storeu_ps(y + m * ldy + 8, a1[m]);
  }
}

// Rows m0.. of panel j (and j+1 when `pair`) in tiles of `rows` (≤ 8 single, ≤ 6 paired).
__attribute__((always_inline)) inline void tile(bool pair, int64_t rows, const float* x, int64_t sk, int64_t sm, int64_t K,
                                                const float* p, float* y, int64_t ldy) {
  if (pair) {
    switch (rows) {
      case 6: pair_tile<6>(x, sk, sm, K, p, y, ldy); break;
      case 5: pair_tile<5>(x, sk, sm, K, p, y, ldy); break;
      case 4: pair_tile<4>(x, sk, sm, K, p, y, ldy); break;
      case 3: pair_tile<3>(x, sk, sm, K, p, y, ldy); break;
      case 2: pair_tile<2>(x, sk, sm, K, p, y, ldy); break;
      default: pair_tile<1>(x, sk, sm, K, p, y, ldy);
    }
    return;
  }
  switch (rows) {       // U: at least 8 independent sums
    case 8: panel_tile<8, 1>(x, sk, sm, K, p, y, ldy); break;
    case 7: panel_tile<7, 2>(x, sk, sm, K, p, y, ldy); break;
    case 6: panel_tile<6, 2>(x, sk, sm, K, p, y, ldy); break;
    case 5: panel_tile<5, 2>(x, sk, sm, K, p, y, ldy); break;
    case 4: panel_tile<4, 2>(x, sk, sm, K, p, y, ldy); break;
    case 3: panel_tile<3, 4>(x, sk, sm, K, p, y, ldy); break;
    case 2: panel_tile<2, 4>(x, sk, sm, K, p, y, ldy); break;
    default: panel_tile<1, 8>(x, sk, sm, K, p, y, ldy);
  }
}

// All row tiles of panel j (and j + 1 when `pair`) for the M rows of x (transposed [K, M] up to 8
// rows, else [M, K] as given): one unit of work.
inline void panel_unit(const float* x, int64_t M, int64_t K, const float* panels, int64_t j, bool pair, float* y,
                       int64_t ldy) {
  const int64_t sk = M <= 8 ? M : 1, sm = M <= 8 ? 1 : K;
  const int64_t cap = pair ? 6 : 8, tiles = (M + cap - 1) / cap;
  for (int64_t m0 = 0, t = 0; m0 < M; ++t) {
    const int64_t rows = pair ? (M - m0 + tiles - t - 1) / (tiles - t) : std::min<int64_t>(8, M - m0);
    tile(pair, rows, x + m0 * sm, sk, sm, K, panels + j * K * 8, y + m0 * ldy + j * 8, ldy);
    m0 += rows;
  }
}

// Panel j (and j+1 when `pair`) of weight `weight`, for all of that weight's rows.
struct Unit {
  int64_t weight, j;
  bool pair;
};

// The float32 format: 8-column panels, more than 8 rows in tiles over panel pairs.
struct F32 {
  using X = float;
  using W = float;
  using Out = float;                        // what panel_linear returns
  static constexpr int64_t kCols = 8;
  static constexpr int64_t kUnitRows = 8;   // more rows than this: units of two panels
  static double cost(int64_t rows) { return 6.0 + rows; }   // a panel's stream ≈ 6 rows of FMAs
  // x with each row block of up to 8 rows [counts[w], K] transposed into [K, counts[w]] (panel_unit
  // reads blocks of ≤ 8 rows so), bigger blocks copied as they are.
  static const X* pack(const X* x, int64_t K, const std::vector<int64_t>& counts, const std::vector<int64_t>& first,
                       std::vector<X>& buffer) {
    bool any = false;
    for (int64_t c : counts) any = any || (c > 0 && c <= 8);
    if (!any) return x;
    buffer.resize(first.back() * K);
    at::parallel_for(0, counts.size(), 1, [&](int64_t b, int64_t e) {
      for (int64_t w = b; w < e; ++w) {
        const int64_t M = counts[w];
        const X* src = x + first[w] * K;
        X* dst = buffer.data() + first[w] * K;
        if (M > 8)
          std::copy(src, src + M * K, dst);
        else
          for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k) dst[k * M + m] = src[m * K + k];
      }
    });
    return buffer.data();
  }
  static void unit(const X* x, int64_t M, int64_t K, const W* panels, int64_t j, bool pair, float* y, int64_t ldy) {
    panel_unit(x, M, K, panels, j, pair, y, ldy);
  }
};

}  // namespace

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define SHUTTLE_BF16_PANELS 1
namespace {

inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void store16(c10::BFloat16* y, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// M rows × 16 columns of bfloat16 panel p (K/2 pairs), float32 sums, stored as Y; k pairs unrolled
// U times into U sets of sums where few rows would leave the dot product's latency exposed (as in
// the float32 tile).
template <int M, int U, typename Y>
__attribute__((always_inline)) inline void bf16_tile(const uint16_t* __restrict__ x, int64_t K,
                                                     const uint16_t* __restrict__ p, Y* __restrict__ y, int64_t ldy) {
  __m512 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
  const int64_t K2 = K / 2;
  int64_t kk = 0;
  for (; kk + U <= K2; kk += U)
    for (int u = 0; u < U; ++u) {
      prefetch_ahead(p + (kk + u) * 32);
      const __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(p + (kk + u) * 32));
      for (int m = 0; m < M; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + m * K + 2 * (kk + u), sizeof(pair));
        acc[u][m] = _mm512_dpbf16_ps(acc[u][m], reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)), w);
      }
    }
  for (; kk < K2; ++kk) {
    const __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(p + kk * 32));
    for (int m = 0; m < M; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * K + 2 * kk, sizeof(pair));
      acc[0][m] = _mm512_dpbf16_ps(acc[0][m], reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)), w);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[0][m];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][m]);
    store16(y + m * ldy, sum);
  }
}

template <typename Y>
__attribute__((always_inline)) inline void bf16_rows(int64_t rows, const uint16_t* x, int64_t K, const uint16_t* p,
                                                     Y* y, int64_t ldy) {
  switch (rows) {       // U: at least 8 independent sums
    case 12: bf16_tile<12, 1>(x, K, p, y, ldy); break;
    case 11: bf16_tile<11, 1>(x, K, p, y, ldy); break;
    case 10: bf16_tile<10, 1>(x, K, p, y, ldy); break;
    case 9: bf16_tile<9, 1>(x, K, p, y, ldy); break;
    case 8: bf16_tile<8, 1>(x, K, p, y, ldy); break;
    case 7: bf16_tile<7, 2>(x, K, p, y, ldy); break;
    case 6: bf16_tile<6, 2>(x, K, p, y, ldy); break;
    case 5: bf16_tile<5, 2>(x, K, p, y, ldy); break;
    case 4: bf16_tile<4, 2>(x, K, p, y, ldy); break;
    case 3: bf16_tile<3, 4>(x, K, p, y, ldy); break;
    case 2: bf16_tile<2, 4>(x, K, p, y, ldy); break;
    default: bf16_tile<1, 8>(x, K, p, y, ldy);
  }
}

// The bfloat16 format: 16-column panels of k pairs, rows in tiles of up to 12, spread evenly.
struct BF16 {
  using X = uint16_t;
  using W = uint16_t;
  using Out = c10::BFloat16;
  static constexpr int64_t kCols = 16;
  static constexpr int64_t kUnitRows = std::numeric_limits<int64_t>::max();   // never pairs
  static double cost(int64_t rows) { return 6.0 + 0.5 * rows; }   // the same bytes per panel, half the cycles per row
  static const X* pack(const X* x, int64_t, const std::vector<int64_t>&, const std::vector<int64_t>&, std::vector<X>&) {
    return x;     // rows as they are: each k pair of a row is one 32-bit broadcast
  }
  template <typename Y>
  static void unit(const X* x, int64_t M, int64_t K, const W* panels, int64_t j, bool, Y* y, int64_t ldy) {
    const int64_t tiles = (M + 11) / 12;
    for (int64_t m0 = 0, t = 0; m0 < M; ++t) {
      const int64_t rows = (M - m0 + tiles - t - 1) / (tiles - t);
      bf16_rows(rows, x + m0 * K, K, panels + j * K * 16, y + m0 * ldy + j * 16, ldy);
      m0 += rows;
    }
  }
};

// a[r, i] = SiLU(h[r, i]) · h[r, I + i] for the p rows of h [p, 2I] (gate, then up), into float or bfloat16.
inline __m512 exp16(__m512 x) {
  // e^x = 2^n · e^t, n = round(x / ln 2), t = x − n·ln 2 (ln 2 in two parts) in [−ln2/2, ln2/2], where
  // the Taylor series to t^6 is within 6e-8 relative; scalef makes 2^n and saturates to 0 or inf.
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 t = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  t = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606820309417e-06f), t);
  __m512 e = _mm512_set1_ps(1.f / 720);
  e = _mm512_fmadd_ps(e, t, _mm512_set1_ps(1.f / 120));
  e = _mm512_fmadd_ps(e, t, _mm512_set1_ps(1.f / 24));
  e = _mm512_fmadd_ps(e, t, _mm512_set1_ps(1.f / 6));
  e = _mm512_fmadd_ps(e, t, _mm512_set1_ps(0.5f));
  e = _mm512_fmadd_ps(e, t, _mm512_set1_ps(1.f));
  e = _mm512_fmadd_ps(e, t, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(e, n);
}

inline void store_masked(float* y, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(y, m, v); }
inline void store_masked(c10::BFloat16* y, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(y, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

}  // namespace
#endif

namespace {

template <typename A>
void silu_mul(const float* h, int64_t p, int64_t I, A* a) {
  at::parallel_for(0, p, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = h + r * 2 * I;
      const float* u = g + I;
      A* ar = a + r * I;
#ifdef SHUTTLE_BF16_PANELS
      for (int64_t i = 0; i < I; i += 16) {
        const __mmask16 m = I - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (I - i)) - 1);
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        store_masked(ar + i, m, _mm512_mul_ps(s, uv));
      }
#else
      for (int64_t i = 0; i < I; ++i) ar[i] = A(g[i] / (1.0f + std::exp(-g[i])) * u[i]);
#endif
    }
  });
}

void check_rows(const at::Tensor& x, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == dtype && x.is_contiguous() && x.device().is_cpu(), what,
              ": expected a contiguous ", c10::toString(dtype), " CPU x [M, K], got ", x.scalar_type(), " ", x.sizes());
}

// Whether these panels are the bfloat16 format (else float32); refuses anything else by name.
bool bf16_panels(const at::Tensor& panels, int64_t K, const char* what) {
  const bool bf16 = panels.scalar_type() == at::kBFloat16;
  if (bf16) {
#ifdef SHUTTLE_BF16_PANELS
    TORCH_CHECK(panels.dim() == 3 && panels.size(2) == 32 && K % 2 == 0 && panels.size(1) == K / 2, what,
                ": expected bfloat16 panels [N/16, K/2, 32] with K = ", K, ", got ", panels.sizes());
#else
    TORCH_CHECK(false, what, ": this CPU has no AVX-512 BF16 for bfloat16 panels");
#endif
  } else {
    TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.dim() == 3 && panels.size(2) == 8 && panels.size(1) == K, what,
                ": expected float32 panels [N/8, K, 8] or bfloat16 panels [N/16, K/2, 32] with K = ", K, ", got ",
                panels.scalar_type(), " ", panels.sizes());
  }
  TORCH_CHECK(panels.is_contiguous() && panels.device().is_cpu(), what, ": contiguous CPU panels only");
  return bf16;
}

// Row block w of x (counts[w] rows, blocks in order) times weight w (panels at weight[w], P of them):
// y [M, P·cols]. One parallel region for all the weights, split so that each thread gets an equal
// share of the estimated time: a unit (a panel or a pair) costs its weight stream plus its rows.
// `reverse` takes the weights last to first.
template <class F, typename Y>
void run_units(const typename F::X* xp, int64_t K, int64_t P, const std::vector<int64_t>& counts,
               const std::vector<const typename F::W*>& weight, bool reverse, Y* yp) {
  const int64_t ldy = P * F::kCols;
  std::vector<int64_t> first(counts.size() + 1, 0);
  for (size_t w = 0; w < counts.size(); ++w) first[w + 1] = first[w] + counts[w];
  std::vector<Unit> units;
  std::vector<double> cost{0.0};                   // prefix sums of the units' estimated time
  for (size_t i = 0; i < counts.size(); ++i) {
    const int64_t w = reverse ? counts.size() - 1 - i : i;
    if (counts[w] == 0) continue;
    const int64_t width = counts[w] > F::kUnitRows ? 2 : 1;
    for (int64_t j = 0; j < P; j += width) {
      const bool pair = width == 2 && j + 1 < P;
      units.push_back({w, j, pair});
      cost.push_back(cost.back() + (pair ? 2 : 1) * F::cost(counts[w]));
    }
  }
  if (units.empty()) return;
  std::vector<typename F::X> packed;
  xp = F::pack(xp, K, counts, first, packed);
  // The calling thread's own OpenMP thread count, not at::get_num_threads(): that one is the last
  // count any thread of the process set, and a colocated process has ranks on several threads.
#ifdef _OPENMP
  const int64_t T = std::min<int64_t>(omp_get_max_threads(), units.size());
#else
  const int64_t T = std::min<int64_t>(at::get_num_threads(), units.size());
#endif
  auto bound = [&](int64_t t) {                    // first unit of thread t's share
    return std::lower_bound(cost.begin(), cost.end() - 1, cost.back() * t / T) - cost.begin();
  };
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = bound(begin); u < bound(end); ++u) {
      const Unit& n = units[u];
      F::unit(xp + first[n.weight] * K, counts[n.weight], K, weight[n.weight], n.j, n.pair, yp + first[n.weight] * ldy,
              ldy);
    }
  });
}

// The panel pointers of a list of weights of one format, every one checked against the first.
template <class F>
std::vector<const typename F::W*> panel_pointers(const std::vector<at::Tensor>& panels, int64_t K, const char* what) {
  std::vector<const typename F::W*> out(panels.size());
  const bool bf16 = bf16_panels(panels[0], K, what);
  for (size_t w = 0; w < panels.size(); ++w) {
    TORCH_CHECK(bf16_panels(panels[w], K, what) == bf16, what, ": weight ", w, " is ", panels[w].scalar_type(),
                ", weight 0 is ", panels[0].scalar_type());
    TORCH_CHECK(panels[w].size(0) == panels[0].size(0), what, ": weight ", w, " has ", panels[w].size(0) * F::kCols,
                " outputs, weight 0 has ", panels[0].size(0) * F::kCols);
    out[w] = reinterpret_cast<const typename F::W*>(panels[w].data_ptr());
  }
  return out;
}

// x [M, K] (rows in blocks of counts) times each block's weight → [M, N] in x's dtype.
template <class F>
at::Tensor grouped_impl(const at::Tensor& x, const std::vector<int64_t>& counts, const std::vector<at::Tensor>& panels,
                        bool reverse, const char* what) {
  const auto weight = panel_pointers<F>(panels, x.size(1), what);
  const int64_t P = panels[0].size(0);
  auto y = at::empty({x.size(0), P * F::kCols}, x.options());
  run_units<F>(reinterpret_cast<const typename F::X*>(x.data_ptr()), x.size(1), P, counts, weight, reverse,
               y.template data_ptr<typename F::Out>());
  return y;
}

// A whole expert layer of one expert rank (see moe_ffn below), on panels of format F.
template <class F>
std::tuple<at::Tensor, at::Tensor> moe_ffn_impl(const at::Tensor& x, const at::Tensor& local, const at::Tensor& weights,
                                                const std::vector<at::Tensor>& up, const std::vector<at::Tensor>& down,
                                                bool reverse) {
  using X = typename F::X;
  const int64_t n = x.size(0), H = x.size(1), X_ = up.size(), k = local.size(1);
  const auto up_w = panel_pointers<F>(up, H, "moe_ffn (up)");
  const int64_t P_up = up[0].size(0), I = P_up * F::kCols / 2;
  const auto down_w = panel_pointers<F>(down, I, "moe_ffn (down)");
  TORCH_CHECK(down[0].size(0) * F::kCols == H, "moe_ffn: down projections give ", down[0].size(0) * F::kCols,
              " outputs, not H = ", H);
  const int64_t* ids = local.data_ptr<int64_t>();
  auto counts_t = at::zeros({X_}, local.options());
  int64_t* counts = counts_t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n * k; ++i) {
    TORCH_CHECK(ids[i] < X_, "moe_ffn: local expert id ", ids[i], " out of range for ", X_, " experts");
    if (ids[i] >= 0) ++counts[ids[i]];
  }
  std::vector<int64_t> first(X_ + 1, 0);
  for (int64_t e = 0; e < X_; ++e) first[e + 1] = first[e] + counts[e];
  const int64_t p = first[X_];
  std::vector<int64_t> pair_of_row(p);                      // row → pair index (token · k + slot)
  {
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < n * k; ++i)
      if (ids[i] >= 0) pair_of_row[next[ids[i]]++] = i;
  }
  const auto fopt = x.options().dtype(at::kFloat);
  auto sum = at::zeros({n, H}, fopt);
  if (p == 0) return {x.scalar_type() == at::kFloat ? sum : sum.to(x.scalar_type()), counts_t};
  const X* xp = reinterpret_cast<const X*>(x.data_ptr());
  auto xs = at::empty({p, H}, x.options());
  X* xsp = reinterpret_cast<X*>(xs.data_ptr());
  at::parallel_for(0, p, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) std::copy(xp + (pair_of_row[r] / k) * H, xp + (pair_of_row[r] / k + 1) * H, xsp + r * H);
  });
  std::vector<int64_t> cnt(counts, counts + X_);
  auto h = at::empty({p, 2 * I}, fopt);
  run_units<F>(xsp, H, P_up, cnt, up_w, reverse, h.data_ptr<float>());
  auto a = at::empty({p, I}, x.options());
  if (x.scalar_type() == at::kFloat)
    silu_mul(h.data_ptr<float>(), p, I, a.data_ptr<float>());
  else
    silu_mul(h.data_ptr<float>(), p, I, a.data_ptr<c10::BFloat16>());
  auto y = at::empty({p, H}, fopt);
  run_units<F>(reinterpret_cast<const X*>(a.data_ptr()), I, H / F::kCols, cnt, down_w, reverse, y.data_ptr<float>());
  // Each token's rows, in row order (expert order), weighted and summed into its output row.
  std::vector<int64_t> rows_of(n * k, -1);
  std::vector<int64_t> filled(n, 0);
  for (int64_t r = 0; r < p; ++r) {
    const int64_t t = pair_of_row[r] / k;
    rows_of[t * k + filled[t]++] = r;
  }
  const float* yp = y.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  float* op = sum.data_ptr<float>();
  at::parallel_for(0, n, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t j = 0; j < filled[t]; ++j) {
        const int64_t r = rows_of[t * k + j];
        const float w = wp[pair_of_row[r]];
        for (int64_t c = 0; c < H; ++c) op[t * H + c] += yp[r * H + c] * w;
      }
  });
  return {x.scalar_type() == at::kFloat ? sum : sum.to(x.scalar_type()), counts_t};
}

}  // namespace

bool has_panel_linear() { return true; }

bool has_bf16_panels() {
#ifdef SHUTTLE_BF16_PANELS
  return true;
#else
  return false;
#endif
}

// x [M, K], panels (float32 [N/8, K, 8] or bfloat16 [N/16, K/2, 32], x of the same dtype) → [M, N]
at::Tensor panel_linear(at::Tensor x, at::Tensor panels) {
  TORCH_CHECK(x.dim() == 2, "panel_linear: expected x [M, K], got ", x.sizes());
  const bool bf16 = bf16_panels(panels, x.size(1), "panel_linear");
  check_rows(x, bf16 ? at::kBFloat16 : at::kFloat, "panel_linear");
#ifdef SHUTTLE_BF16_PANELS
  if (bf16) return grouped_impl<BF16>(x, {x.size(0)}, {panels}, false, "panel_linear");
#endif
  return grouped_impl<F32>(x, {x.size(0)}, {panels}, false, "panel_linear");
}

// Every weight at once, each on its own rows: x [M, K], counts [W] summing to M, panels W × one format
// → [M, N] (row block w of x times weight w). `reverse` takes the weights last to first (the expert
// rank alternates, to start where the cache is warm).
at::Tensor grouped_panel_linear(at::Tensor x, std::vector<int64_t> counts, std::vector<at::Tensor> panels,
                                bool reverse) {
  TORCH_CHECK(!panels.empty(), "grouped_panel_linear: no weights");
  TORCH_CHECK(counts.size() == panels.size(),
              "grouped_panel_linear: one row count per weight (", counts.size(), " counts, ", panels.size(), " weights)");
  TORCH_CHECK(x.dim() == 2, "grouped_panel_linear: expected x [M, K], got ", x.sizes());
  const bool bf16 = bf16_panels(panels[0], x.size(1), "grouped_panel_linear");
  check_rows(x, bf16 ? at::kBFloat16 : at::kFloat, "grouped_panel_linear");
  int64_t rows = 0;
  for (size_t w = 0; w < counts.size(); ++w) {
    TORCH_CHECK(counts[w] >= 0, "grouped_panel_linear: negative row count ", counts[w], " for weight ", w);
    rows += counts[w];
  }
  TORCH_CHECK(rows == x.size(0), "grouped_panel_linear: row counts sum to ", rows, ", x has ", x.size(0), " rows");
#ifdef SHUTTLE_BF16_PANELS
  if (bf16) return grouped_impl<BF16>(x, counts, panels, reverse, "grouped_panel_linear");
#endif
  return grouped_impl<F32>(x, counts, panels, reverse, "grouped_panel_linear");
}

// A whole expert layer of one expert rank, in one call (decode-sized batches pay ~20 torch op
// dispatches per layer otherwise). Legend: n tokens, k experts per token, H hidden, I expert width,
// X local experts, p (token, local expert) pairs.
// x [n, H] float32 or bfloat16; local [n, k] int64: each pair's local expert, -1 where the expert
// lives elsewhere; weights [n, k] float32 routing weights; up X × panels of [2I, H] (gate rows, then
// up rows), down X × panels of [H, I], in x's dtype. Pairs are grouped by local expert (stable: token
// order within an expert), each expert runs its rows (up, SiLU(gate)·up, down), and each token's rows
// are summed, weighted, in that order: the sums of ExpertShard's torch path, in float32 (bfloat16: the
// SiLU·up activations are rounded to bfloat16 for the down projection, the output once at the end).
// Returns (out [n, H] in x's dtype, counts [X] as int64).
std::tuple<at::Tensor, at::Tensor> moe_ffn(at::Tensor x, at::Tensor local, at::Tensor weights, std::vector<at::Tensor> up,
                                           std::vector<at::Tensor> down, bool reverse) {
  TORCH_CHECK(x.dim() == 2, "moe_ffn: expected x [n, H], got ", x.sizes());
  TORCH_CHECK(!up.empty() && down.size() == up.size(), "moe_ffn: one up and one down weight per local expert");
  const bool bf16 = bf16_panels(up[0], x.size(1), "moe_ffn (up)");
  check_rows(x, bf16 ? at::kBFloat16 : at::kFloat, "moe_ffn");
  TORCH_CHECK(local.dim() == 2 && local.size(0) == x.size(0) && local.scalar_type() == at::kLong && local.is_contiguous() &&
              local.device().is_cpu(), "moe_ffn: expected local expert ids [n, k] int64 on the CPU");
  TORCH_CHECK(weights.sizes() == local.sizes() && weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
              weights.device().is_cpu(), "moe_ffn: expected routing weights [n, k] float32 like the ids");
#ifdef SHUTTLE_BF16_PANELS
  if (bf16) return moe_ffn_impl<BF16>(x, local, weights, up, down, reverse);
#endif
  return moe_ffn_impl<F32>(x, local, weights, up, down, reverse);
}

#else  // no AVX2/FMA: Linear keeps oneDNN (models/linear.py asks has_panel_linear first)

bool has_panel_linear() { return false; }
bool has_bf16_panels() { return false; }

at::Tensor panel_linear(at::Tensor x, at::Tensor panels) {
  TORCH_CHECK(false, "panel_linear: this build has no AVX2/FMA");
  return x;
}

at::Tensor grouped_panel_linear(at::Tensor x, std::vector<int64_t>, std::vector<at::Tensor>, bool) {
  TORCH_CHECK(false, "grouped_panel_linear: this build has no AVX2/FMA");
  return x;
}

std::tuple<at::Tensor, at::Tensor> moe_ffn(at::Tensor x, at::Tensor, at::Tensor, std::vector<at::Tensor>,
                                           std::vector<at::Tensor>, bool) {
  TORCH_CHECK(false, "moe_ffn: this build has no AVX2/FMA");
  return {x, x};
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (CPU, float32 or bfloat16)");
  m.def("panel_linear", &panel_linear, "x · Wᵀ for a weight packed into column panels (CPU, float32 or bfloat16)");
  m.def("grouped_panel_linear", &grouped_panel_linear,
        "row blocks of x times their own panel-packed weights, all in one parallel region (CPU)");
  m.def("moe_ffn", &moe_ffn, "one expert rank's whole expert layer: group by expert, up, SiLU·up, down, weighted sum "
        "per token (CPU, float32 or bfloat16)");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, rounded as Hugging Face's (CPU, float32 or bfloat16)");
  m.def("rotary", &rotary, "rotary position embedding, rotate_half convention (CPU, float32 or bfloat16)");
  m.def("row_max", &row_max, "(amax, argmax) of each row, NaN first as torch's (CPU, float32)");
  m.def("kv_write", &kv_write, "write new K and V rows into a paged cache layer (CPU, float32 or bfloat16)");
  m.def("has_panel_linear", &has_panel_linear, "whether panel_linear was built (AVX2 and FMA)");
  m.def("has_bf16_panels", &has_bf16_panels, "whether bfloat16 panels were built (AVX-512 BF16)");
}
