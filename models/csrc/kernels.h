// Shuttle's CPU kernels (float32 and bfloat16): what each source file defines, and the headers they
// share. Built on first use by torch.utils.cpp_extension (models/cpu_kernels.py, which says why each
// kernel exists; docs/performance.md has what each measured):
//  - attention.cpp: paged_decode (decode attention straight from the paged KV cache), kv_write and
//    prefill_attention (a prefill chunk's causal attention in one pass over its keys);
//  - small_ops.cpp: rms_norm, rotary, row_max (per-layer ops too small for torch's dispatch);
//  - panels.cpp: panel_linear, grouped_panel_linear and moe_ffn (few-row matrix products on weights
//    packed into column panels: float32 with AVX-512 (16 columns) or AVX2 FMA (8), bfloat16 with
//    AVX-512 BF16);
//    tiles.h holds their register tiles and weight formats;
//  - screen.cpp: screened_greedy (the greedy pick of a few rows over an int8 copy of the LM head,
//    with the rows it cannot rule out computed exactly);
//  - layer.cpp: decode_block (a decode step's attention block of one layer, the calls above in one) and
//    DecodeLayers (every layer of a decode step, with the expert layer, for a colocated node);
//  - module.cpp: the Python module.
#pragma once

// The few headers used, not <torch/extension.h> (all of torch's C++ API): a build takes ~20 s
// instead of ~40 on the 2-core VM.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <memory>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
// e^x of 16 floats (paged_decode's softmax, the experts' SiLU).
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
#endif

// attention.cpp
at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor blocks, at::Tensor lens,
                        int64_t block_size, double scale);
void kv_write(at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots, at::Tensor k, at::Tensor v);
bool has_prefill_attention();
at::Tensor prefill_attention(at::Tensor q, at::Tensor k, at::Tensor v, double scale);
// small_ops.cpp
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor rotary(at::Tensor x, at::Tensor cos, at::Tensor sin);
std::tuple<at::Tensor, at::Tensor> row_max(at::Tensor x);
// panels.cpp
bool has_panel_linear();
int64_t float_panel_cols();
bool has_bf16_panels();
at::Tensor panel_linear(at::Tensor x, at::Tensor panels);
at::Tensor panel_linear_some(const at::Tensor& x, const at::Tensor& panels, const std::vector<int64_t>& ids);
at::Tensor grouped_panel_linear(at::Tensor x, std::vector<int64_t> counts, std::vector<at::Tensor> panels, bool reverse);
std::tuple<at::Tensor, at::Tensor> moe_ffn(at::Tensor x, at::Tensor local, at::Tensor weights, std::vector<at::Tensor> up,
                                           std::vector<at::Tensor> down, bool reverse);
// moe_ffn, with the output added in place into residual (like x) where it is not null, rounded as
// torch's add of the returned output would round it; returns (residual, counts) then.
std::tuple<at::Tensor, at::Tensor> moe_ffn_add(const at::Tensor& x, const at::Tensor& local, const at::Tensor& weights,
                                               const std::vector<at::Tensor>& up, const std::vector<at::Tensor>& down,
                                               bool reverse, at::Tensor* residual);
// screen.cpp
// The most rows screened_greedy takes, and the most greedy_steps screens with a bfloat16 head: each row
// adds a screen product while the bytes saved stay V·H (a float32 head saves 3·V·H); at 8 rows the
// bfloat16 screen measured level with the whole head, at 4 its head time was 0.8×.
constexpr int64_t kScreenRows = 8;
constexpr int64_t kScreenRowsBf16 = 4;
bool has_head_screen();
inline int64_t head_screen_rows(bool bf16) { return bf16 ? kScreenRowsBf16 : kScreenRows; }
std::tuple<at::Tensor, at::Tensor, int64_t> screened_greedy(const at::Tensor& x, const at::Tensor& head,
                                                            const at::Tensor& q, const at::Tensor& rows, int64_t max_rows);
// layer.cpp
std::tuple<at::Tensor, at::Tensor> route_topk(at::Tensor logits, at::Tensor like, int64_t k, bool renormalize);
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_block(
    at::Tensor h, at::Tensor in_norm, at::Tensor post_norm, double eps, at::Tensor qkv_panels,
    c10::optional<at::Tensor> qkv_bias, int64_t heads, int64_t kv_heads, at::Tensor cos, at::Tensor sin,
    at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots, at::Tensor blocks, at::Tensor lens, int64_t block_size,
    double scale, at::Tensor o_panels, c10::optional<at::Tensor> o_bias, c10::optional<at::Tensor> router_panels,
    c10::optional<at::Tensor> router_weight, c10::optional<at::Tensor> router_bias, int64_t top_k, bool renormalize);

// Every MoE layer of a decode step in one call (layer.cpp says when and why): built once per
// attention rank from its layers' weights and its expert rank's; `run` returns the rows per local
// expert of each layer [L, X] int64 and each layer's expert compute start and end [L, 2] (seconds
// since the epoch, as Python's time.time()).
class DecodeLayers {
 public:
  DecodeLayers(std::vector<at::Tensor> in_norm, std::vector<at::Tensor> post_norm, double eps, std::vector<at::Tensor> qkv,
               std::vector<c10::optional<at::Tensor>> qkv_bias, int64_t heads, int64_t kv_heads,
               std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache, int64_t block_size, double scale,
               std::vector<at::Tensor> o, std::vector<c10::optional<at::Tensor>> o_bias,
               std::vector<c10::optional<at::Tensor>> router_panels, std::vector<c10::optional<at::Tensor>> router_weight,
               std::vector<c10::optional<at::Tensor>> router_bias, int64_t top_k, bool renormalize, at::Tensor local_index,
               std::vector<std::vector<at::Tensor>> up, std::vector<std::vector<at::Tensor>> down);
  // h [T, H] (every row a decode token) is updated in place through every layer.
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor h, at::Tensor cos, at::Tensor sin, at::Tensor slots,
                                         at::Tensor blocks, at::Tensor lens, bool reverse);
  // Up to `steps` greedy decode steps of B sequences, each step's tokens fed to the next (layer.cpp).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> greedy_steps(
      at::Tensor tokens, at::Tensor start_pos, at::Tensor tables, int64_t steps, at::Tensor embed, at::Tensor cos_table,
      at::Tensor sin_table, at::Tensor final_norm, at::Tensor lm_head, c10::optional<at::Tensor> screen_q,
      c10::optional<at::Tensor> screen_rows, int64_t lm_rows, int64_t layer_threads, int64_t head_threads);

 private:
  std::vector<at::Tensor> in_norm_, post_norm_, qkv_;
  std::vector<c10::optional<at::Tensor>> qkv_bias_;
  std::vector<at::Tensor> k_cache_, v_cache_, o_;
  std::vector<c10::optional<at::Tensor>> o_bias_, router_panels_, router_weight_, router_bias_;
  std::vector<std::vector<at::Tensor>> up_, down_;
  at::Tensor local_index_;
  double eps_, scale_;
  int64_t heads_, kv_heads_, block_size_, top_k_;
  bool renormalize_;
};
