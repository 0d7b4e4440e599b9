"""The head's step loop: schedule → run the attention ranks → postprocess.

`RankGroup` is what the head needs from the deployment (cluster/ provides it over Ray actors; tests
provide in-process fakes). The engine is single-threaded; `serving/async_engine.py` runs it on a thread
for servers.

With `schedule_ahead` (the default) the head keeps one step in flight beyond the one it waits
for: it schedules and launches step N+1, then waits for step N's tokens and postprocesses them
while the ranks compute N+1. Step N+1's decode chunks carry PENDING_TOKEN where the head does not
know N's token yet; each attention rank feeds the token it sampled itself. The head's own work
(scheduling, the Ray call, postprocessing, the server's streaming) thus overlaps the ranks'
instead of idling them between steps. The price: a request that N finds stopped (EOS, a stop
token, or aborted) has one token computed in N+1 for nothing, and an abort or a new request
lands one step later. A length limit is known in advance and costs nothing.
"""

from __future__ import annotations

import abc
import logging
import uuid
from dataclasses import dataclass
from typing import ClassVar

from scheduler.config import EngineConfig, EngineLimits
from scheduler.messages import StepPlan, StepResult
from scheduler.request import FinishReason, RequestOutput, SamplingParams
from scheduler.scheduler import Scheduler

log = logging.getLogger("shuttle.engine")


class RankFault(RuntimeError):
    """A rank died, stalled or failed a step; the message names which. The ranks can be replaced
    (`Engine.recover`): nothing the head owns is lost."""


@dataclass(frozen=True)
class FaultyRank:
    """A rank that `RankGroup.probe` found dead or not answering: what the server reports (its
    status names the rank and the cause; clients are only told that a rank was lost)."""

    DEAD: ClassVar[str] = "dead"                        # Ray says the actor's process is gone
    NOT_ANSWERING: ClassVar[str] = "not answering"      # no answer to a health check within the deadline
    STOPPED_SERVING: ClassVar[str] = "stopped serving"  # an expert rank's serve loop ended on its own

    kind: str        # "attention" | "expert"
    rank: int
    cause: str       # DEAD | NOT_ANSWERING | STOPPED_SERVING
    detail: str = ""   # what Ray said: for the server log (may name hosts and pids), never for clients
    epoch: int = -1    # the rank set it was found in (a fault of a replaced set must not fence the new one)

    def __str__(self) -> str:
        return f"{self.kind} rank {self.rank} {self.cause}"


class RankGroup(abc.ABC):
    """The attention ranks of one deployment, seen from the head."""

    @abc.abstractmethod
    def launch(self, plans: list[StepPlan]) -> object:
        """Start a step on every attention rank (plans[i] → rank i) without waiting; returns a handle.
        Steps run in launch order, and each is collected once, in launch order."""

    @abc.abstractmethod
    def collect(self, handle: object) -> list[StepResult]:
        """The results of a launched step, one per attention rank. Raises RankFault naming the failed
        rank if any rank fails or misses its deadline."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop every rank (attention and expert) and release their resources."""

    def fence(self, faults: list[FaultyRank]) -> None:
        """Make sure these ranks take part in nothing more (kill them), so that whatever waits on them
        fails now instead of at a deadline. Called from another thread while a step runs."""

    def recover(self) -> None:
        """Replace the ranks after a failed step, on a new data plane; their request state is lost
        (the head re-queues it). Groups that cannot recover raise."""
        raise RuntimeError(f"{type(self).__name__} cannot recover from a rank fault")

    def probe(self, timeout_s: float) -> list[FaultyRank]:
        """Ask every rank (attention and expert) whether it is alive, answering within `timeout_s`;
        returns the ones that are not. Called from another thread while a step is in flight, so it
        must not wait on the step. In-process groups have no rank to lose."""
        return []


class InProcessRanks(RankGroup):
    """Ranks called directly in this process (tests, fakes): a step runs when it is collected."""

    @abc.abstractmethod
    def run_step(self, plans: list[StepPlan]) -> list[StepResult]:
        """Run one step on every attention rank and return their results."""

    def launch(self, plans: list[StepPlan]) -> object:
        return plans

    def collect(self, handle: object) -> list[StepResult]:
        return self.run_step(handle)

    def shutdown(self) -> None:
        pass


