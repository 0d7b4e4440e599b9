// Few-row matrix products on weights packed into column panels, and the expert layer built on them
// (kernels.h lists the files).

#include "kernels.h"

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
  // Where each weight's row block [counts[w], K] of x is read from: blocks of up to 8 rows transposed
  // into [K, counts[w]] in `buffer` (panel_unit reads them so), bigger blocks in place.
  static std::vector<const X*> blocks(const X* x, int64_t K, const std::vector<int64_t>& counts,
                                      const std::vector<int64_t>& first, std::vector<X>& buffer) {
    std::vector<const X*> at(counts.size());
    for (size_t w = 0; w < counts.size(); ++w) at[w] = x + first[w] * K;
    bool any = false;
    for (int64_t c : counts) any = any || (c > 0 && c <= 8);
    if (!any) return at;
    buffer.resize(first.back() * K);
    at::parallel_for(0, counts.size(), 1, [&](int64_t b, int64_t e) {
      for (int64_t w = b; w < e; ++w) {
        const int64_t M = counts[w];
        if (M == 0 || M > 8) continue;
        const X* src = x + first[w] * K;
        X* dst = buffer.data() + first[w] * K;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t k = 0; k < K; ++k) dst[k * M + m] = src[m * K + k];
        at[w] = dst;
      }
    });
    return at;
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
  static std::vector<const X*> blocks(const X* x, int64_t K, const std::vector<int64_t>& counts,
                                      const std::vector<int64_t>& first, std::vector<X>&) {
    std::vector<const X*> at(counts.size());   // rows as they are: each k pair of a row is one 32-bit broadcast
    for (size_t w = 0; w < counts.size(); ++w) at[w] = x + first[w] * K;
    return at;
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
    for (int64_t u = bound(begin); u < bound(end); ++u) {
      const Unit& n = units[u];
      F::unit(xw[n.weight], counts[n.weight], K, weight[n.weight], n.j, n.pair, yp + first[n.weight] * ldy, ldy);
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
