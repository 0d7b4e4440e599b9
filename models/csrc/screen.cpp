// The greedy pick of a few rows over an LM head read mostly as int8 (kernels.h lists the files).
//
// At batch 1 the LM head is a third of the bytes a decode step reads (32000 × 512: 33 MB in
// bfloat16, 66 MB in float32), and all a greedy request keeps of it is the index of the largest
// logit. The screen is a copy of the head quantized to int8 per row (a quarter of float32's bytes,
// half of bfloat16's) with, per row, a bound on how far its screened logit can be from the logit
// the head's own kernel computes:
//  - x is quantized to int16 (scale s_x = max|x| / Q), the products summed exactly in int32
//    (vpdpwssd); the screened logit is that sum × s_x × s_r;
//  - |head logit − screened logit| ≤ e1_r · Σ|x| + a2_r · s_x, where e1_r holds row r's largest
//    quantization error and the head's float32 accumulation error per unit of Σ|x| (γ_H · max|w_r|,
//    doubled; bfloat16 heads also 2^-126, weights the dot-product instruction flushes to zero), and
//    a2_r = 0.51 · s_r · Σ|q_r| x's quantization error per unit of s_x (pack_screen in
//    models/linear.py computes both in float64, rounded up); a relative 2^-20 of the screened logit
//    covers its own float rounding, an absolute H · 2^-125 · max(1, max|w|) the products the head
//    flushes; a head that could overflow (max|w| · Σ|x| near float32's limit) is not screened.
// A row whose upper bound is below the largest lower bound of any row cannot be the largest logit,
// nor tie with it: rounded as the head rounds its output (bfloat16 heads round each logit to
// bfloat16, a monotone rounding), `round(upper_r) < round(max lower)` proves head_r < head_max. The
// rows left (a handful at a trained or a random model's logit spread) are computed by the head's own
// units (panel_linear_some), and the pick is theirs: the first index of the largest value, exactly
// what row_max over the whole head's logits gives. Where the screen cannot decide (a non-finite x or
// bound, or more candidate rows than `max_rows`) it says so and the caller computes the whole head.

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)

namespace {

// One 16-row panel of the screen against NB rows of int16 x pairs: int32 sums [NB] (16 lanes each),
// G panels at once so that a few rows still keep several sums in flight.
template <int NB, int G>
__attribute__((always_inline)) inline void screen_panels(const int8_t* __restrict__ q, int64_t H2,
                                                         const int32_t* __restrict__ xpairs, __m512i (&out)[G][NB]) {
  __m512i acc[G][NB];                     // local: sums held in registers, not stored back every k pair
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < NB; ++b) acc[g][b] = _mm512_setzero_si512();
  for (int64_t kk = 0; kk < H2; ++kk) {
    __m512i w[G];
    for (int g = 0; g < G; ++g)
      w[g] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (g * H2 + kk) * 32)));
    for (int b = 0; b < NB; ++b) {
      const __m512i xb = _mm512_set1_epi32(xpairs[b * H2 + kk]);
      for (int g = 0; g < G; ++g) {
#ifdef __AVX512VNNI__
        acc[g][b] = _mm512_dpwssd_epi32(acc[g][b], w[g], xb);
#else
        acc[g][b] = _mm512_add_epi32(acc[g][b], _mm512_madd_epi16(w[g], xb));
#endif
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < NB; ++b) out[g][b] = acc[g][b];
}

