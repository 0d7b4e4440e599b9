// The Python module of Shuttle's CPU kernels (kernels.h lists the files).

#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (CPU, float32 or bfloat16)");
  m.def("panel_linear", &panel_linear, "x · Wᵀ for a weight packed into column panels (CPU, float32 or bfloat16)");
  m.def("grouped_panel_linear", &grouped_panel_linear,
        "row blocks of x times their own panel-packed weights, all in one parallel region (CPU)");
  m.def("moe_ffn", &moe_ffn, "one expert rank's whole expert layer: group by expert, up, SiLU·up, down, weighted sum "
        "per token (CPU, float32 or bfloat16)");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, rounded as Hugging Face's (CPU, float32 or bfloat16)");
  m.def("rotary", &rotary, "rotary position embedding, rotate_half convention (CPU, float32 or bfloat16)");
  m.def("screened_greedy", &screened_greedy, "(max, argmax, rows computed exactly) of x's logits over a panel-packed LM "
        "head, screened through its int8 copy; undefined tensors and 0 where the screen cannot decide (CPU)");
  m.def("has_head_screen", &has_head_screen, "whether screened_greedy was built (AVX-512 BW)");
  m.def("head_screen_rows", &head_screen_rows,
        "the most rows a greedy pick is screened at, for a float32 or a bfloat16 head");
  m.def("row_max", &row_max, "(amax, argmax) of each row, NaN first as torch's (CPU, float32)");
  m.def("prefill_attention", &prefill_attention, "a prefill chunk's causal grouped-query attention, flash-style "
        "(CPU, float32 or bfloat16)");
  m.def("has_prefill_attention", &has_prefill_attention, "whether prefill_attention was built (AVX-512)");
  m.def("kv_write", &kv_write, "write new K and V rows into a paged cache layer (CPU, float32 or bfloat16)");
  m.def("route_topk", &route_topk, "softmax top-k routing (float32 softmax, k largest, renormalized if asked) in one "
        "loop: (ids int64, weights in like's dtype) (CPU)");
  m.def("decode_block", &decode_block, "one layer's attention block for decode rows: RMSNorm, QKV, rotary, cache write, "
        "decode attention, O, residual, RMSNorm, router and top-k, in one call (CPU, float32 or bfloat16)");
  pybind11::class_<DecodeLayers>(m, "DecodeLayers", "every MoE layer of a decode step in one call: decode_block, "
                                 "the expert rank's moe_ffn, the residual add (a colocated node's one expert rank)")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, double, std::vector<at::Tensor>,
                          std::vector<c10::optional<at::Tensor>>, int64_t, int64_t, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, int64_t, double, std::vector<at::Tensor>,
                          std::vector<c10::optional<at::Tensor>>, std::vector<c10::optional<at::Tensor>>,
                          std::vector<c10::optional<at::Tensor>>, std::vector<c10::optional<at::Tensor>>, int64_t, bool,
                          at::Tensor, std::vector<std::vector<at::Tensor>>, std::vector<std::vector<at::Tensor>>>())
      .def("run", &DecodeLayers::run)
      // A call of many steps lets go of the GIL: the rank answers health checks on another thread meanwhile.
      .def("greedy_steps", &DecodeLayers::greedy_steps, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("has_panel_linear", &has_panel_linear, "whether panel_linear was built (AVX2 and FMA)");
  m.def("float_panel_cols", &float_panel_cols, "columns per float32 panel: 16 with AVX-512, 8 with AVX2 only");
  m.def("has_bf16_panels", &has_bf16_panels, "whether bfloat16 panels were built (AVX-512 BF16)");
}
