"""On a CUDA GPU: weights and KV on the GPU, tokens and logits equal to Hugging Face on the CPU."""

import datetime
import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist

from local_ranks import local_engine
from scheduler.config import EngineConfig
from scheduler.request import SamplingParams
from tiny_models import FAMILIES, hf_generate

PROMPTS = [[(i * 7 + j * 13 + 1) % 256 for j in range(3 + 5 * i)] for i in range(8)]


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 2), (2, 4, 3)], ids=lambda s: "A%dE%dM%d" % s)
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_ranks_match_hugging_face(tiny_model, family, shape):
    model = tiny_model(family)
    ref_tokens, ref_logits = hf_generate(model, PROMPTS, 32)
    a, e, m = shape
    engine = local_engine(model, EngineConfig(attention_ranks=a, expert_ranks=e, micro_batches=m, max_batch_tokens=48), "cuda",
                          return_logits=True)
    assert engine.ranks.attention[0].cache.k.is_cuda
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=32))
    for c, tokens, logits in zip(out, ref_tokens, ref_logits):
        assert c.token_ids == tokens
        assert (torch.tensor(c.logits) - logits).abs().max().item() <= 1e-4


def _plane(port):
    from transfer.base import DataPlane
    return DataPlane("gloo", "127.0.0.1", port, num_attention=1, owner=(0, 0), hidden_size=16, top_k=2,
                     dtype="float32", timeout_s=30)


def _expert(port):
    from transfer.base import EXPERT, connect
    t = connect(_plane(port), EXPERT, 0, "cuda")
    while (batch := t.dispatch_wait()) is not None:
        assert batch.hidden[0].is_cuda
        t.combine_launch(batch, [h * 2 for h in batch.hidden])
    t.close()


def test_ranks_sharing_one_gpu_exchange_cuda_tensors_over_gloo():
    from transfer.base import ATTENTION, connect
    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    p = mp.get_context("spawn").Process(target=_expert, args=(store.port,), daemon=True)
    p.start()
    t = connect(_plane(store.port), ATTENTION, 0, "cuda")
    try:
        x = torch.randn(5, 16, device="cuda")
        out = t.combine_wait(t.dispatch_launch(1, 0, 0, x, torch.zeros(5, 2, dtype=torch.long, device="cuda"),
                                               torch.ones(5, 2, device="cuda")))
        assert out.is_cuda and torch.allclose(out, 2 * x)
    finally:
        t.close()
        p.join(timeout=30)
