// One decode step's attention block of one layer in one call (kernels.h lists the files).

#include <ATen/ops/linear.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/topk.h>

#include "kernels.h"

// At batch 1 a layer's attention block is ~15 Python-level calls around kernels that take a few
// microseconds each (RMSNorm, QKV, rotary, the cache write, decode attention, O, the residual add,
// RMSNorm, the router, softmax, top-k). This makes the same calls, in the same order, on the same
// tensors, from C++: the results are bit-identical to attention_node/forward.py's path, which stays
// the reference and the path for everything this does not cover (prefill rows, q/k norms, weights
// without panels).
//
// h [T, H] (every row a decode token) is updated in place: h += O(attention(rms_norm(h, in_norm))).
// Returns (x = rms_norm(h, post_norm), topk_ids [T, k] int64, topk_weights [T, k] in h's dtype): the
// routing of x, as forward.route computes it (softmax in float32, top-k, renormalized if asked).
// The router is a panel-packed weight (router_panels) or a plain one (router_weight, F.linear).
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_block(
    at::Tensor h, at::Tensor in_norm, at::Tensor post_norm, double eps, at::Tensor qkv_panels,
    c10::optional<at::Tensor> qkv_bias, int64_t heads, int64_t kv_heads, at::Tensor cos, at::Tensor sin,
    at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots, at::Tensor blocks, at::Tensor lens, int64_t block_size,
    double scale, at::Tensor o_panels, c10::optional<at::Tensor> o_bias, c10::optional<at::Tensor> router_panels,
    c10::optional<at::Tensor> router_weight, c10::optional<at::Tensor> router_bias, int64_t top_k, bool renormalize) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "decode_block: expected a contiguous h [T, H], got ", h.sizes());
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "decode_block: ", heads,
              " query heads are not a multiple of ", kv_heads, " KV heads");
  TORCH_CHECK(router_panels.has_value() != router_weight.has_value(),
              "decode_block: give the router as panels or as a weight, one of the two");
  const int64_t T = h.size(0), d = k_cache.size(2), hd = heads * d, gd = kv_heads * d;
  auto qkv = panel_linear(rms_norm(h, in_norm, eps), qkv_panels);                       // [T, (h + 2g)·d]
  if (qkv_bias.has_value()) qkv.add_(*qkv_bias);
  TORCH_CHECK(qkv.size(1) == hd + 2 * gd, "decode_block: QKV gives ", qkv.size(1), " columns, not (", heads, " + 2·",
              kv_heads, ")·", d);
  const auto v = qkv.narrow(1, hd + gd, gd).view({T, kv_heads, d});
  const auto qk = rotary(qkv.narrow(1, 0, hd + gd).view({T, heads + kv_heads, d}), cos, sin);   // q and k, rotated
  kv_write(k_cache, v_cache, slots, qk.narrow(1, heads, kv_heads), v);
  const auto q = qk.narrow(1, 0, heads).reshape({T, kv_heads, heads / kv_heads, d}).contiguous();
  const auto attn = paged_decode(q, k_cache, v_cache, blocks, lens, block_size, scale);  // [T, g, r, d]
  auto o = panel_linear(attn.reshape({T, hd}).contiguous(), o_panels);
  if (o_bias.has_value()) o.add_(*o_bias);
  h.add_(o);
  auto x = rms_norm(h, post_norm, eps);
  auto logits = router_panels.has_value() ? panel_linear(x, *router_panels)
                                          : at::linear(x, *router_weight, router_bias);
  if (router_panels.has_value() && router_bias.has_value()) logits.add_(*router_bias);
  const auto probs = at::softmax(logits.to(at::kFloat), -1);
  auto [weights, ids] = at::topk(probs, top_k, -1);
  if (renormalize) weights = weights.div(weights.sum(-1, true));
  return {x, ids, weights.to(h.scalar_type())};
}
