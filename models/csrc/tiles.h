// Register tiles of the panel products (panels.cpp drives them): the weight formats, the tiles
// for each, and the vector helpers they share. Included once, by panels.cpp.
#pragma once

#include "kernels.h"

// ---- panel_linear ------------------------------------------------------------------------------
// float32: the weight W [N, K] is stored as panels [N/c, K, c] (panel j holds rows cj..cj+c-1,
// interleaved by k), so one register load gives W[cj..cj+c-1, k]: c = 16 (one AVX-512 register)
// where the CPU has AVX-512, else 8 (AVX2). Threads split the panels; each streams its panels from
// memory once, the row tiles after the first finding them in cache.
//  - AVX-512: up to 3 rows one panel at a time (k unrolled into at least 4 sums), 4 or more rows over
//    two neighbouring panels (32 columns, one broadcast per two FMAs) in tiles of up to 12 rows
//    (24 sums of the 32 registers), rows spread evenly over the tiles;
//  - AVX2: up to 8 rows one panel at a time; more in tiles of up to 6 rows over panel pairs (12
//    sums, the most AVX2's 16 registers hold beside two weights and a broadcast).
// Measured in docs/performance.md: 16-column panels moved 8-row expert products out of cache from
// ~22 to ~30 GB/s on both cores (6-32 rows +20-40%; 1-2 rows within the noise). The row-count
// switches stay switches: one generic dispatch (a lambda per tile family) made the bfloat16
// 64-row products 3-4% slower.
// bfloat16 (where the CPU has AVX-512 BF16): W [N, K] as panels [N/16, K/2, 32]: panel j, pair kk
// holds W[16j + c, 2kk + e] at 2c + e, so one 64-byte load gives 16 columns × 2 k, which one
// vdpbf16ps multiplies by a broadcast pair (x[2kk], x[2kk + 1]) and adds into 16 float32 sums: half
// the bytes of float32 and twice the products per instruction. Tiles of up to 12 rows per panel; more
// than 8 rows over panel pairs (12-32 rows +20-30%).
// The AVX2 and bfloat16 tiles stream the weight with a software prefetch 4 KB ahead: with only the
// hardware prefetcher, 8-row AVX2 expert products out of cache ran at ~16 GB/s; with it ~21. The
// AVX-512 float32 tiles do without it (no difference measured). On AVX-512 (float32 and bfloat16) a
// unit of 4 or more rows also fetches the next unit's weight into L2, a line per weight load
// (`Ahead`), so a unit seldom starts on memory: 8 and 64 rows and the 64-row LM head 4-8% faster;
// with 1-2 rows it cost 7-9% (their tile is the stream already), so those units fetch nothing ahead.

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_ahead(const void* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// The next unit's weight, fetched into L2 a line at a time while this one computes (see the top).
struct Ahead {
  const char* p = nullptr;
  int64_t left = 0;
  inline void step() {
    if (left > 0) {
      _mm_prefetch(p, _MM_HINT_T1);
      p += 64;
      --left;
    }
  }
};

// A packed copy of x, left uninitialized (a std::vector would zero every byte first).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  T* get(int64_t n) {
    p.reset(new T[std::max<int64_t>(n, 1)]);
    return p.get();
  }
};

// One register of float32 columns, for the row tiles: 8 (AVX2, streaming with prefetch_ahead) or 16
// (AVX-512, which does without; see the top).
struct Ymm {
  using T = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kSums = 8;             // two FMAs a cycle, ~4 cycles each
  static constexpr bool kStreamPrefetch = true;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
};
#ifdef __AVX512F__
struct Zmm {
  using T = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kSums = 4;             // one FMA a cycle
  static constexpr bool kStreamPrefetch = false;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
};
#endif