@dataclass(frozen=True)
class Completion:
    """A finished request, as offline generation returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    logits: list[list[float]] | None = None


class Engine:
    def __init__(self, config: EngineConfig, limits: EngineLimits, ranks: RankGroup, *,
                 return_logits: bool = False, record_trace: bool = False):
        """return_logits: every output carries the logits its token came from (tests); record_trace: the
        attention ranks' TraceEvents of every step accumulate in `trace` (timelines)."""
        self.config = config
        self.limits = limits
        self.ranks = ranks
        self.scheduler = Scheduler(config, limits)
        self.return_logits = return_logits
        self.record_trace = record_trace
        self.trace: list = []
        self._in_flight: list[object] = []   # handles of launched steps, oldest first

    def add_request(self, prompt_token_ids: list[int], sampling: SamplingParams,
                    request_id: str | None = None) -> str:
        request_id = request_id or uuid.uuid4().hex
        self.scheduler.add(request_id, prompt_token_ids, sampling)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight)

    def step(self) -> list[RequestOutput]:
        """Collect the oldest step in flight (launching it first if none is) and return its outputs;
        with `schedule_ahead`, the next step is launched before waiting."""
        while len(self._in_flight) <= self.config.schedule_ahead:
            plans = self.scheduler.schedule(return_logits=self.return_logits, trace=self.record_trace)
            if plans is None:
                break
            self._in_flight.append(self.ranks.launch(plans))
        return self._collect_oldest() if self._in_flight else []

    def drain(self) -> list[RequestOutput]:
        """Collect every step in flight (no new one is scheduled)."""
        outputs = []
        while self._in_flight:
            outputs += self._collect_oldest()
        return outputs

    def _collect_oldest(self) -> list[RequestOutput]:
        results = self.ranks.collect(self._in_flight.pop(0))
        if self.record_trace:
            self.trace += [event for r in results for event in r.trace]
        return self.scheduler.update(results)

    def probe(self, timeout_s: float) -> list[FaultyRank]:
        """The ranks that are dead or not answering (`RankGroup.probe`); safe from another thread
        while `step()` waits on the ranks (the server's watchdog calls it)."""
        return self.ranks.probe(timeout_s)

    def fence(self, faults: list[FaultyRank]) -> None:
        """`RankGroup.fence`; safe from another thread (the server's watchdog calls it)."""
        self.ranks.fence(faults)

    def recover(self) -> list[RequestOutput]:
        """After a step failed (a rank died or stalled): forget the steps in flight, re-queue every
        running request to be recomputed from its prompt plus the tokens it has (clients see a pause;
        greedy and seeded outputs are unchanged), and have the rank group replace its ranks. Returns
        the requests that have now lived through more than `max_recoveries` faults, finished with
        FinishReason.ERROR. Raises if the ranks cannot be replaced."""
        self._in_flight.clear()
        failed = self.scheduler.requeue_all(self.config.max_recoveries)
        self.ranks.recover()
        return failed

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams],
                 progress=None) -> list[Completion]:
        """Offline batch generation: every prompt to completion, in input order."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        ids = [self.add_request(p, s) for p, s in zip(prompts, params)]
        tokens = {i: [] for i in ids}
        logprobs = {i: [] for i in ids}
        logits = {i: [] for i in ids}
        reasons: dict[str, FinishReason] = {}
        while len(reasons) < len(ids):
            try:
                outputs = self.step()
            except RankFault as fault:
                if not self.config.max_recoveries:
                    raise
                log.warning("step failed (%s); replacing the ranks and recomputing the requests in flight", fault)
                outputs = self.recover()
            for out in outputs:
                tokens[out.request_id] += out.new_token_ids
                logprobs[out.request_id] += out.new_logprobs
                if out.logits is not None:
                    logits[out.request_id].append(out.logits)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
                    if progress:
                        progress(len(reasons), len(ids))
        self.drain()   # a step launched ahead may still run for requests that have just finished
        return [Completion(i, p, tokens[i], logprobs[i], reasons[i], logits[i] or None)
                for i, p in zip(ids, prompts)]

    def shutdown(self) -> None:
        self.ranks.shutdown()
