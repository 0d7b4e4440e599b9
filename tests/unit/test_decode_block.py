"""The one-call attention block of decode steps (models/csrc/layer.cpp `decode_block`) against the
Python path it replaces: the same tokens and the same logits bit for bit, float32 and bfloat16, with
and without a QKV bias and a shared expert; and float32 parity with Hugging Face."""

from __future__ import annotations

import pytest
import torch

import attention_node.forward as forward
from local_ranks import local_engine
from scheduler.config import EngineConfig
from scheduler.request import SamplingParams
from tiny_models import hf_generate

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2], [7], [2, 7, 1, 8, 2, 8]]
# Big enough for float32 panels (a weight of 2^16+ elements): hidden 256, 8 heads of 32, 2 KV heads.
WIDE = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)


def _generate(model: str, dtype: str, fused: bool, monkeypatch, calls: list):
    real = forward.AttentionForward.decode_block

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(forward.AttentionForward, "decode_block", counted)
    monkeypatch.setattr(forward, "_fits_block", forward._fits_block if fused else (lambda lw: False))
    engine = local_engine(model, EngineConfig(dtype=dtype, max_batch_tokens=16), return_logits=True)
    try:
        return engine.generate(PROMPTS, SamplingParams(max_tokens=6))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("family,dtype", [("mixtral", "float32"), ("mixtral", "bfloat16"),
                                          ("qwen2_moe", "float32"), ("qwen2_moe", "bfloat16")])
def test_decode_block_is_bit_identical_to_the_python_path(tiny_model, monkeypatch, family, dtype):
    model = tiny_model(family, **WIDE, **({"mlp_only_layers": []} if family == "qwen2_moe" else {}))
    used: list = []
    fused = _generate(model, dtype, True, monkeypatch, used)
    assert used, "no decode step took the one-call block"
    unused: list = []
    plain = _generate(model, dtype, False, monkeypatch, unused)
    assert not unused
    assert [c.token_ids for c in fused] == [c.token_ids for c in plain]
    for a, b in zip(fused, plain):
        assert torch.equal(torch.tensor(a.logits), torch.tensor(b.logits))


def test_decode_block_matches_hugging_face_in_float32(tiny_model, monkeypatch):
    model = tiny_model("qwen2_moe", **WIDE, mlp_only_layers=[])
    ref_tokens, ref_logits = hf_generate(model, PROMPTS, 6)
    used: list = []
    out = _generate(model, "float32", True, monkeypatch, used)
    assert used
    assert [c.token_ids for c in out] == ref_tokens
    assert max((torch.tensor(c.logits) - ref).abs().max().item() for c, ref in zip(out, ref_logits)) <= 1e-4


def test_layers_the_block_does_not_cover_take_the_python_path(tiny_model, monkeypatch):
    """Qwen3's q/k norms and a dense layer (mlp_only_layers) are not in the block: those layers run as
    before, the others still take it, and the tokens match Hugging Face."""
    model = tiny_model("qwen2_moe", **WIDE, mlp_only_layers=[1])
    ref_tokens, _ = hf_generate(model, PROMPTS, 6)
    used: list = []
    out = _generate(model, "float32", True, monkeypatch, used)
    assert used and [c.token_ids for c in out] == ref_tokens
    qwen3 = tiny_model("qwen3_moe", **WIDE, head_dim=32)
    used3: list = []
    out3 = _generate(qwen3, "float32", True, monkeypatch, used3)
    assert not used3
    assert [c.token_ids for c in out3] == hf_generate(qwen3, PROMPTS, 6)[0]