// The tiles read element (m, k) of x at x[k·sk + m·sm]. Row blocks of up to 8 rows are packed
// transposed once per call (sk = M, sm = 1): the M values one k step broadcasts then sit in one or
// two cache lines instead of M rows K floats apart (8-row expert products out of cache, both cores:
// 34 → 25 ms for 8 layers' up projections). AVX2 reads bigger blocks in place (sk = 1, sm = K), where
// transposing a whole block cost more than it saved in prefill; AVX-512 packs them tile by tile
// (`tiled_blocks`, below), which gained 4-10%.
// Every tile is inlined into its switch: called through a pointer, GCC spilled the
// accumulators to the stack on every k (2.3x slower).
//
// M rows × one register of columns (V::kWidth), k unrolled U times into U sets of sums: an FMA waits
// ~4 cycles for the one before it on the same sum, so too few independent sums leave the FMA units
// idle (AVX2, two FMAs a cycle: at least 8 sums; AVX-512, one a cycle: at least 4). One row with
// one set would run at a quarter of the rate, and the weight stream with it.
template <class V, int M, int U>
__attribute__((always_inline)) inline void row_tile(const float* __restrict__ x, int64_t sk, int64_t sm, int64_t K,
                                                    const float* __restrict__ p, float* __restrict__ y, int64_t ldy,
                                                    Ahead& ahead) {
  constexpr int W = V::kWidth;
  typename V::T acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = V::zero();
  int64_t k = 0;
  for (; k + U <= K; k += U)
    for (int u = 0; u < U; ++u) {
      if (V::kStreamPrefetch && u % 2 == 0) prefetch_ahead(p + (k + u) * W);
      ahead.step();
      const auto w = V::load(p + (k + u) * W);
      for (int m = 0; m < M; ++m) acc[u][m] = V::fma(V::bcast(x + (k + u) * sk + m * sm), w, acc[u][m]);
    }
  for (; k < K; ++k) {
    const auto w = V::load(p + k * W);
    for (int m = 0; m < M; ++m) acc[0][m] = V::fma(V::bcast(x + k * sk + m * sm), w, acc[0][m]);
  }
  for (int m = 0; m < M; ++m) {
    auto sum = acc[0][m];
    for (int u = 1; u < U; ++u) sum = V::add(sum, acc[u][m]);
    V::store(y + m * ldy, sum);
  }
}

// k unrolled so that M rows keep at least V::kSums sums in flight (a power of two).
constexpr int unroll(int sums, int rows) {
  int u = 1;
  while (u * rows < sums) u *= 2;
  return u;
}

// A single-panel tile of 1-8 rows.
template <class V>
__attribute__((always_inline)) inline void row_tiles(int64_t rows, const float* x, int64_t sk, int64_t sm, int64_t K,
                                                     const float* p, float* y, int64_t ldy, Ahead& ahead) {
  switch (rows) {
    case 8: row_tile<V, 8, unroll(V::kSums, 8)>(x, sk, sm, K, p, y, ldy, ahead); break;
    case 7: row_tile<V, 7, unroll(V::kSums, 7)>(x, sk, sm, K, p, y, ldy, ahead); break;
    case 6: row_tile<V, 6, unroll(V::kSums, 6)>(x, sk, sm, K, p, y, ldy, ahead); break;
    case 5: row_tile<V, 5, unroll(V::kSums, 5)>(x, sk, sm, K, p, y, ldy, ahead); break;
    case 4: row_tile<V, 4, unroll(V::kSums, 4)>(x, sk, sm, K, p, y, ldy, ahead); break;
    case 3: row_tile<V, 3, unroll(V::kSums, 3)>(x, sk, sm, K, p, y, ldy, ahead); break;
    case 2: row_tile<V, 2, unroll(V::kSums, 2)>(x, sk, sm, K, p, y, ldy, ahead); break;
    default: row_tile<V, 1, unroll(V::kSums, 1)>(x, sk, sm, K, p, y, ldy, ahead);
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
  Ahead none;           // the AVX2 format fetches nothing ahead (measured on AVX-512 only)
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
  row_tiles<Ymm>(rows, x, sk, sm, K, p, y, ldy, none);
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

// Where each weight's row block [counts[w], K] of x is read from (float32 formats): blocks of up to 8 rows transposed
// into [K, counts[w]] in `buffer` (panel_unit reads them so), bigger blocks in place.
inline std::vector<const float*> transposed_blocks(const float* x, int64_t K, const std::vector<int64_t>& counts,
                                                   const std::vector<int64_t>& first, Scratch<float>& buffer) {
  std::vector<const float*> at(counts.size());
  for (size_t w = 0; w < counts.size(); ++w) at[w] = x + first[w] * K;
  bool any = false;
  for (int64_t c : counts) any = any || (c > 0 && c <= 8);
  if (!any) return at;
  float* const packed = buffer.get(first.back() * K);
  at::parallel_for(0, counts.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t M = counts[w];
      if (M == 0 || M > 8) continue;
      const float* src = x + first[w] * K;
      float* dst = packed + first[w] * K;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) dst[k * M + m] = src[m * K + k];
      at[w] = dst;
    }
  });
  return at;
}

