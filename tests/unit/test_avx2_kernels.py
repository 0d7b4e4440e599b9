"""The CPU kernels as a CPU without AVX-512 gets them: the same sources built with -mno-avx512f (AVX2
and FMA: 8-column float32 panels, no bfloat16 panels, scalar decode-attention loops) in a
subprocess, checked against torch. This machine has AVX-512, so without this the AVX2 paths would
never run here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECK = r'''
import math, sys
import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load
from models.cpu_kernels import CFLAGS, CSRC, SOURCES

m = load(name="shuttle_cpu_kernels_avx2", sources=SOURCES, extra_include_paths=[CSRC], extra_ldflags=["-fopenmp"],
         extra_cflags=CFLAGS + ["-mno-avx512f"], build_directory=sys.argv[1], verbose=False)
assert m.has_panel_linear() and m.float_panel_cols() == 8 and not m.has_bf16_panels()


def pack(w):                                   # models.linear.pack_panels with 8 columns
    n, k = w.shape
    return w.reshape(n // 8, 8, k).transpose(1, 2).contiguous()


torch.manual_seed(0)
w = torch.randn(96, 64)
for rows in (1, 2, 3, 5, 6, 7, 8, 9, 13, 20, 40):          # single panels up to 8 rows, pairs of panels beyond
    x = torch.randn(rows, 64)
    torch.testing.assert_close(m.panel_linear(x, pack(w)), F.linear(x, w), rtol=1e-5, atol=1e-4)

# a whole expert layer: 4 local experts, top-2 of 6 (ids 4 and 5 live elsewhere: -1)
H, I, X, n = 64, 48, 4, 11
ups = [torch.randn(2 * I, H) * 0.1 for _ in range(X)]
downs = [torch.randn(H, I) * 0.1 for _ in range(X)]
x = torch.randn(n, H)
local = torch.randint(-1, X, (n, 2))
weights = torch.rand(n, 2)
out, counts = m.moe_ffn(x, local, weights, [pack(u) for u in ups], [pack(d) for d in downs], False)
want = torch.zeros(n, H)
for t in range(n):
    for j in range(2):
        e = int(local[t, j])
        if e >= 0:
            gate, up = F.linear(x[t], ups[e]).chunk(2)
            want[t] += weights[t, j] * F.linear(F.silu(gate) * up, downs[e])
torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
assert counts.tolist() == [int((local == e).sum()) for e in range(X)]

# decode attention over a paged cache (the scalar loops): 3 sequences, 2 KV heads × 4 queries, d 64
g, r, d, bs, nblocks = 2, 4, 64, 4, 12
kc, vc = torch.randn(g, nblocks * bs, d), torch.randn(g, nblocks * bs, d)
blocks = torch.tensor([[3, 7, 1, 0], [5, 0, 0, 0], [9, 2, 11, 4]])
lens = torch.tensor([10, 3, 16])
q = torch.randn(3, g, r, d)
out = m.paged_decode(q, kc, vc, blocks, lens, bs, d ** -0.5)
for b in range(3):
    slots = torch.tensor([int(blocks[b, p // bs]) * bs + p % bs for p in range(int(lens[b]))])
    for h in range(g):
        probs = torch.softmax(q[b, h] @ kc[h, slots].T * d ** -0.5, dim=-1)
        torch.testing.assert_close(out[b, h], probs @ vc[h, slots], rtol=1e-4, atol=1e-5)

# the small ops
xn = torch.randn(5, 64)
wn = torch.randn(64)
torch.testing.assert_close(m.rms_norm(xn, wn, 1e-6), wn * (xn * torch.rsqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-6)))
ids, ws = m.route_topk(torch.randn(5, 8), xn, 2, True)
assert ids.shape == (5, 2) and torch.allclose(ws.sum(-1), torch.ones(5))
print("ok")
'''


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@pytest.mark.skipif(not _has_avx2(), reason="needs an x86 CPU with AVX2 and FMA")
def test_kernels_built_for_avx2_only_match_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
