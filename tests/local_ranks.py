"""Every rank in this process, experts called directly: the engine's compute without Ray or gloo.

Used where the question is the numerics on a device (tests/gpu), not the distribution.
"""

from __future__ import annotations

import torch

from attention_node.rank import AttentionRank
from expert_node.experts import ExpertShard
from models.checkpoint import CheckpointReader, torch_dtype
from models.spec import load_spec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import Engine, InProcessRanks
from scheduler.placement import Placement
from transfer.base import AttentionEndpoint


class DirectTransfer(AttentionEndpoint):
    def __init__(self, shards: list[ExpertShard]):
        self.shards = shards

    def dispatch_launch(self, step, layer, micro_batch, hidden, topk_ids, topk_weights):
        return sum(s.forward(layer, hidden, topk_ids, topk_weights, reverse=micro_batch % 2 == 1) for s in self.shards)

    def combine_wait(self, handle):
        return handle

    def close(self):
        pass


class LocalRanks(InProcessRanks):
    def __init__(self, model_dir: str, config: EngineConfig, device: str):
        spec = load_spec(model_dir)   # what cluster.deployment.describe does, without importing Ray
        self.limits = EngineLimits.derive(config, max_position_embeddings=spec.max_position_embeddings,
                                          vocab_size=spec.vocab_size, eos_token_ids=spec.eos_token_ids)
        placement = Placement.contiguous(spec.num_experts, config.expert_ranks)
        dtype = torch_dtype(config.dtype)
        shards = [ExpertShard.load(spec, CheckpointReader(model_dir), placement.experts_of(r), dtype, torch.device(device))
                  for r in range(config.expert_ranks)]
        self.attention = [AttentionRank(i, spec, config, self.limits, model_dir, DirectTransfer(shards), device)
                          for i in range(config.attention_ranks)]

    def run_step(self, plans):
        return [a.step(p) for a, p in zip(self.attention, plans)]


def local_engine(model_dir: str, config: EngineConfig, device: str = "cpu", **engine_options) -> Engine:
    ranks = LocalRanks(model_dir, config, device)
    return Engine(config, ranks.limits, ranks, **engine_options)
