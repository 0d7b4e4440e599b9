// Shuttle's CPU kernels (float32), built on first use by torch.utils.cpp_extension
// (models/cpu_kernels.py, which says why each exists and what it measured):
//  - paged_decode: decode attention straight from the paged KV cache; each (sequence, KV head)
//    walks its own block table and reads each cached K and V row once, only up to its own length.
//  - panel_linear: y = x · Wᵀ for a weight packed once into 8-column panels, the few-to-some rows
//    (1-256) that decode and chunked prefill multiply by expert and projection weights.
//
// Legend (paged_decode): B decode sequences, g KV heads, r query heads per KV head, d head dim,
// S cache slots, nb block-table width, L_b the context length of sequence b.

// The few headers used, not <torch/extension.h> (all of torch's C++ API): the first build takes
// ~16 s instead of ~36 on the 2-core VM.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>
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
at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor blocks,
                           at::Tensor lens, int64_t block_size, double scale) {
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
  auto scores = at::empty({B, g, r, max_len}, q.options());
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
  auto out = at::zeros_like(q);
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
// k), so one AVX register load gives W[8j..8j+7, k]. Threads split the panels; each streams its
// panels from memory once, the row tiles after the first finding them in cache.
//  - up to 8 rows (decode): one tile of 8 accumulators per panel: a single pass, so the FMAs hide
//    under the weight stream (the product is bound by memory bandwidth here);
//  - more rows: tiles of up to 6 rows over two neighbouring panels (16 columns: 12 accumulators, the
//    most AVX2's 16 registers hold beside the two weight vectors and a broadcast), with the rows
//    spread evenly over the tiles. 8 accumulators cannot hide the FMA latency (2 units × 4-5 cycles)
//    and need a broadcast per FMA; 12 can, with a broadcast per 2 FMAs. Expert FFN products, both
//    cores: +12-40% over 8-row tiles from 9 to 256 rows (e.g. 38 rows 142 → 157-169 GFLOP/s).

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

// Both tiles are inlined into panel_linear's switches: called through a pointer, GCC spilled the
// accumulators to the stack on every k (2.3x slower).
template <int M>
__attribute__((always_inline)) inline void panel_tile(const float* __restrict__ x, int64_t K, const float* __restrict__ p,
                                                      float* __restrict__ y, int64_t ldy) {
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w = _mm256_loadu_ps(p + k * 8);
    for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * K + k), w, acc[m]);
  }
  for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy, acc[m]);
}

