// Shuttle's CPU kernels (float32), built on first use by torch.utils.cpp_extension
// (models/cpu_kernels.py, which says why each exists and what it measured):
//  - paged_decode: decode attention straight from the paged KV cache; each (sequence, KV head)
//    walks its own block table and reads each cached K and V row once, only up to its own length.
//  - panel_linear: y = x · Wᵀ for a weight packed once into 8-column panels, the few-to-some rows
//    (1-256) that decode and chunked prefill multiply by expert and projection weights.
//
// Legend (paged_decode): B decode sequences, g KV heads, r query heads per KV head, d head dim,
// S cache slots, nb block-table width, L_b the context length of sequence b.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

namespace {

// Ask for the next block of one head before its rows are needed: blocks sit at random places in
// the cache, so the hardware prefetcher (which stops at page boundaries) does not see them coming.
inline void prefetch_block(const float* p, int64_t floats) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < floats * int64_t(sizeof(float)); i += 64) __builtin_prefetch(c + i);
#endif
}

// Calls row(l, K or V row) for positions l = 0..L-1 of one sequence in one KV head's slot array,
// through the sequence's block table, asking for each next block while the current one is read.
template <typename Row>
inline void for_each_cached_row(const float* head, const int64_t* table, int64_t L, int64_t block_size, int64_t d,
                                Row&& row) {
  for (int64_t l0 = 0; l0 < L; l0 += block_size) {
    const float* block = head + table[l0 / block_size] * block_size * d;
    if (l0 + block_size < L) prefetch_block(head + table[l0 / block_size + 1] * block_size * d, block_size * d);
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

}  // namespace

// q [B, g, r, d], k_cache / v_cache [g, S, d] (one layer), blocks [B, nb] int64, lens [B] int64
// → out [B, g, r, d] = softmax(q·Kᵀ·scale) · V over each sequence's first L_b cached positions.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor blocks,
                           torch::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 3 && v_cache.dim() == 3 && blocks.dim() == 2 && lens.dim() == 1,
              "paged_decode: expected q [B, g, r, d], caches [g, S, d], blocks [B, nb], lens [B]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "paged_decode: float32 only");
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
  auto scores = torch::empty({B, g, r, max_len}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* sp = scores.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // scores[b, h, j, l] = q[b, h, j] · K[h, slot(b, l)] · scale; -inf past L_b
  for_each_sequence_head(B, g, [&](int64_t i, int64_t b, int64_t h) {
    const float* qi = qp + i * r * d;
    float* si = sp + i * r * max_len;
    for_each_cached_row(kp + h * S * d, bt + b * nb, lp[b], block_size, d, [&](int64_t l, const float* __restrict__ kr) {
      for (int64_t j = 0; j < r; ++j) {
        const float* __restrict__ qj = qi + j * d;
        float acc = 0.f;
        for (int64_t t = 0; t < d; ++t) acc += qj[t] * kr[t];
        si[j * max_len + l] = acc * sc;
      }
    });
    for (int64_t j = 0; j < r; ++j) std::fill(si + j * max_len + lp[b], si + (j + 1) * max_len, neg_inf);
  });

  auto probs = scores.softmax(-1);
  auto out = torch::zeros_like(q);
  const float* pp = probs.data_ptr<float>();
  float* op = out.data_ptr<float>();

  // out[b, h, j] = Σ_l probs[b, h, j, l] · V[h, slot(b, l)]
  for_each_sequence_head(B, g, [&](int64_t i, int64_t b, int64_t h) {
    const float* pi = pp + i * r * max_len;
    float* oi = op + i * r * d;
    for_each_cached_row(vp + h * S * d, bt + b * nb, lp[b], block_size, d, [&](int64_t l, const float* __restrict__ vr) {
      for (int64_t j = 0; j < r; ++j) {
        const float p = pi[j * max_len + l];
        float* __restrict__ oj = oi + j * d;
        for (int64_t t = 0; t < d; ++t) oj[t] += p * vr[t];
      }
    });
  });
  return out;
}

// ---- panel_linear ------------------------------------------------------------------------------
// The weight W [N, K] is stored as panels [N/8, K, 8] (panel j holds rows 8j..8j+7, interleaved by
// k), so one AVX register load gives W[8j..8j+7, k]. A tile of up to 8 rows of x keeps 8 accumulators
// [8 outputs each] in registers and streams its panel once; the panel (K · 32 bytes) stays in the L1
// cache for the next tile. Threads split the panels.

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

// Inlined into panel_linear's switch: called through a pointer, GCC spilled the accumulators to the
// stack on every k (2.3x slower).
template <int M>
__attribute__((always_inline)) inline void panel_tile(const float* __restrict__ x, int64_t K, const float* __restrict__ p, float* __restrict__ y,
                       int64_t ldy) {
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w = _mm256_loadu_ps(p + k * 8);
    for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * K + k), w, acc[m]);
  }
  for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy, acc[m]);
}

}  // namespace

bool has_panel_linear() { return true; }

// x [M, K], panels [N/8, K, 8] → [M, N]
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels) {
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3 && panels.size(2) == 8 && x.size(1) == panels.size(1),
              "panel_linear: expected x [M, K] and panels [N/8, K, 8]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat, "panel_linear: float32 only");
  TORCH_CHECK(x.is_contiguous() && panels.is_contiguous(), "panel_linear: contiguous tensors only");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  auto y = torch::empty({M, P * 8}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const float* xt = xp + m0 * K;
        const float* pj = pp + j * K * 8;
        float* yt = yp + m0 * P * 8 + j * 8;
        switch (std::min<int64_t>(8, M - m0)) {
          case 8: panel_tile<8>(xt, K, pj, yt, P * 8); break;
          case 7: panel_tile<7>(xt, K, pj, yt, P * 8); break;
          case 6: panel_tile<6>(xt, K, pj, yt, P * 8); break;
          case 5: panel_tile<5>(xt, K, pj, yt, P * 8); break;
          case 4: panel_tile<4>(xt, K, pj, yt, P * 8); break;
          case 3: panel_tile<3>(xt, K, pj, yt, P * 8); break;
          case 2: panel_tile<2>(xt, K, pj, yt, P * 8); break;
          default: panel_tile<1>(xt, K, pj, yt, P * 8);
        }
      }
    }
  });
  return y;
}

#else  // no AVX2/FMA: Linear keeps oneDNN (models/linear.py asks has_panel_linear first)

bool has_panel_linear() { return false; }

torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels) {
  TORCH_CHECK(false, "panel_linear: this build has no AVX2/FMA");
  return x;
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (CPU, float32)");
  m.def("panel_linear", &panel_linear, "x · Wᵀ for a weight packed into [N/8, K, 8] panels (CPU, float32)");
  m.def("has_panel_linear", &has_panel_linear, "whether panel_linear was built (AVX2 and FMA)");
}
