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