// M rows × 16 columns: panels p0 and p1 = p0 + 8K side by side.
template <int M>
__attribute__((always_inline)) inline void pair_tile(const float* __restrict__ x, int64_t K, const float* __restrict__ p0,
                                                     float* __restrict__ y, int64_t ldy) {
  const float* __restrict__ p1 = p0 + K * 8;
  __m256 a0[M], a1[M];
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(p0 + k * 8), w1 = _mm256_loadu_ps(p1 + k * 8);
    for (int m = 0; m < M; ++m) {
      const __m256 b = _mm256_broadcast_ss(x + m * K + k);
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
__attribute__((always_inline)) inline void tile(bool pair, int64_t rows, const float* x, int64_t K, const float* p,
                                                float* y, int64_t ldy) {
  if (pair) {
    switch (rows) {
      case 6: pair_tile<6>(x, K, p, y, ldy); break;
      case 5: pair_tile<5>(x, K, p, y, ldy); break;
      case 4: pair_tile<4>(x, K, p, y, ldy); break;
      case 3: pair_tile<3>(x, K, p, y, ldy); break;
      case 2: pair_tile<2>(x, K, p, y, ldy); break;
      default: pair_tile<1>(x, K, p, y, ldy);
    }
    return;
  }
  switch (rows) {
    case 8: panel_tile<8>(x, K, p, y, ldy); break;
    case 7: panel_tile<7>(x, K, p, y, ldy); break;
    case 6: panel_tile<6>(x, K, p, y, ldy); break;
    case 5: panel_tile<5>(x, K, p, y, ldy); break;
    case 4: panel_tile<4>(x, K, p, y, ldy); break;
    case 3: panel_tile<3>(x, K, p, y, ldy); break;
    case 2: panel_tile<2>(x, K, p, y, ldy); break;
    default: panel_tile<1>(x, K, p, y, ldy);
  }
}

// All row tiles of panel j (and j + 1 when `pair`) for the M rows of x: one unit of work.
inline void panel_unit(const float* x, int64_t M, int64_t K, const float* panels, int64_t j, bool pair, float* y,
                       int64_t ldy) {
  const int64_t cap = pair ? 6 : 8, tiles = (M + cap - 1) / cap;
  for (int64_t m0 = 0, t = 0; m0 < M; ++t) {
    const int64_t rows = pair ? (M - m0 + tiles - t - 1) / (tiles - t) : std::min<int64_t>(8, M - m0);
    tile(pair, rows, x + m0 * K, K, panels + j * K * 8, y + m0 * ldy + j * 8, ldy);
    m0 += rows;
  }
}

// Panel j (and j+1 when `pair`) of weight `weight`, for all of that weight's rows.
struct Unit {
  int64_t weight, j;
  bool pair;
};

void check_panels(const at::Tensor& panels, int64_t K, const char* what) {
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == 8 && panels.size(1) == K, what,
              ": expected panels [N/8, K, 8] with K = ", K, ", got ", panels.sizes());
  TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.is_contiguous() && panels.device().is_cpu(), what,
              ": contiguous float32 CPU panels only");
}

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), what,
              ": expected a contiguous float32 CPU x [M, K]");
}

// Row block w of x (counts[w] rows, blocks in order) times weight w (panels at weight[w], P of them):
// y [M, P·8]. One parallel region for all the weights, split so that each thread gets an equal
// share of the estimated time: a unit (a panel or a pair) costs its weight stream (~6 rows' worth of
// FMAs at memory speed) plus its rows. `reverse` takes the weights last to first.
void run_units(const float* xp, int64_t K, int64_t P, const std::vector<int64_t>& counts,
               const std::vector<const float*>& weight, bool reverse, float* yp) {
  const int64_t ldy = P * 8;
  std::vector<int64_t> first(counts.size() + 1, 0);
  for (size_t w = 0; w < counts.size(); ++w) first[w + 1] = first[w] + counts[w];
  std::vector<Unit> units;
  std::vector<double> cost{0.0};                   // prefix sums of the units' estimated time
  for (size_t i = 0; i < counts.size(); ++i) {
    const int64_t w = reverse ? counts.size() - 1 - i : i;
    if (counts[w] == 0) continue;
    const int64_t width = counts[w] > 8 ? 2 : 1;
    for (int64_t j = 0; j < P; j += width) {
      const bool pair = width == 2 && j + 1 < P;
      units.push_back({w, j, pair});
      cost.push_back(cost.back() + (pair ? 2 : 1) * (6.0 + counts[w]));
    }
  }
  if (units.empty()) return;
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
      panel_unit(xp + first[n.weight] * K, counts[n.weight], K, weight[n.weight], n.j, n.pair, yp + first[n.weight] * ldy,
                 ldy);
    }
  });
}

}  // namespace

bool has_panel_linear() { return true; }

// x [M, K], panels [N/8, K, 8] → [M, N]
at::Tensor panel_linear(at::Tensor x, at::Tensor panels) {
  check_rows(x, "panel_linear");
  check_panels(panels, x.size(1), "panel_linear");
  auto y = at::empty({x.size(0), panels.size(0) * 8}, x.options());
  run_units(x.data_ptr<float>(), x.size(1), panels.size(0), {x.size(0)}, {panels.data_ptr<float>()}, false,
            y.data_ptr<float>());
  return y;
}

