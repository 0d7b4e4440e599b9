// One decode step's attention block of one layer in one call (kernels.h lists the files).

#include <ATen/ops/index_select.h>
#include <ATen/ops/linear.h>

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
  auto [ids, weights] = route_topk(logits, h, top_k, renormalize);
  return {x, ids, weights};
}

// Softmax top-k routing of logits [T, E] (float32 or bfloat16): softmax in float32, the k largest
// probabilities in descending order (equal ones: the lower expert first), divided by their sum if
// `renormalize`; → (ids [T, k] int64, weights [T, k] in like's dtype). What torch's softmax, topk,
// sum and division do (forward.route's ops), in one loop: at batch 1 those five dispatches cost
// ~10 µs a layer, the loop well under one.
std::tuple<at::Tensor, at::Tensor> route_topk(at::Tensor logits, at::Tensor like, int64_t k, bool renormalize) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu() &&
              (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "route_topk: expected float32 or bfloat16 CPU logits [T, E], got ", logits.scalar_type(), " ", logits.sizes());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "route_topk: top-", k, " of ", E, " experts");
  TORCH_CHECK(like.scalar_type() == at::kFloat || like.scalar_type() == at::kBFloat16,
              "route_topk: weights in float32 or bfloat16 only");
  const auto lc = logits.contiguous();
  const bool bf16_in = lc.scalar_type() == at::kBFloat16, bf16_out = like.scalar_type() == at::kBFloat16;
  auto ids = at::empty({T, k}, logits.options().dtype(at::kLong));
  auto weights = at::empty({T, k}, logits.options().dtype(like.scalar_type()));
  int64_t* ip = ids.data_ptr<int64_t>();
  const float* lf = bf16_in ? nullptr : lc.data_ptr<float>();
  const c10::BFloat16* lb = bf16_in ? lc.data_ptr<c10::BFloat16>() : nullptr;
  float* wf = bf16_out ? nullptr : weights.data_ptr<float>();
  c10::BFloat16* wb = bf16_out ? weights.data_ptr<c10::BFloat16>() : nullptr;
  std::vector<float> p(E), w(k);
  std::vector<char> taken(E);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e)
      p[e] = bf16_in ? static_cast<float>(lb[t * E + e]) : lf[t * E + e];
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, p[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(p[e] - mx));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    std::fill(taken.begin(), taken.end(), 0);
    float picked = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = 1;
      ip[t * k + j] = best;
      picked += (w[j] = p[best]);
    }
    for (int64_t j = 0; j < k; ++j) {
      const float v = renormalize ? w[j] / picked : w[j];
      if (bf16_out)
        wb[t * k + j] = c10::BFloat16(v);
      else
        wf[t * k + j] = v;
    }
  }
  return {ids, weights};
}

// ---- DecodeLayers -------------------------------------------------------------------------------
namespace {
double wall_now() {      // seconds since the epoch, as Python's time.time()
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}
}  // namespace

// Every layer of a decode step in one call, where the attention rank and its one expert rank share a
// process (a colocated node: transfer/inprocess.py hands the attention rank the expert rank): per
// layer `decode_block`, then `moe_ffn` over the expert rank's local experts, then h += their output.
// At batch 1 the Python between those two kernel calls, a layer at a time, cost ~0.3 ms a step
// (8 layers) on the 2-core VM. The same calls in the same order as the per-layer path (the expert
// rank's `compute_rows`): bit-identical results.
DecodeLayers::DecodeLayers(std::vector<at::Tensor> in_norm, std::vector<at::Tensor> post_norm, double eps,
                           std::vector<at::Tensor> qkv, std::vector<c10::optional<at::Tensor>> qkv_bias, int64_t heads,
                           int64_t kv_heads, std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache,
                           int64_t block_size, double scale, std::vector<at::Tensor> o,
                           std::vector<c10::optional<at::Tensor>> o_bias, std::vector<c10::optional<at::Tensor>> router_panels,
                           std::vector<c10::optional<at::Tensor>> router_weight,
                           std::vector<c10::optional<at::Tensor>> router_bias, int64_t top_k, bool renormalize,
                           at::Tensor local_index, std::vector<std::vector<at::Tensor>> up,
                           std::vector<std::vector<at::Tensor>> down)
    : in_norm_(std::move(in_norm)), post_norm_(std::move(post_norm)), qkv_(std::move(qkv)), qkv_bias_(std::move(qkv_bias)),
      k_cache_(std::move(k_cache)), v_cache_(std::move(v_cache)), o_(std::move(o)), o_bias_(std::move(o_bias)),
      router_panels_(std::move(router_panels)), router_weight_(std::move(router_weight)),
      router_bias_(std::move(router_bias)), up_(std::move(up)), down_(std::move(down)),
      local_index_(std::move(local_index)), eps_(eps), scale_(scale), heads_(heads), kv_heads_(kv_heads),
      block_size_(block_size), top_k_(top_k), renormalize_(renormalize) {
  const size_t L = in_norm_.size();
  TORCH_CHECK(L > 0, "DecodeLayers: no layers");
  for (const auto* v : {&post_norm_, &qkv_, &k_cache_, &v_cache_, &o_})
    TORCH_CHECK(v->size() == L, "DecodeLayers: ", L, " layers of norms, but ", v->size(), " of another weight");
  for (const auto* v : {&qkv_bias_, &o_bias_, &router_panels_, &router_weight_, &router_bias_})
    TORCH_CHECK(v->size() == L, "DecodeLayers: ", L, " layers, but ", v->size(), " optional weights of one kind");
  TORCH_CHECK(up_.size() == L && down_.size() == L, "DecodeLayers: one list of expert weights per layer");
  TORCH_CHECK(local_index_.dim() == 1 && local_index_.scalar_type() == at::kLong && local_index_.is_contiguous(),
              "DecodeLayers: local_index must be a contiguous int64 [E]");
}

