// Few-row matrix products on weights packed into column panels, and the expert layer built on them
// (kernels.h lists the files).

#include "kernels.h"

#include "tiles.h"

#if defined(__AVX2__) && defined(__FMA__)

namespace {

// a[r, i] = SiLU(h[r, i]) · h[r, I + i] for the p rows of h [p, 2I] (gate, then up), into float or bfloat16.
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
    TORCH_CHECK(panels.scalar_type() == at::kFloat && panels.dim() == 3 && panels.size(2) == F32::kCols && panels.size(1) == K,
                what, ": expected float32 panels [N/", F32::kCols, ", K, ", F32::kCols,
                "] or bfloat16 panels [N/16, K/2, 32] with K = ", K, ", got ", panels.scalar_type(), " ", panels.sizes());
  }
  TORCH_CHECK(panels.is_contiguous() && panels.device().is_cpu(), what, ": contiguous CPU panels only");
  return bf16;
}

// One unit of F's tiles, out of line: run_units and some_impl both call this copy, so the columns
// some_impl recomputes come from the same machine code as the whole product's, bit for bit.
template <class F, typename Y>
__attribute__((noinline)) void run_unit(const typename F::X* x, int64_t M, int64_t K, const typename F::W* panels,
                                        int64_t j, bool pair, Y* y, int64_t ldy, Ahead& ahead) {
  F::unit(x, M, K, panels, j, pair, y, ldy, ahead);
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
  Scratch<typename F::X> packed;
  const auto xw = F::blocks(xp, K, counts, first, packed);
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
    const int64_t last = bound(end);
    for (int64_t u = bound(begin); u < last; ++u) {
      const Unit& n = units[u];
      Ahead ahead;
      if (u + 1 < last && counts[units[u + 1].weight] >= 4) {   // few rows: the stream is the tile itself
        const Unit& m = units[u + 1];
        ahead.p = reinterpret_cast<const char*>(weight[m.weight] + m.j * K * F::kCols);
        ahead.left = (m.pair ? 2 : 1) * K * F::kCols * int64_t(sizeof(typename F::W)) / 64;
      }
      run_unit<F>(xw[n.weight], counts[n.weight], K, weight[n.weight], n.j, n.pair, yp + first[n.weight] * ldy, ldy, ahead);
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

// Some panels' columns only, each computed by the unit and tile that grouped_impl over every panel
// computes it with (a pair of panels where M rows make units of two, one panel otherwise; the same x
// layout), so bit for bit panel_linear's columns: the exact LM head rows of the screened greedy pick.
template <class F>
at::Tensor some_impl(const at::Tensor& x, const at::Tensor& panels, const std::vector<int64_t>& ids) {
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0), c = F::kCols;
  const auto weight = panel_pointers<F>({panels}, K, "panel_linear_some");
  Scratch<typename F::X> packed;
  const auto xw = F::blocks(reinterpret_cast<const typename F::X*>(x.data_ptr()), K, {M}, {0, M}, packed);
  auto full = at::empty({M, P * c}, x.options());               // only the units computed are written
  auto* yp = full.template data_ptr<typename F::Out>();
  const bool pairs = M > F::kUnitRows;
  std::vector<int64_t> units;                                    // each unit's first panel, once
  for (const int64_t p : ids) {
    TORCH_CHECK(p >= 0 && p < P, "panel_linear_some: panel ", p, " out of range for ", P, " panels");
    const int64_t j = pairs ? p - p % 2 : p;
    if (units.empty() || units.back() != j) units.push_back(j);
  }
  at::parallel_for(0, units.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      Ahead none;
      run_unit<F>(xw[0], M, K, weight[0], units[u], pairs && units[u] + 1 < P, yp, P * c, none);
    }
  });
  auto out = at::empty({M, int64_t(ids.size()) * c}, x.options());
  auto* op = out.template data_ptr<typename F::Out>();
  for (int64_t m = 0; m < M; ++m)
    for (size_t i = 0; i < ids.size(); ++i)
      std::copy(yp + m * P * c + ids[i] * c, yp + m * P * c + (ids[i] + 1) * c, op + (m * int64_t(ids.size()) + i) * c);
  return out;
}

// A whole expert layer of one expert rank (see moe_ffn below), on panels of format F.
template <class F>
std::tuple<at::Tensor, at::Tensor> moe_ffn_impl(const at::Tensor& x, const at::Tensor& local, const at::Tensor& weights,
                                                const std::vector<at::Tensor>& up, const std::vector<at::Tensor>& down,
                                                bool reverse, at::Tensor* residual) {
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
  if (p == 0) {
    if (residual != nullptr) return {*residual, counts_t};      // h + 0 is h (up to the sign of a zero)
    return {x.scalar_type() == at::kFloat ? sum : sum.to(x.scalar_type()), counts_t};
  }
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
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  float* rf = residual != nullptr && !bf16 ? residual->data_ptr<float>() : nullptr;
  c10::BFloat16* rb = residual != nullptr && bf16 ? residual->data_ptr<c10::BFloat16>() : nullptr;
  at::parallel_for(0, n, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* ot = op + t * H;
      for (int64_t j = 0; j < filled[t]; ++j) {
        const int64_t r = rows_of[t * k + j];
        const float w = wp[pair_of_row[r]];
        for (int64_t c = 0; c < H; ++c) ot[c] += yp[r * H + c] * w;
      }
      // residual += out, rounded as torch's add of the output in x's dtype rounds it
      if (rf != nullptr)
        for (int64_t c = 0; c < H; ++c) rf[t * H + c] += ot[c];
      else if (rb != nullptr)
        for (int64_t c = 0; c < H; ++c)
          rb[t * H + c] = c10::BFloat16(static_cast<float>(rb[t * H + c]) + static_cast<float>(c10::BFloat16(ot[c])));
    }
  });
  if (residual != nullptr) return {*residual, counts_t};
  return {bf16 ? sum.to(x.scalar_type()) : sum, counts_t};
}

}  // namespace