// Every weight at once, each on its own rows: x [M, K], counts [W] summing to M, panels W × [N/8, K, 8]
// → [M, N] (row block w of x times weight w). `reverse` takes the weights last to first (the expert
// rank alternates, to start where the cache is warm).
at::Tensor grouped_panel_linear(at::Tensor x, std::vector<int64_t> counts, std::vector<at::Tensor> panels,
                                bool reverse) {
  check_rows(x, "grouped_panel_linear");
  TORCH_CHECK(!panels.empty(), "grouped_panel_linear: no weights");
  TORCH_CHECK(counts.size() == panels.size(),
              "grouped_panel_linear: one row count per weight (", counts.size(), " counts, ", panels.size(), " weights)");
  const int64_t M = x.size(0), K = x.size(1);
  check_panels(panels[0], K, "grouped_panel_linear");
  const int64_t P = panels[0].size(0);
  std::vector<const float*> weight(counts.size());
  int64_t rows = 0;
  for (size_t w = 0; w < counts.size(); ++w) {
    TORCH_CHECK(counts[w] >= 0, "grouped_panel_linear: negative row count ", counts[w], " for weight ", w);
    rows += counts[w];
    check_panels(panels[w], K, "grouped_panel_linear");
    TORCH_CHECK(panels[w].size(0) == P, "grouped_panel_linear: weight ", w, " has ", panels[w].size(0) * 8,
                " outputs, weight 0 has ", P * 8);
    weight[w] = panels[w].data_ptr<float>();
  }
  TORCH_CHECK(rows == M, "grouped_panel_linear: row counts sum to ", rows, ", x has ", M, " rows");
  auto y = at::empty({M, P * 8}, x.options());
  run_units(x.data_ptr<float>(), K, P, counts, weight, reverse, y.data_ptr<float>());
  return y;
}

