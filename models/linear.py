"""y = x · Wᵀ (+ b) for the weights the ranks hold, with the weight laid out once for the CPU.

Decode multiplies a few rows by a large weight. MKL's sgemm repacks the weight on every such call,
several times slower than oneDNN with the weight prepacked once. So on CPUs with oneDNN, float32
weights are reordered at load time (the original is dropped: no extra memory) and used through
`torch.ops.mkldnn._linear_pointwise`; anywhere else (GPU, other dtypes, no oneDNN) it is F.linear.
Results differ from F.linear only by summation order (~1e-6 relative).
Small float32 weights (< PREPACK_MIN_ELEMENTS) stay on F.linear: there the call overhead dominates and
oneDNN's is larger; from 2^16 elements on, packing wins once the weights are out of cache, as they
are in a real step. SHUTTLE_PREPACK=0 turns prepacking off (for A/B measurements).

Where Shuttle's CPU kernels are built (models/cpu_kernels.py: x86 with AVX2 and FMA) such weights
are instead packed into 16-column panels (8 where the CPU has AVX2 but not AVX-512) for
`panel_linear`, which beats oneDNN from 1 to 256 rows;
SHUTTLE_CPU_KERNELS=0 goes back to oneDNN. bfloat16 weights are packed into 16-column panels of k
pairs where the CPU has AVX-512 BF16 (its dot-product instruction reads them as they lie): 2-3x
faster than torch's bfloat16 F.linear at decode sizes. The measurements behind each choice:
docs/performance.md.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from models import hugepages


PREPACK_MIN_ELEMENTS = 1 << 16
def _prepack_supported(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and weight.numel() >= PREPACK_MIN_ELEMENTS
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and os.environ.get("SHUTTLE_PREPACK", "1") != "0")


def _panel_kernels(weight: torch.Tensor):
    """Shuttle's CPU kernels where `panel_linear` can take this weight (float32 that could be prepacked,
    or bfloat16 on a CPU with AVX-512 BF16), else None."""
    out, inp = weight.shape
    if weight.device.type != "cpu" or os.environ.get("SHUTTLE_PREPACK", "1") == "0":
        return None
    if weight.dtype == torch.float32:
        need = "has_panel_linear"      # any size too: F.linear took ~7 µs for a [16, 512] router at batch 1
    elif weight.dtype == torch.bfloat16 and out % 16 == 0 and inp % 2 == 0:
        need = "has_bf16_panels"       # any size: torch's bfloat16 F.linear takes ~45 µs even for a router
    else:
        return None
    from models.cpu_kernels import cpu_kernels
    ext = cpu_kernels()
    if ext is None or not getattr(ext, need)():
        return None
    return ext if weight.dtype != torch.float32 or out % ext.float_panel_cols() == 0 else None


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] in panel_linear's layout: float32 [N/c, K, c] (panel j: rows cj..cj+c-1, interleaved by k;
    c = the kernels' `float_panel_cols()`: 16 with AVX-512, 8 with AVX2 only); bfloat16 [N/16, K/2, 32]
    (panel j, pair kk: W[16j + c, 2kk + e] at 2c + e)."""
    n, k = weight.shape
    if weight.dtype == torch.bfloat16:
        src = weight.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).reshape(n // 16, k // 2, 32)
    else:
        from models.cpu_kernels import cpu_kernels
        cols = cpu_kernels().float_panel_cols()
        src = weight.reshape(n // cols, cols, k).transpose(1, 2)
    return hugepages.empty(tuple(src.shape), weight.dtype).copy_(src)     # streamed every step: 2 MB pages


SCREEN_CHUNK_ROWS = 8192      # rows quantized at a time (float64 working copies of a chunk only)


def pack_screen(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An LM head's int8 screen for the greedy pick (`screened_greedy`, models/csrc/screen.cpp):
    (q [V/16, H/2, 32] int8 in the bfloat16 panel layout, rows [4, V] float32: per row the scale
    s_r = max|w_r| / 127, e1_r = max|w_r - q_r s_r| + (H + 16) 2^-23 max|w_r| (its quantization error
    and twice the head's float32 summation error, per unit of Σ|x|; bfloat16 also 2^-126, the
    denormal weights its dot product reads as 0), a2_r = 0.51 s_r Σ|q_r| (x's int16 quantization
    error per unit of its scale) and max|w_r| (the overflow check), in float64, rounded up). A quarter
    of a float32 head's bytes, half of a bfloat16 one's. None where it does not apply: no kernel
    (AVX-512 BW), a shape the kernel does not take, a non-finite weight, or SHUTTLE_HEAD_SCREEN=0."""
    v, h = weight.shape
    if (weight.device.type != "cpu" or os.environ.get("SHUTTLE_HEAD_SCREEN", "1") == "0" or v % 16 or h % 2
            or weight.dtype not in (torch.float32, torch.bfloat16)):
        return None
    from models.cpu_kernels import cpu_kernels
    ext = cpu_kernels()
    if ext is None or not ext.has_head_screen():
        return None
    q = torch.empty(v, h, dtype=torch.int8)
    rows = torch.empty(4, v, dtype=torch.float32)
    flushed = 2.0 ** -126 if weight.dtype == torch.bfloat16 else 0.0    # vdpbf16ps reads denormal weights as 0
    up = 1 + 1e-6                                    # float32 rounding of a float64 bound may go down by 2^-24
    for r0 in range(0, v, SCREEN_CHUNK_ROWS):
        w = weight[r0:r0 + SCREEN_CHUNK_ROWS].double()
        if not torch.isfinite(w).all():
            return None
        big = w.abs().amax(1)
        scale = torch.where(big > 0, big / 127, torch.ones_like(big)).float().double()
        qi = torch.round(w / scale[:, None]).clamp_(-127, 127)
        err = (w - qi * scale[:, None]).abs().amax(1)
        q[r0:r0 + len(w)] = qi.to(torch.int8)
        rows[0, r0:r0 + len(w)] = scale.float()
        rows[1, r0:r0 + len(w)] = ((err + (h + 16) * 2.0 ** -23 * big + flushed) * up).float()
        rows[2, r0:r0 + len(w)] = (0.51 * scale * qi.abs().sum(1) * up).float()
        rows[3, r0:r0 + len(w)] = (big * up).float()
    src = q.reshape(v // 16, 16, h // 2, 2).permute(0, 2, 1, 3).reshape(v // 16, h // 2, 32)
    return hugepages.empty(tuple(src.shape), torch.int8).copy_(src), rows     # streamed every step: 2 MB pages


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows_hint: int = 16):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.weight: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None      # oneDNN's layout
        self.panels: torch.Tensor | None = None      # panel_linear's layout (pack_panels)
        self._kernels = None
        if (kernels := _panel_kernels(weight)) is not None:
            self._kernels = kernels
            self.panels = pack_panels(weight)
        elif not _prepack_supported(weight):
            self.weight = weight
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] → [n, out]."""
        if self.panels is not None:
            y = self._kernels.panel_linear(x.reshape(-1, self.in_features).contiguous(), self.panels)
            y = y if self.bias is None else y.add_(self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def to(self, device: torch.device) -> "Linear":
        if self.packed is not None or self.panels is not None:
            raise RuntimeError("a prepacked CPU weight cannot move to another device; load it there instead")
        return Linear(self.weight.to(device), None if self.bias is None else self.bias.to(device))
