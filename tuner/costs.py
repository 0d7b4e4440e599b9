"""Stage times of one layer of one micro-batch: T_a, T_e, T_c, plus the per-step terms.

Two sources, one interface (`StageCosts`):
- `ProfiledCosts`: the fits of a profile measured on this machine (`shuttle tune profile`), at the
  thread count each rank will run with.
- `RooflineCosts`: a catalogue GPU that is not attached: bytes over memory bandwidth and FLOPs over
  tensor throughput (whichever is longer, at typical efficiencies), plus a per-layer launch cost,
  tensor-parallel all-reduces over the GPU link, and messages over the per-GPU network.

Routing statistics (what both need): with uniform top-k routing over E experts, a micro-batch of
t tokens hits an expert with probability 1 - (1 - k/E)^t, and a token goes to
n_e·(1 - (1 - 1/n_e)^k) expert ranks on average (Shuttle sends a token once per expert rank that
owns one of its experts).
"""

from __future__ import annotations

import abc

import math
from dataclasses import dataclass

from tuner.fit import LinearFit
from tuner.hardware import GpuType
from tuner.model_shape import ModelShape

MEMORY_EFFICIENCY = 0.80     # achievable fraction of datasheet bandwidth in decode kernels
COMPUTE_EFFICIENCY = 0.65    # achievable fraction of datasheet tensor FLOP/s (H100 bf16 FFN GEMMs: 0.68, bench/roofline_check.py)
NETWORK_EFFICIENCY = 0.80
LAYER_LAUNCH_S = 25e-6       # kernel launches per layer per micro-batch on a GPU
MESSAGE_LATENCY_S = 15e-6    # one M2N/N2M message (RDMA)
STEP_OVERHEAD_S = 2e-3       # head: scheduling, one control call per attention rank, sampling


def experts_hit(tokens: float, experts: int, top_k: int, owned: float) -> float:
    """Expected distinct experts hit among `owned` experts, by `tokens` tokens routed top-k of `experts`."""
    if tokens <= 0:
        return 0.0
    return owned * (1.0 - (1.0 - top_k / experts) ** tokens)


def ranks_per_token(n_e: int, top_k: int) -> float:
    return n_e * (1.0 - (1.0 - 1.0 / n_e) ** top_k)


def token_bytes(shape: ModelShape, dtype_bytes: int) -> float:
    """One token in a dispatch message: its hidden state, expert ids (int64) and weights (fp32)."""
    return shape.hidden_size * dtype_bytes + shape.top_k * 12


class StageCosts(abc.ABC):
    """Seconds for one layer of one micro-batch; what `search` and `simulate` ask."""

    shared_host_cores: int | None = None   # ranks share this many cores (CPU profile); None: a device each
    # Interference on a shared host, calibrated by `shuttle tune profile` from real multi-rank runs
    # (zero elsewhere): each extra rank computing at the same moment slows every running span by
    # this fraction; a message sent while every core is busy computing waits this long for a core
    # to run the transport's I/O thread and wake its receiver.
    overlap_slowdown: float = 0.0
    wakeup_latency_s: float = 0.0
    core_policy: str = "share"     # shared host: "share" (processor sharing) or "queue" (see simulate.py)

    @abc.abstractmethod
    def attention(self, b: float, ctx: float) -> float:       # T_a: b sequences of mean context ctx
        """See the comment on the signature."""

    @abc.abstractmethod
    def expert(self, pairs: float, hits: float) -> float:       # T_e: token-expert pairs, distinct experts hit
        """See the comment on the signature."""

    @abc.abstractmethod
    def transfer(self, nbytes: float) -> float:                 # T_c: one message
        """See the comment on the signature."""

    @abc.abstractmethod
    def head(self, b: float) -> float:                          # final norm, LM head, sampling of b sequences
        """See the comment on the signature."""

    @abc.abstractmethod
    def overhead(self, batch: float) -> float:                  # per step, outside the layers
        """See the comment on the signature."""