// A whole expert layer of one expert rank, in one call (decode-sized batches pay ~20 torch op
// dispatches per layer otherwise). Legend: n tokens, k experts per token, H hidden, I expert width,
// X local experts, p (token, local expert) pairs.
// x [n, H]; local [n, k] int64: each pair's local expert, -1 where the expert lives elsewhere;
// weights [n, k] float32 routing weights; up X × panels of [2I, H] (gate rows, then up rows), down
// X × panels of [H, I]. Pairs are grouped by local expert (stable: token order within an expert),
// each expert runs its rows (up, SiLU(gate)·up, down), and each token's rows are summed, weighted,
// in that order: the sums of ExpertShard's torch path. Returns (out [n, H], counts [X] as int64).
std::tuple<at::Tensor, at::Tensor> moe_ffn(at::Tensor x, at::Tensor local, at::Tensor weights, std::vector<at::Tensor> up,
                                           std::vector<at::Tensor> down, bool reverse) {
  check_rows(x, "moe_ffn");
  const int64_t n = x.size(0), H = x.size(1), X = up.size();
  TORCH_CHECK(X > 0 && down.size() == up.size(), "moe_ffn: one up and one down weight per local expert");
  TORCH_CHECK(local.dim() == 2 && local.size(0) == n && local.scalar_type() == at::kLong && local.is_contiguous() &&
              local.device().is_cpu(), "moe_ffn: expected local expert ids [n, k] int64 on the CPU");
  const int64_t k = local.size(1);
  TORCH_CHECK(weights.sizes() == local.sizes() && weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
              weights.device().is_cpu(), "moe_ffn: expected routing weights [n, k] float32 like the ids");
  check_panels(up[0], H, "moe_ffn (up)");
  const int64_t P_up = up[0].size(0), I = P_up * 4;
  check_panels(down[0], I, "moe_ffn (down)");
  TORCH_CHECK(down[0].size(0) * 8 == H, "moe_ffn: down projections give ", down[0].size(0) * 8, " outputs, not H = ", H);
  std::vector<const float*> up_w(X), down_w(X);
  for (int64_t e = 0; e < X; ++e) {
    check_panels(up[e], H, "moe_ffn (up)");
    check_panels(down[e], I, "moe_ffn (down)");
    TORCH_CHECK(up[e].size(0) == P_up && down[e].size(0) * 8 == H, "moe_ffn: expert ", e, " has other shapes than expert 0");
    up_w[e] = up[e].data_ptr<float>();
    down_w[e] = down[e].data_ptr<float>();
  }
  const int64_t* ids = local.data_ptr<int64_t>();
  auto counts_t = at::zeros({X}, local.options());
  int64_t* counts = counts_t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n * k; ++i) {
    TORCH_CHECK(ids[i] < X, "moe_ffn: local expert id ", ids[i], " out of range for ", X, " experts");
    if (ids[i] >= 0) ++counts[ids[i]];
  }
  std::vector<int64_t> first(X + 1, 0);
  for (int64_t e = 0; e < X; ++e) first[e + 1] = first[e] + counts[e];
  const int64_t p = first[X];
  std::vector<int64_t> pair_of_row(p);                      // row → pair index (token · k + slot)
  {
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < n * k; ++i)
      if (ids[i] >= 0) pair_of_row[next[ids[i]]++] = i;
  }
  auto out = at::zeros({n, H}, x.options());
  if (p == 0) return {out, counts_t};
  const float* xp = x.data_ptr<float>();
  auto xs = at::empty({p, H}, x.options());
  float* xsp = xs.data_ptr<float>();
  at::parallel_for(0, p, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) std::copy(xp + (pair_of_row[r] / k) * H, xp + (pair_of_row[r] / k + 1) * H, xsp + r * H);
  });
  std::vector<int64_t> cnt(counts, counts + X);
  auto h = at::empty({p, 2 * I}, x.options());
  run_units(xsp, H, P_up, cnt, up_w, reverse, h.data_ptr<float>());
  auto a = at::empty({p, I}, x.options());
  const float* hp = h.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  at::parallel_for(0, p, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = hp + r * 2 * I;
      for (int64_t i = 0; i < I; ++i) ap[r * I + i] = g[i] / (1.0f + std::exp(-g[i])) * g[I + i];
    }
  });
  auto y = at::empty({p, H}, x.options());
  run_units(ap, I, H / 8, cnt, down_w, reverse, y.data_ptr<float>());
  // Each token's rows, in row order (expert order), weighted and summed into its output row.
  std::vector<int64_t> rows_of(n * k, -1);
  std::vector<int64_t> filled(n, 0);
  for (int64_t r = 0; r < p; ++r) {
    const int64_t t = pair_of_row[r] / k;
    rows_of[t * k + filled[t]++] = r;
  }
  const float* yp = y.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t j = 0; j < filled[t]; ++j) {
        const int64_t r = rows_of[t * k + j];
        const float w = wp[pair_of_row[r]];
        for (int64_t c = 0; c < H; ++c) op[t * H + c] += yp[r * H + c] * w;
      }
  });
  return {out, counts_t};
}

#else  // no AVX2/FMA: Linear keeps oneDNN (models/linear.py asks has_panel_linear first)

bool has_panel_linear() { return false; }

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
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (CPU, float32)");
  m.def("panel_linear", &panel_linear, "x · Wᵀ for a weight packed into [N/8, K, 8] panels (CPU, float32)");
  m.def("grouped_panel_linear", &grouped_panel_linear,
        "row blocks of x times their own panel-packed weights, all in one parallel region (CPU, float32)");
  m.def("moe_ffn", &moe_ffn, "one expert rank's whole expert layer: group by expert, up, SiLU·up, down, weighted sum "
        "per token (CPU, float32)");
  m.def("has_panel_linear", &has_panel_linear, "whether panel_linear was built (AVX2 and FMA)");
}