// The float32 format: 8-column panels, more than 8 rows in tiles over panel pairs.
struct F32x8 {
  using X = float;
  using W = float;
  using Out = float;                        // what panel_linear returns
  static constexpr int64_t kCols = 8;
  static constexpr int64_t kUnitRows = 8;   // more rows than this: units of two panels
  static double cost(int64_t rows) { return 6.0 + rows; }   // a panel's stream ≈ 6 rows of FMAs
  static std::vector<const X*> blocks(const X* x, int64_t K, const std::vector<int64_t>& counts,
                                      const std::vector<int64_t>& first, Scratch<X>& buffer) {
    return transposed_blocks(x, K, counts, first, buffer);
  }
  static void unit(const X* x, int64_t M, int64_t K, const W* panels, int64_t j, bool pair, float* y, int64_t ldy,
                   Ahead&) {
    panel_unit(x, M, K, panels, j, pair, y, ldy);
  }
};

#ifdef __AVX512F__
// float32 with AVX-512: W [N, K] as panels [N/16, K, 16], one 64-byte load per k. Out of cache the
// 8-column AVX2 tiles ran many rows far below both limits (an 8-row product, one core, ~12 GB/s where
// the cache rate and the memory each allow ~25-30). With a 16-column register per row a cache line of
// weight costs half the instructions; bench/stream_overlap.cpp shows the 8-wide 8-row loop halving
// (in cache too) once it carries one more instruction per line, the 16-wide one unmoved.
// M rows × 32 columns: panels p0 and p1 = p0 + 16K side by side (up to 12 rows: 24 sums, two weight
// registers and a broadcast of the 32 registers), one broadcast per two FMAs.
template <int M>
__attribute__((always_inline)) inline void zmm_pair_tile(const float* __restrict__ x, int64_t sk, int64_t sm, int64_t K,
                                                         const float* __restrict__ p0, float* __restrict__ y, int64_t ldy, Ahead& ahead) {
  const float* __restrict__ p1 = p0 + K * 16;
  __m512 a0[M], a1[M];
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    ahead.step();
    ahead.step();
    const __m512 w0 = _mm512_loadu_ps(p0 + k * 16), w1 = _mm512_loadu_ps(p1 + k * 16);
    for (int m = 0; m < M; ++m) {
      const __m512 b = _mm512_set1_ps(x[k * sk + m * sm]);
      a0[m] = _mm512_fmadd_ps(b, w0, a0[m]);
      a1[m] = _mm512_fmadd_ps(b, w1, a1[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(y + m * ldy, a0[m]);
    _mm512_storeu_ps(y + m * ldy + 16, a1[m]);
  }
}

__attribute__((always_inline)) inline void zmm_rows(bool pair, int64_t rows, const float* x, int64_t sk, int64_t sm,
                                                    int64_t K, const float* p, float* y, int64_t ldy, Ahead& ahead) {
  if (pair) {
    switch (rows) {
      case 12: zmm_pair_tile<12>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 11: zmm_pair_tile<11>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 10: zmm_pair_tile<10>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 9: zmm_pair_tile<9>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 8: zmm_pair_tile<8>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 7: zmm_pair_tile<7>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 6: zmm_pair_tile<6>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 5: zmm_pair_tile<5>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 4: zmm_pair_tile<4>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 3: zmm_pair_tile<3>(x, sk, sm, K, p, y, ldy, ahead); break;
      case 2: zmm_pair_tile<2>(x, sk, sm, K, p, y, ldy, ahead); break;
      default: zmm_pair_tile<1>(x, sk, sm, K, p, y, ldy, ahead);
    }
    return;
  }
  row_tiles<Zmm>(rows, x, sk, sm, K, p, y, ldy, ahead);
}

// The 16 registers' 16 × 16 floats transposed in place (v[i] lane j ↔ v[j] lane i).
inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    v[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    v[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    v[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    v[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(v[i], v[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(v[i], v[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_f32x4(v[8 + i], v[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(v[8 + i], v[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    v[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
    v[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    v[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

// r ≤ 16 rows of src (K floats apart) → dst [K, r], 16 k at a time through registers (3.5x the
// scalar loop: 24 against 7 GB/s).
inline void pack_tile(const float* src, int64_t K, int64_t r, float* dst) {
  const __mmask16 lanes = __mmask16((1u << r) - 1);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 v[16];
    for (int m = 0; m < 16; ++m) v[m] = m < r ? _mm512_loadu_ps(src + m * K + k) : _mm512_setzero_ps();
    transpose16(v);
    for (int i = 0; i < 16; ++i) _mm512_mask_storeu_ps(dst + (k + i) * r, lanes, v[i]);
  }
  for (; k < K; ++k)
    for (int64_t m = 0; m < r; ++m) dst[k * r + m] = src[m * K + k];
}

// How F32x16 tiles a block of M rows: ceil(M / 12) tiles (one up to 12 rows), the rows spread
// evenly; tile t of `tiles` starting at row m0 has zmm_tile_rows(M - m0, tiles - t) rows. tiled_blocks
// packs by this rule and F32x16::unit reads by it.
inline int64_t zmm_tiles(int64_t M) { return (M + 11) / 12; }
inline int64_t zmm_tile_rows(int64_t rows_left, int64_t tiles_left) { return (rows_left + tiles_left - 1) / tiles_left; }

// Where each weight's row block [counts[w], K] of x is read from, for the AVX-512 float32 tiles: packed
// tile by tile, as F32x16::unit tiles it (zmm_tiles), each tile's r rows as [K, r], at the tile's own
// rows' offset (so a block keeps its
// size and place). A k step's broadcasts then sit in one or two cache lines, one stream per tile: read
// in place, 12 rows K floats apart were 12 streams, and a 444-row expert product whose rows no longer
// fit L2 ran 7% slower (4-10% over 60-444 rows, both projections; docs/performance.md).
inline std::vector<const float*> tiled_blocks(const float* x, int64_t K, const std::vector<int64_t>& counts,
                                              const std::vector<int64_t>& first, Scratch<float>& buffer) {
  std::vector<const float*> at(counts.size(), nullptr);
  struct Tile { int64_t m0, r; };                   // rows [m0, m0 + r) of x, all of one block
  std::vector<Tile> tiles;
  for (size_t w = 0; w < counts.size(); ++w) {
    const int64_t M = counts[w], n = zmm_tiles(M);
    for (int64_t m0 = 0, t = 0; m0 < M; ++t) {
      const int64_t r = zmm_tile_rows(M - m0, n - t);
      tiles.push_back({first[w] + m0, r});
      m0 += r;
    }
  }
  float* const packed = buffer.get(first.back() * K);
  for (size_t w = 0; w < counts.size(); ++w) at[w] = packed + first[w] * K;
  at::parallel_for(0, tiles.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const auto [m0, r] = tiles[i];
      pack_tile(x + m0 * K, K, r, packed + m0 * K);
    }
  });
  return at;
}

// The float32 format with AVX-512: 16-column panels; 4 or more rows over panel pairs. Rows go in
// ceil(M / 12) tiles of up to 12 rows (24 sums), spread evenly (zmm_tiles), each read
// from its packed [K, r] block (tiled_blocks); a single panel runs a tile of more than 8 rows as two
// row tiles of 4-6 (both with one set of sums, as every tile of 4 or more rows: each output is one
// chain of FMAs over k, whatever the tiling, so packing changed no result).
struct F32x16 {
  using X = float;
  using W = float;
  using Out = float;
  static constexpr int64_t kCols = 16;
  static constexpr int64_t kUnitRows = 3;
  static double cost(int64_t rows) { return 8.0 + rows; }   // a panel's stream ≈ 8 rows of FMAs
  static std::vector<const X*> blocks(const X* x, int64_t K, const std::vector<int64_t>& counts,
                                      const std::vector<int64_t>& first, Scratch<X>& buffer) {
    return tiled_blocks(x, K, counts, first, buffer);
  }
  static void unit(const X* x, int64_t M, int64_t K, const W* panels, int64_t j, bool pair, float* y, int64_t ldy,
                   Ahead& ahead) {
    const float* p = panels + j * K * 16;
    y += j * 16;
    const int64_t tiles = zmm_tiles(M);
    for (int64_t m0 = 0, t = 0; m0 < M; ++t) {
      const int64_t r = zmm_tile_rows(M - m0, tiles - t);
      const float* xt = x + m0 * K;                   // [K, r]
      if (pair || r <= 8) {
        zmm_rows(pair, r, xt, r, 1, K, p, y + m0 * ldy, ldy, ahead);
      } else {
        const int64_t a = (r + 1) / 2;
        zmm_rows(false, a, xt, r, 1, K, p, y + m0 * ldy, ldy, ahead);
        zmm_rows(false, r - a, xt + a, r, 1, K, p, y + (m0 + a) * ldy, ldy, ahead);
      }
      m0 += r;
    }
  }
};
using F32 = F32x16;
#else
using F32 = F32x8;
#endif

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
                                                     const uint16_t* __restrict__ p, Y* __restrict__ y, int64_t ldy,
                                                     Ahead& ahead) {
  __m512 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
  const int64_t K2 = K / 2;
  int64_t kk = 0;
  for (; kk + U <= K2; kk += U)
    for (int u = 0; u < U; ++u) {
      prefetch_ahead(p + (kk + u) * 32);
      ahead.step();
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

// M rows × 32 columns: bfloat16 panels p0 and p1 = p0 + 16K side by side, one broadcast pair per
// two dot products.
template <int M, typename Y>
__attribute__((always_inline)) inline void bf16_pair_tile(const uint16_t* __restrict__ x, int64_t K,
                                                          const uint16_t* __restrict__ p0, Y* __restrict__ y, int64_t ldy,
                                                          Ahead& ahead) {
  const uint16_t* __restrict__ p1 = p0 + K * 16;
  __m512 a0[M], a1[M];
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K / 2; ++kk) {
    ahead.step();
    ahead.step();
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(p0 + kk * 32));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(p1 + kk * 32));
    for (int m = 0; m < M; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * K + 2 * kk, sizeof(pair));
      const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      a0[m] = _mm512_dpbf16_ps(a0[m], b, w0);
      a1[m] = _mm512_dpbf16_ps(a1[m], b, w1);
    }
  }
  for (int m = 0; m < M; ++m) {
    store16(y + m * ldy, a0[m]);
    store16(y + m * ldy + 16, a1[m]);
  }
}

template <typename Y>
__attribute__((always_inline)) inline void bf16_pair_rows(int64_t rows, const uint16_t* x, int64_t K, const uint16_t* p,
                                                          Y* y, int64_t ldy, Ahead& ahead) {
  switch (rows) {
    case 12: bf16_pair_tile<12>(x, K, p, y, ldy, ahead); break;
    case 11: bf16_pair_tile<11>(x, K, p, y, ldy, ahead); break;
    case 10: bf16_pair_tile<10>(x, K, p, y, ldy, ahead); break;
    case 9: bf16_pair_tile<9>(x, K, p, y, ldy, ahead); break;
    case 8: bf16_pair_tile<8>(x, K, p, y, ldy, ahead); break;
    case 7: bf16_pair_tile<7>(x, K, p, y, ldy, ahead); break;
    case 6: bf16_pair_tile<6>(x, K, p, y, ldy, ahead); break;
    case 5: bf16_pair_tile<5>(x, K, p, y, ldy, ahead); break;
    case 4: bf16_pair_tile<4>(x, K, p, y, ldy, ahead); break;
    case 3: bf16_pair_tile<3>(x, K, p, y, ldy, ahead); break;
    case 2: bf16_pair_tile<2>(x, K, p, y, ldy, ahead); break;
    default: bf16_pair_tile<1>(x, K, p, y, ldy, ahead);
  }
}

template <typename Y>
__attribute__((always_inline)) inline void bf16_rows(int64_t rows, const uint16_t* x, int64_t K, const uint16_t* p,
                                                     Y* y, int64_t ldy, Ahead& ahead) {
  switch (rows) {       // U: at least 8 independent sums
    case 12: bf16_tile<12, 1>(x, K, p, y, ldy, ahead); break;
    case 11: bf16_tile<11, 1>(x, K, p, y, ldy, ahead); break;
    case 10: bf16_tile<10, 1>(x, K, p, y, ldy, ahead); break;
    case 9: bf16_tile<9, 1>(x, K, p, y, ldy, ahead); break;
    case 8: bf16_tile<8, 1>(x, K, p, y, ldy, ahead); break;
    case 7: bf16_tile<7, 2>(x, K, p, y, ldy, ahead); break;
    case 6: bf16_tile<6, 2>(x, K, p, y, ldy, ahead); break;
    case 5: bf16_tile<5, 2>(x, K, p, y, ldy, ahead); break;
    case 4: bf16_tile<4, 2>(x, K, p, y, ldy, ahead); break;
    case 3: bf16_tile<3, 4>(x, K, p, y, ldy, ahead); break;
    case 2: bf16_tile<2, 4>(x, K, p, y, ldy, ahead); break;
    default: bf16_tile<1, 8>(x, K, p, y, ldy, ahead);
  }
}

// The bfloat16 format: 16-column panels of k pairs, rows in tiles of up to 12, spread evenly.
struct BF16 {
  using X = uint16_t;
  using W = uint16_t;
  using Out = c10::BFloat16;
  static constexpr int64_t kCols = 16;
  static constexpr int64_t kUnitRows = 8;   // more rows than this: units of two panels
  static double cost(int64_t rows) { return 6.0 + 0.5 * rows; }   // the same bytes per panel, half the cycles per row
  static std::vector<const X*> blocks(const X* x, int64_t K, const std::vector<int64_t>& counts,
                                      const std::vector<int64_t>& first, Scratch<X>&) {
    std::vector<const X*> at(counts.size());   // rows as they are: each k pair of a row is one 32-bit broadcast
    for (size_t w = 0; w < counts.size(); ++w) at[w] = x + first[w] * K;
    return at;
  }
  template <typename Y>
  static void unit(const X* x, int64_t M, int64_t K, const W* panels, int64_t j, bool pair, Y* y, int64_t ldy, Ahead& ahead) {
    const int64_t tiles = (M + 11) / 12;
    for (int64_t m0 = 0, t = 0; m0 < M; ++t) {
      const int64_t rows = (M - m0 + tiles - t - 1) / (tiles - t);
      if (pair)
        bf16_pair_rows(rows, x + m0 * K, K, panels + j * K * 16, y + m0 * ldy + j * 16, ldy, ahead);
      else
        bf16_rows(rows, x + m0 * K, K, panels + j * K * 16, y + m0 * ldy + j * 16, ldy, ahead);
      m0 += rows;
    }
  }
};

inline void store_masked(float* y, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(y, m, v); }
inline void store_masked(c10::BFloat16* y, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(y, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

}  // namespace
#endif

#endif  // __AVX2__ && __FMA__
