// Per-layer ops at decode sizes, where torch's dispatch costs more than the work (kernels.h lists
// the files).

#include "kernels.h"

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

// ---- row_max --------------------------------------------------------------------------------------
// The sampler's greedy pick over [N, V] logits: torch's argmax on rows took ~1 ms at 64 × 32000
// (float32; bfloat16 3.7 ms) against ~0.1 here.

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
