"""Check the GPU roofline cost model (tuner/costs.py RooflineCosts) against a real GPU.

Times one DBRX-sized expert FFN (bf16, hidden 6144, intermediate 10752: gate, up, SiLU, down) for
a range of tokens, and the attention-side projections of one layer (q/k/v/o + router) for a range
of batch sizes, with CUDA events; prints them beside the model's prediction for the local GPU
(catalogue entry found by NVML). Needs CUDA.

    python bench/roofline_check.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tuner.costs import RooflineCosts  # noqa: E402
from tuner.hardware import load_catalogue  # noqa: E402
from tuner.model_shape import PRESETS  # noqa: E402


def cuda_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    shape = PRESETS["dbrx-132b"]
    local = [g for g in load_catalogue().values() if g.local]
    if not local:
        raise SystemExit("no local GPU found by NVML")
    gpu = local[0]
    model = RooflineCosts(shape, gpu, 1)
    H, I = shape.hidden_size, shape.expert_intermediate
    dev, dt = "cuda", torch.bfloat16
    w1, w3 = torch.randn(H, I, device=dev, dtype=dt) * 0.02, torch.randn(H, I, device=dev, dtype=dt) * 0.02
    w2 = torch.randn(I, H, device=dev, dtype=dt) * 0.02
    print(f"GPU: {gpu.describe()}; model: {shape.name} bf16")
    print("| expert tokens | measured ms | predicted T_e ms | error |")
    print("|---|---|---|---|")
    for t in (1, 16, 64, 256, 1024, 4096):
        x = torch.randn(t, H, device=dev, dtype=dt)
        ms = cuda_ms(lambda: (torch.nn.functional.silu(x @ w1) * (x @ w3)) @ w2)
        pred = model.expert(t, 1) * 1e3
        print(f"| {t} | {ms:.3f} | {pred:.3f} | {100 * (pred / ms - 1):+.0f}% |")
    d = shape.head_dim
    wqkv = torch.randn(H, (shape.num_heads + 2 * shape.num_kv_heads) * d, device=dev, dtype=dt) * 0.02
    wo = torch.randn(shape.num_heads * d, H, device=dev, dtype=dt) * 0.02
    wr = torch.randn(H, shape.num_experts, device=dev, dtype=dt) * 0.02
    print("| attention batch (projections only, ctx 0) | measured ms | predicted T_a ms | error |")
    print("|---|---|---|---|")
    for b in (1, 32, 128, 512):
        x = torch.randn(b, H, device=dev, dtype=dt)
        ms = cuda_ms(lambda: ((x @ wqkv)[:, : shape.num_heads * d] @ wo, x @ wr))
        pred = model.attention(b, 0) * 1e3
        print(f"| {b} | {ms:.3f} | {pred:.3f} | {100 * (pred / ms - 1):+.0f}% |")


if __name__ == "__main__":
    main()