// Pass 1 over every panel: the upper and lower bounds of each (row of x, head row), [NB, V] each.
template <int NB>
void screen_all(const int8_t* q, const float* rows, int64_t V, int64_t H, const int32_t* xpairs, const double* sx,
                const double* S, float slack, float* hi, float* lo) {
  constexpr int G = NB == 1 ? 4 : NB <= 4 ? 2 : 1;
  const int64_t P = V / 16, H2 = H / 2;
  const float* scale = rows;
  const float* e1 = rows + V;
  const float* a2 = rows + 2 * V;
  at::parallel_for(0, (P + G - 1) / G, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t pg = b0; pg < b1; ++pg) {
      const int64_t p0 = pg * G;
      __m512i acc[G][NB];
      if (p0 + G <= P) {
        screen_panels<NB, G>(q + p0 * H2 * 32, H2, xpairs, acc);
      } else {                                               // the last few panels, one at a time
        for (int64_t p = p0; p < P; ++p) {
          __m512i one[1][NB];
          screen_panels<NB, 1>(q + p * H2 * 32, H2, xpairs, one);
          for (int b = 0; b < NB; ++b) acc[p - p0][b] = one[0][b];
        }
      }
      for (int g = 0; g < G && p0 + g < P; ++g) {
        const int64_t r0 = (p0 + g) * 16;
        const __m512 s = _mm512_loadu_ps(scale + r0), ev = _mm512_loadu_ps(e1 + r0), av = _mm512_loadu_ps(a2 + r0);
        for (int b = 0; b < NB; ++b) {
          const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[g][b]), _mm512_mul_ps(s, _mm512_set1_ps(float(sx[b]))));
          __m512 bound = _mm512_fmadd_ps(ev, _mm512_set1_ps(float(S[b])), _mm512_mul_ps(av, _mm512_set1_ps(float(sx[b]))));
          bound = _mm512_mul_ps(bound, _mm512_set1_ps(1.f + 1.f / 256));
          bound = _mm512_fmadd_ps(_mm512_abs_ps(a), _mm512_set1_ps(1.f / (1 << 20)), bound);
          bound = _mm512_add_ps(bound, _mm512_set1_ps(slack));
          _mm512_storeu_ps(hi + b * V + r0, _mm512_add_ps(a, bound));
          _mm512_storeu_ps(lo + b * V + r0, _mm512_sub_ps(a, bound));
        }
      }
    }
  });
}

// 16 floats rounded as the head rounds its logits: bfloat16 heads with the instruction their tiles
// store with (round to nearest even, tiny values flushed), float32 heads not at all.
inline __m512 rounded(__m512 v, bool bf16) {
#ifdef SHUTTLE_BF16_PANELS
  if (bf16) return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v));
#endif
  return v;
}

}  // namespace

bool has_head_screen() { return true; }

