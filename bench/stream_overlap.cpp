// Does a weight stream overlap with the FMAs that use it? The question behind the float32 panel
// width (models/csrc/tiles.h, docs/performance.md "16-column float32 panels").
//
//     g++ -O3 -march=native bench/stream_overlap.cpp -o /tmp/stream_overlap && /tmp/stream_overlap
//
// One thread streams a 256 MB buffer (2 MB pages) and, per register of weights loaded, does R FMAs
// into R sums (R "rows" of a panel tile, each with its own broadcast), like a few-row panel product;
// then the same loop over a 1 MB buffer that stays in cache. If the stream overlaps the FMAs, the
// out-of-cache rate is the smaller of the in-cache rate and the memory's; if not, it is near their
// harmonic sum. "+ prefetch": one software prefetch 4 KB ahead per 64 bytes, as the AVX2 panel tile
// streams. Needs AVX-512 (the 16-wide rows).
// The effect is on a knife edge: the 8-wide 8-row loop overlaps without the prefetch instruction and
// does not with it (a few more instructions per byte in the reorder window), on this machine.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

namespace {

using Clock = std::chrono::steady_clock;

// W floats per register: 8 (AVX2, __m256) or 16 (AVX-512, __m512).
template <int W, int R, bool PF>
double pass(const float* p, size_t n, const float* x) {
  using V = typename std::conditional<W == 8, __m256, __m512>::type;   // NOLINT (alignment attributes)
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V{};
  const auto t0 = Clock::now();
  for (size_t i = 0; i < n; i += W) {
    const float* xi = x + ((i / W) & 63) * R;
    if (PF && (i & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + i) + 4096, _MM_HINT_T0);
    if constexpr (W == 8) {
      const __m256 w = _mm256_loadu_ps(p + i);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(xi + r), w, acc[r]);
    } else {
      const __m512 w = _mm512_loadu_ps(p + i);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xi[r]), w, acc[r]);
    }
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  float sink = 0;
  for (int r = 0; r < R; ++r) sink += reinterpret_cast<const float*>(&acc[r])[0];
  if (sink == 12345.f) std::puts("");      // keeps the sums alive
  return s;
}

template <int W, int R, bool PF = false>
void row(const float* big, size_t n_big, const float* small, size_t n_small, const float* x) {
  double out = 1e9, in = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    out = std::min(out, pass<W, R, PF>(big, n_big, x));
    double t = 0;
    for (size_t k = 0; k < n_big / n_small; ++k) t += pass<W, R, PF>(small, n_small, x);
    in = std::min(in, t);
  }
  const double bytes = 4.0 * n_big;
  std::printf("%2d-wide registers, %2d rows%s: out of cache %5.1f GB/s, in cache %5.1f GB/s (%3.0f GFLOP/s)\n", W, R,
              PF ? " + prefetch" : "           ", bytes / out / 1e9, bytes / in / 1e9, 2.0 * R * n_big / in / 1e9);
}

}  // namespace

int main() {
  const size_t big_bytes = 256ul << 20, small_bytes = 1ul << 20;
  float* big = static_cast<float*>(std::aligned_alloc(2 << 20, big_bytes));
  madvise(big, big_bytes, MADV_HUGEPAGE);
  float* small = static_cast<float*>(std::aligned_alloc(64, small_bytes));
  for (size_t i = 0; i < big_bytes / 4; ++i) big[i] = 1e-3f * (i & 7);
  for (size_t i = 0; i < small_bytes / 4; ++i) small[i] = 1e-3f;
  static float x[64 * 16];
  for (float& v : x) v = 1e-3f;
  const size_t nb = big_bytes / 4, ns = small_bytes / 4;
  row<8, 1>(big, nb, small, ns, x);
  row<8, 4>(big, nb, small, ns, x);
  row<8, 8>(big, nb, small, ns, x);
  row<8, 4, true>(big, nb, small, ns, x);
  row<8, 8, true>(big, nb, small, ns, x);
  row<16, 4>(big, nb, small, ns, x);
  row<16, 8>(big, nb, small, ns, x);
  row<16, 16>(big, nb, small, ns, x);
  row<16, 8, true>(big, nb, small, ns, x);
  return 0;
}
