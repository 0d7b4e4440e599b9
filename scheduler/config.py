"""Engine configuration: one frozen dataclass, validated at construction.

CLI flags are generated from these fields (name → `--name-with-dashes`, help from metadata), so
`shuttle run`, `shuttle serve` and the tuner cannot drift apart. Values that follow from the
config and the model (KV blocks per rank, context length, EOS ids) live in `EngineLimits`, built
once and never written back into the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _opt(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class EngineConfig:
    attention_ranks: int = _opt(1, "attention ranks (data parallel; each owns its requests and KV cache)")
    expert_ranks: int = _opt(1, "expert ranks (expert parallel; any split of the experts is valid)")
    # Default 1: on CPU machines every measured shape ran faster without ping-pong (memory-bound
    # experts read their weights once per micro-batch); `shuttle tune plan` picks m for a deployment.
    micro_batches: int = _opt(1, "micro-batches per step that ping-pong between attention and experts (see shuttle tune plan)")
    dtype: str = _opt("float32", "weights and activations dtype", choices=("float32", "bfloat16"))
    block_size: int = _opt(16, "tokens per KV cache block")
    kv_cache_tokens: int = _opt(0, "KV cache capacity per attention rank, in tokens (0: max-num-seqs × context, capped at 65536)")
    max_num_seqs: int = _opt(64, "most requests running at once per attention rank")
    max_batch_tokens: int = _opt(512, "most tokens per attention rank per step (decode tokens plus prefill chunks)")
    max_model_len: int = _opt(0, "context length limit, prompt plus output (0: the model's max_position_embeddings, capped at 8192)")
    max_queue: int = _opt(1024, "most requests waiting for admission; more are refused")
    transfer_timeout_s: float = _opt(60.0, "seconds any token transfer may wait for a peer before the step fails")
    step_timeout_s: float = _opt(600.0, "seconds a whole step may take before the head declares the ranks dead")
    # The server's watchdog: a step that runs this long has every rank asked whether it is alive
    # (a stopped rank otherwise only shows when a transfer deadline passes, a minute by default).
    fault_detect_s: float = _opt(3.0, "seconds within which the server declares a dead or stalled rank (its watchdog "
                                      "asks every rank while a step runs long); at most transfer_timeout_s")
    max_recoveries: int = _opt(3, "rank faults a request may live through (each replaces the ranks and recomputes it); "
                                  "0 turns recovery off: a fault fails what is in flight")
    colocate: bool = _opt(False, "run the attention rank and the expert ranks of a one-node deployment in one process, "
                                 "exchanging tokens in memory (transfer/inprocess.py) instead of over gloo; "
                                 "needs --attention-ranks 1 and no cluster address")
    cpus_per_rank: float = _opt(0.0, "Ray CPUs reserved per rank (0: share this node's CPUs evenly)")
    threads_per_rank: int = _opt(0, "torch threads per rank (0: with 1 micro-batch the node's cores per side, except an attention rank's "
                                       "decode-sized layers on CPUs, 1; else shared by all ranks)")
    # 1: the head schedules and launches step N+1 before it has step N's tokens (the attention ranks
    # feed each request the token they sampled for it last), so its own per-step work and the Ray
    # call overlap the ranks' compute instead of idling them between steps.
    schedule_ahead: int = _opt(1, "steps the head schedules ahead of the results it has (1: overlap its work with the "
                                  "ranks'; a request that stops on EOS or a stop token computes one extra token; 0: off)",
                               choices=(0, 1))
    # >1: when every running request is decoding and none waits, one rank call runs several decode
    # steps, the attention ranks feeding back the tokens they sample (as they do for a step scheduled
    # ahead): the head's per-step work and the Ray call are paid once per call (docs/performance.md).
    decode_steps: int = _opt(1, "decode steps per rank call while every running request decodes and none waits "
                                "(the ranks feed back their own tokens; streams get tokens in bursts of up to this "
                                "many; a request that stops on EOS or a stop token computes up to this many - 1 "
                                "tokens for nothing, twice that with schedule-ahead; 1: off)")

    def __post_init__(self) -> None:
        for name in ("attention_ranks", "expert_ranks", "micro_batches", "block_size", "max_num_seqs",
                     "max_batch_tokens", "max_queue", "decode_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.schedule_ahead not in (0, 1):
            raise ValueError(f"schedule_ahead must be 0 or 1, got {self.schedule_ahead!r}")
        for name in ("kv_cache_tokens", "max_model_len", "threads_per_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.colocate and self.attention_ranks != 1:
            raise ValueError(f"colocate runs one attention rank, got attention_ranks={self.attention_ranks}")
        if self.max_recoveries < 0:
            raise ValueError(f"max_recoveries must be >= 0, got {self.max_recoveries}")
        if self.transfer_timeout_s <= 0 or self.step_timeout_s <= 0:
            raise ValueError("transfer_timeout_s and step_timeout_s must be positive")
        if not 0 < self.fault_detect_s <= self.transfer_timeout_s:
            raise ValueError(f"fault_detect_s must be positive and at most transfer_timeout_s "
                             f"({self.transfer_timeout_s:g}), got {self.fault_detect_s!r}")
        if self.cpus_per_rank < 0:
            raise ValueError(f"cpus_per_rank must be >= 0, got {self.cpus_per_rank!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown engine config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)


@dataclass(frozen=True)
class EngineLimits:
    """Derived once from (EngineConfig, model): never stored back into the config."""

    max_model_len: int
    kv_blocks_per_rank: int
    block_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def derive(cls, config: EngineConfig, *, max_position_embeddings: int, vocab_size: int,
               eos_token_ids: tuple[int, ...]) -> "EngineLimits":
        max_len = config.max_model_len or min(max_position_embeddings, 8192)
        if max_len > max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings {max_position_embeddings}")
        kv_tokens = config.kv_cache_tokens or min(config.max_num_seqs * max_len, 65536)
        blocks = -(-kv_tokens // config.block_size)
        return cls(max_model_len=max_len, kv_blocks_per_rank=blocks, block_size=config.block_size,
                   vocab_size=vocab_size, eos_token_ids=tuple(eos_token_ids))
