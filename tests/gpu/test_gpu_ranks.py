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
    engine = local_engine(model, EngineConfig(attention_ranks=a, expert_ranks=e, micro_batches=m, max_batch_tokens=48), "cuda")
    assert engine.ranks.attention[0].cache.k.is_cuda
    engine.return_logits = True
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=32))
    for c, tokens, logits in zip(out, ref_tokens, ref_logits):
        assert c.token_ids == tokens
        assert (torch.tensor(c.logits) - logits).abs().max().item() <= 1e-4


def _expert(port):
    from transfer.torch_dist import TorchDistExpertTransfer, init_data_plane
    init_data_plane("127.0.0.1", port, 1, 2, "gloo")
    t = TorchDistExpertTransfer(0, 1, 16, 2, torch.float32, torch.device("cuda"), timeout_s=30, backend="gloo")
    while (batch := t.dispatch_wait()) is not None:
        assert batch.hidden[0].is_cuda
        t.combine_launch(batch, [h * 2 for h in batch.hidden])
    t.close()


def test_ranks_sharing_one_gpu_exchange_cuda_tensors_over_gloo():
    from transfer.torch_dist import TorchDistAttentionTransfer, init_data_plane, leave_data_plane
    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    p = mp.get_context("spawn").Process(target=_expert, args=(store.port,), daemon=True)
    p.start()
    init_data_plane("127.0.0.1", store.port, 0, 2, "gloo")
    try:
        t = TorchDistAttentionTransfer(0, 1, [0, 0], 16, 2, torch.float32, torch.device("cuda"), 30, backend="gloo")
        x = torch.randn(5, 16, device="cuda")
        out = t.combine_wait(t.dispatch_launch(1, 0, 0, x, torch.zeros(5, 2, dtype=torch.long, device="cuda"),
                                               torch.ones(5, 2, device="cuda")))
        assert out.is_cuda and torch.allclose(out, 2 * x)
        t.close()
    finally:
        leave_data_plane()
        p.join(timeout=30)
