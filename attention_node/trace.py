"""StepTrace: what one attention-rank step records about itself, passed into the forward program.

It always adds up the seconds the step spent blocked on combines (StepResult.timings, for profiles);
when the plan asks for a trace it also keeps the spans (scheduler.messages.TraceEvent: "attention"
compute, "wait" on a combine, "lm_head") for timelines. Times are wall clock (time.time()) so they
line up with the expert ranks' spans; durations use perf_counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from scheduler.messages import TraceEvent

T = TypeVar("T")


class StepTrace:
    def __init__(self, rank: int, step: int, keep_spans: bool):
        self.rank = rank
        self.step = step
        self.keep_spans = keep_spans
        self.wait_s = 0.0
        self.events: list[TraceEvent] = []
        self._compute_since: dict[int, float] = {}     # micro-batch → start of its running compute span

    def compute_starts(self, micro_batch: int) -> None:
        self._compute_since[micro_batch] = time.time()

    def compute_ends(self, layer: int, micro_batch: int) -> None:
        """The micro-batch's compute span up to here (call it *before* a send: the experts may start, and
        this process be preempted, before a stamp taken after it)."""
        self._span(layer, micro_batch, "attention", self._compute_since[micro_batch], time.time())

    def wait(self, layer: int, micro_batch: int, combine: Callable[[], T]) -> T:
        """Run `combine` (a blocking wait on the expert ranks) as a "wait" span; compute resumes after it."""
        t0, start = time.perf_counter(), time.time()
        out = combine()
        self.wait_s += time.perf_counter() - t0
        self._span(layer, micro_batch, "wait", start, time.time())
        self.compute_starts(micro_batch)
        return out

    def lm_head(self, start: float) -> None:
        self._span(-1, -1, "lm_head", start, time.time())

    def _span(self, layer: int, micro_batch: int, phase: str, start: float, end: float) -> None:
        if self.keep_spans:
            self.events.append(TraceEvent("attention", self.rank, self.step, layer, micro_batch, phase, start, end))