std::tuple<at::Tensor, at::Tensor> DecodeLayers::run(at::Tensor h, at::Tensor cos, at::Tensor sin, at::Tensor slots,
                                                     at::Tensor blocks, at::Tensor lens, bool reverse) {
  const int64_t L = in_norm_.size(), X = up_[0].size();
  auto counts = at::zeros({L, X}, at::TensorOptions().dtype(at::kLong));
  auto times = at::empty({L, 2}, at::TensorOptions().dtype(at::kDouble));
  int64_t* cp = counts.data_ptr<int64_t>();
  double* tp = times.data_ptr<double>();
  const int64_t pairs = h.size(0) * top_k_, E = local_index_.size(0);
  const int64_t* li = local_index_.data_ptr<int64_t>();
  const bool bf16 = h.scalar_type() == at::kBFloat16;
  auto local = at::empty({h.size(0), top_k_}, counts.options());
  auto wfloat = at::empty({h.size(0), top_k_}, at::TensorOptions().dtype(at::kFloat));
  for (int64_t l = 0; l < L; ++l) {
    auto [x, ids, weights] = decode_block(h, in_norm_[l], post_norm_[l], eps_, qkv_[l], qkv_bias_[l], heads_, kv_heads_,
                                          cos, sin, k_cache_[l], v_cache_[l], slots, blocks, lens, block_size_, scale_,
                                          o_[l], o_bias_[l], router_panels_[l], router_weight_[l], router_bias_[l], top_k_,
                                          renormalize_);
    tp[2 * l] = wall_now();
    // local ids and float32 weights (the bfloat16 weights widened: what the per-layer path hands the
    // expert rank) in one loop, where torch took three ops
    const int64_t* gid = ids.data_ptr<int64_t>();
    int64_t* lid = local.data_ptr<int64_t>();
    float* wf = wfloat.data_ptr<float>();
    const c10::BFloat16* wb = bf16 ? weights.data_ptr<c10::BFloat16>() : nullptr;
    const float* w32 = bf16 ? nullptr : weights.data_ptr<float>();
    for (int64_t i = 0; i < pairs; ++i) {
      TORCH_CHECK(gid[i] >= 0 && gid[i] < E, "DecodeLayers: expert id ", gid[i], " out of range for ", E, " experts");
      lid[i] = li[gid[i]];
      wf[i] = bf16 ? static_cast<float>(wb[i]) : w32[i];
    }
    auto [out, c] = moe_ffn_add(x, local, wfloat, up_[l], down_[l], reverse, &h);     // h += the expert layer
    tp[2 * l + 1] = wall_now();
    TORCH_CHECK(c.numel() == X, "DecodeLayers: layer ", l, " has ", c.numel(), " local experts, layer 0 has ", X);
    std::copy(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + X, cp + l * X);
  }
  return {counts, times};
}