@dataclass
class ProfiledCosts(StageCosts):
    """Fits from a profile, at one thread count per side."""

    attention_fit: LinearFit
    expert_fit: LinearFit
    transfer_fit: LinearFit
    head_fit: LinearFit
    overhead_fit: LinearFit
    shared_host_cores: int | None = None
    overlap_slowdown: float = 0.0
    wakeup_latency_s: float = 0.0
    # compute spans in a whole deployment / the same spans in the profile's turn-taking one (calibrated)
    compute_scale: float = 1.0
    core_policy: str = "share"

    def attention(self, b: float, ctx: float) -> float:
        return self.compute_scale * self.attention_fit({"1": 1.0, "b": b, "b*ctx": b * ctx}) if b > 0 else 0.0

    def expert(self, pairs: float, hits: float) -> float:
        return self.compute_scale * self.expert_fit({"1": 1.0, "pairs": pairs, "hits": hits}) if pairs > 0 else 0.0

    def transfer(self, nbytes: float) -> float:
        return self.transfer_fit({"1": 1.0, "bytes": nbytes})

    def head(self, b: float) -> float:
        return self.compute_scale * self.head_fit({"1": 1.0, "b": b}) if b > 0 else 0.0

    def overhead(self, batch: float) -> float:
        return self.overhead_fit({"1": 1.0, "B": batch})


@dataclass
class RooflineCosts(StageCosts):
    """A catalogue GPU (tp of them per rank) running `shape` in `dtype_bytes`."""

    shape: ModelShape
    gpu: GpuType
    tp: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        s, g = self.shape, self.gpu
        self._bw = g.bandwidth_gbs * 1e9 * MEMORY_EFFICIENCY * self.tp
        self._flops = g.bf16_tflops * 1e12 * COMPUTE_EFFICIENCY * self.tp
        self._attn_bytes = s.attention_params_per_layer * self.dtype_bytes
        self._kv_bytes_per_ctx = 2 * s.num_kv_heads * s.head_dim * self.dtype_bytes
        self._attn_flops = 2 * s.attention_params_per_layer
        self._score_flops = 4 * s.num_heads * s.head_dim
        self._expert_bytes = s.expert_params * self.dtype_bytes
        self._expert_flops = 2 * s.expert_params
        # two all-reduces of the hidden state per layer when tensor parallel (ring: 2(tp-1)/tp of the bytes)
        self._allreduce_per_token = 0.0 if self.tp == 1 else 2 * 2 * (self.tp - 1) / self.tp * s.hidden_size * self.dtype_bytes
        self._link = g.link_gbs * 1e9
        self._net = g.net_gbs * 1e9 * NETWORK_EFFICIENCY * self.tp

    def attention(self, b: float, ctx: float) -> float:
        if b <= 0:
            return 0.0
        read = self._attn_bytes + b * ctx * self._kv_bytes_per_ctx
        flops = b * (self._attn_flops + ctx * self._score_flops)
        return max(read / self._bw, flops / self._flops) + LAYER_LAUNCH_S + b * self._allreduce_per_token / self._link

    def expert(self, pairs: float, hits: float) -> float:
        if pairs <= 0:
            return 0.0
        return (max(hits * self._expert_bytes / self._bw, pairs * self._expert_flops / self._flops) + LAYER_LAUNCH_S
                + pairs * self._allreduce_per_token / 2 / self._link)

    def transfer(self, nbytes: float) -> float:
        return MESSAGE_LATENCY_S + nbytes / self._net

    def head(self, b: float) -> float:
        s = self.shape
        read = s.vocab_size * s.hidden_size * self.dtype_bytes
        return max(read / self._bw, 2 * b * s.vocab_size * s.hidden_size / self._flops) + LAYER_LAUNCH_S

    def overhead(self, batch: float) -> float:
        return STEP_OVERHEAD_S


def attention_memory_bytes(shape: ModelShape, dtype_bytes: int, tp: int, sequences: float, ctx: float) -> float:
    """Per GPU of an attention rank: its share of the non-expert weights and of its sequences' KV cache."""
    return (shape.attention_params() * dtype_bytes + sequences * ctx * shape.kv_bytes_per_token(dtype_bytes)) / tp


def expert_memory_bytes(shape: ModelShape, dtype_bytes: int, tp: int, experts_owned: int) -> float:
    return shape.moe_layers * experts_owned * shape.expert_params * dtype_bytes / tp


def experts_per_rank(num_experts: int, n_e: int) -> int:
    return math.ceil(num_experts / n_e)