std::tuple<at::Tensor, at::Tensor, int64_t> screened_greedy(const at::Tensor& x, const at::Tensor& head,
                                                            const at::Tensor& q, const at::Tensor& rows, int64_t max_rows) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "screened_greedy: expected a contiguous float32 or bfloat16 x [B, H]");
  TORCH_CHECK(head.scalar_type() == x.scalar_type(), "screened_greedy: x is ", x.scalar_type(), ", the head ",
              head.scalar_type());
  const int64_t B = x.size(0), H = x.size(1), V = rows.size(1);
  TORCH_CHECK(B >= 1 && B <= kScreenRows, "screened_greedy: ", B, " rows (at most ", kScreenRows, ")");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 3 && q.size(0) * 16 == V && q.size(1) * 2 == H && q.size(2) == 32 &&
              q.is_contiguous(), "screened_greedy: expected int8 screen panels [V/16, H/2, 32], got ", q.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.dim() == 2 && rows.size(0) == 4 && rows.is_contiguous(),
              "screened_greedy: expected float32 row constants [4, V]");
  const int64_t c = head.scalar_type() == at::kBFloat16 ? 16 : head.size(2);
  TORCH_CHECK(head.size(0) * c == V, "screened_greedy: the head has ", head.size(0) * c, " rows, the screen ", V);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const auto none = std::tuple<at::Tensor, at::Tensor, int64_t>{at::Tensor(), at::Tensor(), 0};
  // x: Σ|x| and max|x| per row (double), then int16 with |Σ q·x̂| < 2^31 guaranteed
  const double Q = std::min(32767.0, std::floor(2147483647.0 / (double(H) * 127.0)));
  if (Q < 127) return none;
  const auto xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<double> S(B), sx(B);
  std::vector<int32_t> pairs(B * H / 2);
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0, m = 0;
    for (int64_t i = 0; i < H; ++i) {
      const double v = xp[b * H + i];
      if (!std::isfinite(v)) return none;
      sum += std::abs(v);
      m = std::max(m, std::abs(v));
    }
    S[b] = sum * (1 + 1e-12);
    sx[b] = m > 0 ? m / Q : 1.0;
    if (!(S[b] < 1e30 && sx[b] < 1e30)) return none;                // bounds would overflow float32
    for (int64_t i = 0; i < H / 2; ++i) {
      const int32_t lo = int32_t(std::lrint(std::clamp(xp[b * H + 2 * i] / sx[b], -Q, Q)));
      const int32_t hi = int32_t(std::lrint(std::clamp(xp[b * H + 2 * i + 1] / sx[b], -Q, Q)));
      pairs[b * H / 2 + i] = int32_t((uint32_t(uint16_t(int16_t(hi))) << 16) | uint32_t(uint16_t(int16_t(lo))));
    }
  }
  // The head itself must not overflow on any row (its sums stay below max|w| · Σ|x|), else its pick
  // follows the rules for non-finite logits: the whole head decides.
  const float* wmax = rows.data_ptr<float>() + 3 * V;
  const double big = *std::max_element(wmax, wmax + V);
  for (int64_t b = 0; b < B; ++b)
    if (!(big * S[b] * (1 + 1e-6) < 1e37)) return none;
  // Absolute slack: products and (bfloat16) inputs below 2^-126 that the head's instructions flush to
  // zero, at most H · 2^-126 · max(1, max|w|), and the screen's own underflow.
  const float slack = float(1e-30 + double(H) * std::ldexp(1.0, -125) * std::max(1.0, big));
  std::vector<float> hi(B * V), lo(B * V);
  const auto* qp = q.data_ptr<int8_t>();
  const float* rp = rows.data_ptr<float>();
  switch (B) {
    case 1: screen_all<1>(qp, rp, V, H, pairs.data(), sx.data(), S.data(), slack, hi.data(), lo.data()); break;
    case 2: screen_all<2>(qp, rp, V, H, pairs.data(), sx.data(), S.data(), slack, hi.data(), lo.data()); break;
    case 3: screen_all<3>(qp, rp, V, H, pairs.data(), sx.data(), S.data(), slack, hi.data(), lo.data()); break;
    case 4: screen_all<4>(qp, rp, V, H, pairs.data(), sx.data(), S.data(), slack, hi.data(), lo.data()); break;
    case 5: screen_all<5>(qp, rp, V, H, pairs.data(), sx.data(), S.data(), slack, hi.data(), lo.data()); break;
    case 6: screen_all<6>(qp, rp, V, H, pairs.data(), sx.data(), S.data(), slack, hi.data(), lo.data()); break;
    case 7: screen_all<7>(qp, rp, V, H, pairs.data(), sx.data(), S.data(), slack, hi.data(), lo.data()); break;
    default: screen_all<8>(qp, rp, V, H, pairs.data(), sx.data(), S.data(), slack, hi.data(), lo.data());
  }
  // Pass 2: the head panels holding a row that may be the largest (or tie with it) for some x row.
  std::vector<char> keep(V / c, 0);
  int64_t kept = 0;
  for (int64_t b = 0; b < B; ++b) {
    const float* lb = lo.data() + b * V;
    const float* hb = hi.data() + b * V;
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t r = 0; r < V; r += 16) m = _mm512_max_ps(_mm512_loadu_ps(lb + r), m);   // a NaN bound is no floor
    const float floor_b = _mm512_reduce_max_ps(m);
    if (!std::isfinite(floor_b)) return none;
    const __m512 R = rounded(_mm512_set1_ps(floor_b), bf16);
    for (int64_t r = 0; r < V; r += 16) {
      // kept unless round(upper) < round(floor); a NaN bound keeps its row
      __mmask16 k = _mm512_cmp_ps_mask(rounded(_mm512_loadu_ps(hb + r), bf16), R, _CMP_NLT_UQ);
      for (; k; k &= k - 1) {
        const int64_t p = (r + __builtin_ctz(k)) / c;
        if (!keep[p]) {
          keep[p] = 1;
          if (++kept * c > max_rows) return none;
        }
      }
    }
  }
  std::vector<int64_t> ids;
  for (int64_t p = 0; p < V / c; ++p)
    if (keep[p]) ids.push_back(p);
  const auto y = panel_linear_some(x, head, ids).to(at::kFloat).contiguous();
  const float* yp = y.data_ptr<float>();
  auto top = at::empty({B}, xf.options());
  auto arg = at::empty({B}, xf.options().dtype(at::kLong));
  const int64_t n = int64_t(ids.size()) * c;
  for (int64_t b = 0; b < B; ++b) {
    float best = -std::numeric_limits<float>::infinity();
    int64_t at = -1;
    for (int64_t i = 0; i < n; ++i) {
      const float v = yp[b * n + i];
      if (!std::isfinite(v)) return none;                        // the whole head's pick has the rules for those
      if (at < 0 || v > best) {                                  // the first index of the largest value
        best = v;
        at = ids[i / c] * c + i % c;
      }
    }
    top.data_ptr<float>()[b] = best;
    arg.data_ptr<int64_t>()[b] = at;
  }
  return {top, arg, n};
}

#else

bool has_head_screen() { return false; }

std::tuple<at::Tensor, at::Tensor, int64_t> screened_greedy(const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "screened_greedy: this build has no AVX-512 BW");
  return {x, x, 0};
}

#endif
