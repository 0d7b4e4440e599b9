"""The head ↔ attention-rank boundary: everything that crosses it, as plain dataclasses.

One StepPlan per attention rank per step (a Ray call), one StepResult back. Lists, not tensors:
the head never imports torch. A request's sampling parameters travel once (`new_requests`), the
first step it runs on a rank; `released` tells the rank it may drop a request's sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.request import SamplingParams

# A token the head has not seen yet: the one the rank sampled for this request in the step before
# (the head schedules a step ahead of its results, `EngineConfig.schedule_ahead`). Only ever the
# last token of a decode chunk.
PENDING_TOKEN = -1


@dataclass(frozen=True)
class SeqChunk:
    """Tokens of one request that a step feeds through the model."""

    request_id: str
    token_ids: list[int]       # a prefill chunk, or the one token sampled last step (decode), maybe PENDING_TOKEN
    start_pos: int             # position of token_ids[0] in the sequence
    block_table: list[int]     # KV block ids covering positions [0, start_pos + len(token_ids))
    sample: bool               # True when this chunk ends the known tokens: sample the next one
    output_index: int = 0      # index of the token it samples in the request's output (seeds its RNG)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    sampling: SamplingParams   # its seed is always set by the head, so sampling is reproducible


@dataclass(frozen=True)
class StepPlan:
    step: int
    micro_batches: list[list[SeqChunk]]   # the same count on every attention rank; some may be empty
    new_requests: list[NewRequest] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    return_logits: bool = False           # tests: send back the logits each sampled token came from
    trace: bool = False                   # record TraceEvents for this step (timelines)
    # >1 (only when every chunk is a decode token): run that many decode steps, each feeding the
    # tokens just sampled; every request's tokens come back in order, `decode_steps` of them
    decode_steps: int = 1


@dataclass(frozen=True)
class SampledToken:
    request_id: str
    token_id: int
    logprob: float
    logits: list[float] | None = None


@dataclass(frozen=True)
class TraceEvent:
    """One span of work on one rank, for timelines. Times are wall-clock seconds (time.time())."""

    side: str          # "attention" or "expert"
    rank: int
    step: int
    layer: int         # -1 for work outside the layers (lm_head and sampling)
    micro_batch: int
    phase: str         # attention: "attention", "wait", "lm_head"; expert: "expert"
    start: float
    end: float
    tokens: int = -1   # expert spans: rows this rank computed (0: no token was routed here); -1: not counted


@dataclass(frozen=True)
class StepResult:
    step: int
    rank: int
    tokens: list[SampledToken]
    # seconds spent per phase on the rank (attention compute, waiting on combines, sampling, ...)
    timings: dict[str, float] = field(default_factory=dict)
    trace: list[TraceEvent] = field(default_factory=list)
