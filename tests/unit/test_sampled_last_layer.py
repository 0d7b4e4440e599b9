"""The last layer runs only the rows whose logits are sampled (`AttentionForward.program`): every
row's K/V still goes to the cache, but from the attention output on, a prefill chunk keeps only its
last row if it is its prompt's last chunk, and nothing otherwise. Tokens and logits stay Hugging
Face's; the expert side sees the fewer rows."""

from __future__ import annotations

import pytest
import torch

from attention_node.forward import AttentionForward
from attention_node.rank import ROW_PREFILL_CONTEXT
from local_ranks import DirectTransfer, local_engine
from scheduler.config import EngineConfig
from scheduler.request import SamplingParams
from tiny_models import hf_generate

CHUNK = 128
LONG = [(7 * i + 3) % 250 + 1 for i in range(300)]       # chunks [0, 128) [128, 256) [256, 300)


def _run(model: str, prompts, monkeypatch, trim: bool, torch_ops: bool = False):
    """(completions, [(step, layer, rows dispatched)]); torch_ops: attention by torch's ops, as on a
    GPU (no decode kernel: every prefill chunk one causal block)."""
    seen = []
    real = DirectTransfer.dispatch_launch

    def counted(self, step, layer, micro_batch, hidden, ids, weights):
        seen.append((step, layer, hidden.shape[0]))
        return real(self, step, layer, micro_batch, hidden, ids, weights)

    monkeypatch.setattr(DirectTransfer, "dispatch_launch", counted)
    monkeypatch.setattr(AttentionForward, "sampled_last_layer", trim)
    engine = local_engine(model, EngineConfig(max_batch_tokens=CHUNK, schedule_ahead=0), return_logits=True)
    if torch_ops:
        for rank in engine.ranks.attention:
            rank.cache.decode_kernel = None
    out = engine.generate(prompts, SamplingParams(max_tokens=4))
    monkeypatch.undo()
    return out, seen


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_last_layer_takes_only_sampled_rows_and_keeps_hf_outputs(tiny_model, monkeypatch, family):
    model = tiny_model(family)
    ref_tokens, ref_logits = hf_generate(model, [LONG], 4)
    out, seen = _run(model, [LONG], monkeypatch, trim=True)
    assert [c.token_ids for c in out] == ref_tokens
    assert max((torch.tensor(c.logits) - r).abs().max().item() for c, r in zip(out, ref_logits)) <= 1e-4

    layers = sorted({layer for _, layer, _ in seen})
    first, last = layers[0], layers[-1]
    rows = {(step, layer): n for step, layer, n in seen}
    steps = sorted({step for step, _, _ in seen})
    # chunk 1's context (128) is short enough to be attended row by row as decode tokens: those keep
    # the one-call path and every row; chunk 2 samples nothing; chunk 3 samples its last row; decode
    # steps have one row throughout
    assert 2 * CHUNK > ROW_PREFILL_CONTEXT >= CHUNK
    assert [rows[s, first] for s in steps] == [128, 128, 44, 1, 1, 1]
    assert [rows[s, last] for s in steps] == [128, 0, 1, 1, 1, 1]

    # the reference (every row through the last layer) gives the same tokens and logits to float32
    # rounding, and dispatches every row
    full, full_seen = _run(model, [LONG], monkeypatch, trim=False)
    assert [c.token_ids for c in full] == [c.token_ids for c in out]
    assert max((torch.tensor(a.logits) - torch.tensor(b.logits)).abs().max().item() for a, b in zip(full, out)) <= 1e-5
    assert [n for s, layer, n in full_seen if layer == last] == [128, 128, 44, 1, 1, 1]


def test_last_layer_by_torch_ops(tiny_model, monkeypatch):
    """Without the CPU kernels (a GPU's path) the sampled rows are attended by torch's decode path:
    every chunk is a causal block, so even the first samples nothing past its K/V."""
    model = tiny_model("mixtral")
    ref_tokens, ref_logits = hf_generate(model, [LONG], 4)
    out, seen = _run(model, [LONG], monkeypatch, trim=True, torch_ops=True)
    assert [c.token_ids for c in out] == ref_tokens
    assert max((torch.tensor(c.logits) - r).abs().max().item() for c, r in zip(out, ref_logits)) <= 1e-4
    last = max(layer for _, layer, _ in seen)
    assert [n for _, layer, n in seen if layer == last] == [0, 0, 1, 1, 1, 1]


def test_mixed_batches_keep_every_sampled_row(tiny_model, monkeypatch):
    """A long prompt's chunks share steps with short prompts' prefills and decode rows: each sampled
    row is kept, in order, and every output is Hugging Face's."""
    model = tiny_model("mixtral")
    prompts = [LONG, [3, 1, 4, 1, 5], LONG[:200][::-1], [9, 2, 6]]
    ref_tokens, ref_logits = hf_generate(model, prompts, 4)
    out, seen = _run(model, prompts, monkeypatch, trim=True)
    assert [c.token_ids for c in out] == ref_tokens
    assert max((torch.tensor(c.logits) - r).abs().max().item() for c, r in zip(out, ref_logits)) <= 1e-4
    last = max(layer for _, layer, _ in seen)
    by_layer = lambda layer: sum(n for _, l_, n in seen if l_ == layer)   # noqa: E731
    assert by_layer(last) < by_layer(0)
