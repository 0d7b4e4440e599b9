"""A generation request and its lifecycle (no torch here: plain data the head reasons about).

Lifecycle: WAITING (queued, no rank, no KV) → RUNNING (on one attention rank, holding KV blocks;
first its prompt is prefilled, possibly in chunks over several steps, then one token per step)
→ FINISHED (length, eos, stop token, or aborted). A RUNNING request may be preempted back to
WAITING when its rank runs out of KV blocks; it then recomputes its prompt plus what it generated.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request that can never be served; `field` names the offending input, `reason` says why.

    The front door renames `field` into its own terms (the gRPC mapping: `sampling.top_p`) and
    keeps `reason`, so every rule is written once, here or in `validate_request`."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class FinishReason(str, enum.Enum):
    LENGTH = "length"        # max_tokens reached (or the context is full)
    EOS = "eos"              # the model's end-of-sequence token
    STOP = "stop"            # a stop token id (or, in the server, a stop string)
    CANCELLED = "cancelled"  # aborted by the client or the server
    ERROR = "error"          # lost to rank faults more often than the server's --max-recoveries


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy.

    The one place the values' own rules are checked (at construction, InvalidRequest naming the
    field); what depends on the deployment (vocabulary, context, KV) is `validate_request`'s."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                 # 0: no top-k cut
    seed: int | None = None        # per-request seed: the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequest("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        t = self.temperature
        if (not isinstance(t, (int, float)) or isinstance(t, bool) or (isinstance(t, int) and t > 1e300)
                or math.isnan(t) or math.isinf(t) or t < 0):
            raise InvalidRequest("temperature", f"must be a finite number >= 0 (0 is greedy), got {t!r}")
        if math.isnan(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidRequest("top_k", f"must be >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and self.seed < 0:
            raise InvalidRequest("seed", f"must be >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestState(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float = 0.0
    state: RequestState = RequestState.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    rank: int | None = None          # attention rank while RUNNING
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0            # tokens whose KV is in the cache once the scheduled steps have run
    sample_steps: list[int] = field(default_factory=list)   # steps in flight that sample its next token(s)
    num_preemptions: int = 0
    num_recoveries: int = 0          # rank faults this request was in flight for (each recomputes it)
    first_token_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet scheduled into the KV cache: the prompt (or its rest) while prefilling, 1 in
        decode; a token still being sampled by a step in flight counts (the rank will feed it)."""
        return self.num_tokens + len(self.sample_steps) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (the engine's answer to its caller)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    finished: bool
    finish_reason: FinishReason | None
    logits: list[float] | None = None  # only when the engine was asked to return logits (tests)
