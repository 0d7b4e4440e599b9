"""On a CUDA machine, the deployment (Ray actors, placement groups) puts ranks on the GPU: gloo when
ranks share a GPU, NCCL when each has its own; tokens and logits equal Hugging Face on the CPU."""

import pytest
import torch

pytest.importorskip("ray", reason="the deployment needs Ray (./dev installs it)")

from cluster.deployment import Deployment  # noqa: E402
from scheduler.config import EngineConfig  # noqa: E402
from scheduler.engine import Engine  # noqa: E402
from scheduler.request import SamplingParams  # noqa: E402
from tiny_models import hf_generate  # noqa: E402

PROMPTS = [[(i * 7 + j * 13 + 1) % 256 for j in range(3 + 5 * i)] for i in range(6)]


def gpu_pids() -> set[int]:
    import pynvml
    pynvml.nvmlInit()
    try:
        return {p.pid for i in range(pynvml.nvmlDeviceGetCount())
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i))}
    finally:
        pynvml.nvmlShutdown()


def run_on_gpu(model_dir, a, e, m):
    config = EngineConfig(attention_ranks=a, expert_ranks=e, micro_batches=m, max_batch_tokens=48)
    dep = Deployment.start(model_dir, config)
    try:
        layout = dep.layout
        rank_pids = {h["pid"] for h in dep.health()}
        on_gpu = gpu_pids()
        engine = Engine(config, dep.limits, dep, return_logits=True)
        return layout, rank_pids, on_gpu, engine.generate(PROMPTS, SamplingParams(max_tokens=24))
    finally:
        dep.shutdown()


def check(out, model_dir):
    ref_tokens, ref_logits = hf_generate(model_dir, PROMPTS, 24)
    for i, (c, tokens, logits) in enumerate(zip(out, ref_tokens, ref_logits)):
        assert c.token_ids == tokens, f"prompt {i}: tokens differ from transformers"
        diff = (torch.tensor(c.logits) - logits).abs().max().item()
        assert diff <= 1e-4, f"prompt {i}: logits differ by {diff:.2e}"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_ranks_sharing_a_gpu_use_gloo(tiny_model, family):
    model = tiny_model(family)
    a, e = 1, torch.cuda.device_count() + 1           # more ranks than GPUs: they must share
    layout, rank_pids, on_gpu, out = run_on_gpu(model, a, e, 2)
    assert (layout.device, layout.backend) == ("cuda", "gloo")
    assert layout.gpus_per_rank < 1
    assert rank_pids <= on_gpu, f"rank processes {rank_pids} do not all hold GPU memory ({on_gpu})"
    check(out, model)


def test_a_gpu_per_rank_uses_nccl(tiny_model):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL between ranks needs two GPUs")
    model = tiny_model("mixtral")
    layout, rank_pids, on_gpu, out = run_on_gpu(model, 1, 1, 2)
    assert (layout.device, layout.backend, layout.gpus_per_rank) == ("cuda", "nccl", 1.0)
    assert rank_pids <= on_gpu
    check(out, model)
