"""What crosses between the event loop and the engine thread (serving/async_engine.py): each
request's stream of outputs, the commands the loop queues, the status snapshot, and why an engine
stopped, in the words clients are told."""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field

from scheduler.engine import FaultyRank
from scheduler.request import RequestOutput, SamplingParams


# Why the engine stopped, as clients are told it (short, stable, nothing internal).
LOST_RANK = "the server lost a rank"
ENGINE_FAILED = "internal error in the engine"
SHUT_DOWN = "the server was shut down"


class EngineStopped(RuntimeError):
    """The engine lost a rank, failed or was shut down; the message is one of the reasons above."""


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot taken by the engine thread after each step (reading it never blocks a step)."""

    waiting: int = 0
    running: int = 0
    kv_usage: tuple[tuple[int, int], ...] = ()   # (used, total) blocks per attention rank
    steps: int = 0
    requests_finished: int = 0
    tokens_generated: int = 0
    error: str | None = None                  # why the engine stopped (a reason above), or None
    faults: tuple[FaultyRank, ...] = ()       # the ranks declared dead or not answering
    recovering: bool = False                  # the ranks are being replaced (faults names why)
    recoveries: int = 0                       # recoveries completed since start


@dataclass
class RequestStream:
    """One request's outputs, in order; times are `time.monotonic()` seconds."""

    request_id: str
    num_prompt_tokens: int
    arrival: float
    scheduled_at: float | None = None    # start of the first step that ran it
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    finished: bool = False
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        return item

    def _push(self, out: RequestOutput, at: float) -> None:
        self.tokens += len(out.new_token_ids)
        if out.new_token_ids:
            self.first_token_at = self.first_token_at or at
            self.last_token_at = at
        if out.finished:
            self.finished = True
        self._queue.put_nowait(out)


@dataclass(frozen=True)
class AddRequest:
    """Event loop → engine thread: add a validated request; `added` gets its id or the exception."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    added: concurrent.futures.Future


@dataclass(frozen=True)
class AbortRequest:
    """Event loop → engine thread: cancel a request (no-op if it already ended)."""

    request_id: str