// Up to `steps` decode steps of B sequences, greedy, each step's tokens the next one's input: per step
// the embedding rows, the rotary rows at each position, each new token's cache slot from its block
// table, `run` (every layer), the final RMSNorm, the LM head (panels, in blocks of lm_rows rows) and
// the greedy pick, from C++. The attention rank's per-step Python (building the batch, sampling, the
// bookkeeping: ~0.3 ms of a ~3 ms step at batch 1) is paid once per call. The same calls in the same
// order as a pass of attention_node/rank.py over one micro-batch of decode rows, so the same tokens.
// tokens [B] int64: step 0's input; start_pos [B]: its positions; tables [B, nb] int64: block tables
// that cover every step's position, padded with -1 (checked: a padded entry is never a slot). A step
// whose logits have a row without a finite maximum stops the loop before its pick (the Python
// sampler has a rule for those rows). With the head's int8 screen (screen_q, screen_rows: pack_screen
// in models/linear.py) and at most head_screen_rows sequences, each step's pick is screened_greedy's
// (screen.cpp: the same token, the head read mostly as int8); where the screen cannot decide, the
// whole head's.
// Returns (tokens [steps done, B], logits of the step that stopped it ([B, V] float32, else
// undefined), counts [steps run, L, X], times [steps run, L, 2] as `run`'s, phase ends [steps run, 2]:
// the layers', then the LM head and pick's, as time.time(), head rows computed exactly per step run
// [steps run] (0: the whole head)); a stopped step ran, but picked nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> DecodeLayers::greedy_steps(
    at::Tensor tokens, at::Tensor start_pos, at::Tensor tables, int64_t steps, at::Tensor embed, at::Tensor cos_table,
    at::Tensor sin_table, at::Tensor final_norm, at::Tensor lm_head, c10::optional<at::Tensor> screen_q,
    c10::optional<at::Tensor> screen_rows, int64_t lm_rows, int64_t layer_threads, int64_t head_threads) {
  const int64_t B = tokens.size(0), L = in_norm_.size(), X = up_[0].size();
  TORCH_CHECK(steps >= 1 && B >= 1 && lm_rows >= 1, "greedy_steps: ", steps, " steps of ", B, " sequences");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && start_pos.scalar_type() == at::kLong && tables.scalar_type() == at::kLong
              && tables.dim() == 2 && tables.size(0) == B && start_pos.size(0) == B && tables.is_contiguous()
              && start_pos.is_contiguous(), "greedy_steps: int64 tokens [B], start_pos [B], tables [B, nb]");
  const int64_t nb = tables.size(1), V = embed.size(0);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* sp = start_pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sp[b] >= 0 && sp[b] + steps <= nb * block_size_ && sp[b] + steps <= cos_table.size(0),
                "greedy_steps: sequence ", b, " at position ", sp[b], " has no room for ", steps, " steps");
  const auto lopt = at::TensorOptions().dtype(at::kLong);
  auto out = at::empty({steps, B}, lopt);
  auto counts = at::empty({steps, L, X}, lopt);
  auto times = at::empty({steps, L, 2}, at::TensorOptions().dtype(at::kDouble));
  auto phases = at::empty({steps, 2}, at::TensorOptions().dtype(at::kDouble));
  auto exact_rows = at::zeros({steps}, lopt);
  int64_t* exact = exact_rows.data_ptr<int64_t>();
  at::Tensor stopped, logits;
  auto ids = tokens.contiguous().clone();
  auto pos = at::empty({B}, lopt), slots = at::empty({B}, lopt), lens = at::empty({B}, lopt);
  int64_t* pp = pos.data_ptr<int64_t>();
  int64_t* slp = slots.data_ptr<int64_t>();
  int64_t* lp = lens.data_ptr<int64_t>();
  int64_t k = 0;
  for (; k < steps; ++k) {
    const int64_t* ip = ids.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ip[b] >= 0 && ip[b] < V, "greedy_steps: token id ", ip[b], " out of range for ", V);
      pp[b] = sp[b] + k;
      const int64_t block = tp[b * nb + pp[b] / block_size_];
      TORCH_CHECK(block >= 0, "greedy_steps: sequence ", b, "'s block table does not cover position ", pp[b]);
      slp[b] = block * block_size_ + pp[b] % block_size_;
      lp[b] = pp[b] + 1;
    }
    if (layer_threads > 0) at::set_num_threads(layer_threads);
    auto h = embed.index_select(0, ids);
    auto [c, t] = run(h, cos_table.index_select(0, pos).unsqueeze(1), sin_table.index_select(0, pos).unsqueeze(1),
                      slots, tables, lens, false);
    counts[k].copy_(c);
    times[k].copy_(t);
    double* ph = phases.data_ptr<double>() + 2 * k;
    ph[0] = wall_now();
    if (head_threads > 0) at::set_num_threads(head_threads);
    const auto x = rms_norm(h, final_norm, eps_);
    at::Tensor top, arg;
    if (screen_q.has_value() && B <= head_screen_rows(lm_head.scalar_type() == at::kBFloat16)) {
      auto [t, a, n] = screened_greedy(x, lm_head, *screen_q, *screen_rows, screen_rows->size(1) / 8);
      exact[k] = n;
      if (n > 0) {
        top = t;
        arg = a;
      }
    }
    for (int64_t r0 = 0; r0 < B && !arg.defined(); r0 += lm_rows) {
      const int64_t n = std::min(lm_rows, B - r0);
      auto part = panel_linear(x.narrow(0, r0, n).contiguous(), lm_head);
      if (!logits.defined())            // [B, vocab] once per call, reused by every step
        logits = at::empty({B, part.size(1)}, at::TensorOptions().dtype(at::kFloat));
      logits.narrow(0, r0, n).copy_(part);            // float32 as is; bfloat16 widened as .float() does
      if (r0 + n >= B) std::tie(top, arg) = row_max(logits);
    }
    const float* topp = top.data_ptr<float>();
    bool finite = true;
    for (int64_t b = 0; b < B; ++b) finite = finite && std::isfinite(topp[b]);
    ph[1] = wall_now();
    if (!finite) {
      stopped = logits;
      break;
    }
    out[k].copy_(arg);
    ids = arg;
  }
  const int64_t ran = stopped.defined() ? k + 1 : k;      // the stopping step ran its layers and LM head too
  return {out.narrow(0, 0, k), stopped, counts.narrow(0, 0, ran), times.narrow(0, 0, ran), phases.narrow(0, 0, ran),
          exact_rows.narrow(0, 0, ran)};
}