bool has_panel_linear() { return true; }
int64_t float_panel_cols() { return F32::kCols; }

bool has_bf16_panels() {
#ifdef SHUTTLE_BF16_PANELS
  return true;
#else
  return false;
#endif
}

// x [M, K], panels (float32 [N/c, K, c] with c = float_panel_cols(), or bfloat16 [N/16, K/2, 32], x of the same dtype) → [M, N]
at::Tensor panel_linear(at::Tensor x, at::Tensor panels) {
  TORCH_CHECK(x.dim() == 2, "panel_linear: expected x [M, K], got ", x.sizes());
  const bool bf16 = bf16_panels(panels, x.size(1), "panel_linear");
  check_rows(x, bf16 ? at::kBFloat16 : at::kFloat, "panel_linear");
#ifdef SHUTTLE_BF16_PANELS
  if (bf16) return grouped_impl<BF16>(x, {x.size(0)}, {panels}, false, "panel_linear");
#endif
  return grouped_impl<F32>(x, {x.size(0)}, {panels}, false, "panel_linear");
}

// panel_linear's columns of the panels `ids` (ascending) only: x [M, K] → [M, ids.size() · c], bit for
// bit the same values (each computed by the same unit and tile).
at::Tensor panel_linear_some(const at::Tensor& x, const at::Tensor& panels, const std::vector<int64_t>& ids) {
  TORCH_CHECK(x.dim() == 2, "panel_linear_some: expected x [M, K], got ", x.sizes());
  TORCH_CHECK(std::is_sorted(ids.begin(), ids.end()) && std::adjacent_find(ids.begin(), ids.end()) == ids.end(),
              "panel_linear_some: panel ids must ascend");
  const bool bf16 = bf16_panels(panels, x.size(1), "panel_linear_some");
  check_rows(x, bf16 ? at::kBFloat16 : at::kFloat, "panel_linear_some");
#ifdef SHUTTLE_BF16_PANELS
  if (bf16) return some_impl<BF16>(x, panels, ids);
#endif
  return some_impl<F32>(x, panels, ids);
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
  return moe_ffn_add(x, local, weights, up, down, reverse, nullptr);
}

std::tuple<at::Tensor, at::Tensor> moe_ffn_add(const at::Tensor& x, const at::Tensor& local, const at::Tensor& weights,
                                               const std::vector<at::Tensor>& up, const std::vector<at::Tensor>& down,
                                               bool reverse, at::Tensor* residual) {
  TORCH_CHECK(x.dim() == 2, "moe_ffn: expected x [n, H], got ", x.sizes());
  TORCH_CHECK(!up.empty() && down.size() == up.size(), "moe_ffn: one up and one down weight per local expert");
  const bool bf16 = bf16_panels(up[0], x.size(1), "moe_ffn (up)");
  check_rows(x, bf16 ? at::kBFloat16 : at::kFloat, "moe_ffn");
  TORCH_CHECK(local.dim() == 2 && local.size(0) == x.size(0) && local.scalar_type() == at::kLong && local.is_contiguous() &&
              local.device().is_cpu(), "moe_ffn: expected local expert ids [n, k] int64 on the CPU");
  TORCH_CHECK(weights.sizes() == local.sizes() && weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
              weights.device().is_cpu(), "moe_ffn: expected routing weights [n, k] float32 like the ids");
  TORCH_CHECK(residual == nullptr || (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                                       residual->is_contiguous()), "moe_ffn: the residual must be a contiguous tensor like x");
#ifdef SHUTTLE_BF16_PANELS
  if (bf16) return moe_ffn_impl<BF16>(x, local, weights, up, down, reverse, residual);
#endif
  return moe_ffn_impl<F32>(x, local, weights, up, down, reverse, residual);
}

#else  // no AVX2/FMA: Linear keeps oneDNN (models/linear.py asks has_panel_linear first)

bool has_panel_linear() { return false; }
int64_t float_panel_cols() { return 0; }
bool has_bf16_panels() { return false; }

at::Tensor panel_linear(at::Tensor x, at::Tensor panels) {
  TORCH_CHECK(false, "panel_linear: this build has no AVX2/FMA");
  return x;
}

at::Tensor panel_linear_some(const at::Tensor& x, const at::Tensor&, const std::vector<int64_t>&) {
  TORCH_CHECK(false, "panel_linear_some: this build has no AVX2/FMA");
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

std::tuple<at::Tensor, at::Tensor> moe_ffn_add(const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                                               const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, bool,
                                               at::Tensor*) {
  TORCH_CHECK(false, "moe_ffn: this build has no AVX2/FMA");
  return {x, x};
}

#endif
