"""The Engine on a background thread, for an asyncio server.

The Engine is single-threaded: one *engine thread* owns it and loops apply commands → step →
deliver. Everything else talks to it through a command queue:
- `submit()` (from the event loop) is where a served request enters: it checks the request
  against the deployment's limits and that its id is not in flight (the only place either is
  checked: the Engine trusts what it is given), then queues an `AddRequest`; the engine thread
  applies it between steps and answers through a future (QueueFull);
- `abort()` queues an `AbortRequest`; it takes effect between steps, so a cancelled request's KV
  blocks are free before the next step is scheduled;
- each step's outputs go back to the loop in one `loop.call_soon_threadsafe`, which feeds every
  request's own asyncio queue (`RequestStream`).
If a step raises, the engine is dead: every in-flight and queued request fails with
`EngineStopped` carrying the cause, later submits fail at once, `status()` shows the error, and
`on_failure` (a constructor argument) hears the reason. A shutdown is not a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from scheduler.engine import Engine
from scheduler.request import InvalidRequest, RequestOutput, RequestState, SamplingParams
from scheduler.scheduler import validate_request

log = logging.getLogger("shuttle.async_engine")


class EngineStopped(RuntimeError):
    """The engine failed or was shut down; the message says which and why."""


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot taken by the engine thread after each step (reading it never blocks a step)."""

    waiting: int = 0
    running: int = 0
    kv_usage: tuple[tuple[int, int], ...] = ()   # (used, total) blocks per attention rank
    steps: int = 0
    requests_finished: int = 0
    tokens_generated: int = 0
    error: str | None = None


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


class AsyncEngine:
    def __init__(self, engine: Engine, on_failure: Callable[[str], None] | None = None):
        """on_failure: called on the event loop with the reason when a step fails (not on shutdown)."""
        self.engine = engine
        self._on_failure = on_failure
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cv = threading.Condition()
        self._commands: deque[AddRequest | AbortRequest] = deque()   # guarded by _cv
        self._stopping = False                # guarded by _cv
        self._error: str | None = None        # guarded by _cv
        self._streams: dict[str, RequestStream] = {}  # touched on the loop thread only
        self._unscheduled: set[str] = set()   # engine thread only
        self._status = EngineStatus()
        self._finished = 0
        self._tokens = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._count([])  # the first snapshot, before any step
        self._thread = threading.Thread(target=self._run, name="shuttle-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop the engine thread (after its current step), fail what is left, stop the ranks. Blocking."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._fail_everything("the engine was shut down")
        self.engine.shutdown()

    @property
    def error(self) -> str | None:
        return self._error

    def status(self) -> EngineStatus:
        return self._status

    # ---- requests (event-loop side) ----------------------------------------------------------
    async def submit(self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: str) -> RequestStream:
        """Queue a request; raises InvalidRequest (at once, naming an engine field), QueueFull (from
        the engine thread) or EngineStopped. `sampling` checked its own values when it was built."""
        validate_request(self.engine.limits, prompt_token_ids, sampling)
        if request_id in self._streams:     # until its last output is delivered (or it fails)
            raise InvalidRequest("request_id", f"{request_id!r} is already in flight")
        stream = RequestStream(request_id, len(prompt_token_ids), time.monotonic())
        added: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._error is not None:
                raise EngineStopped(self._error)
            self._streams[request_id] = stream
            self._commands.append(AddRequest(request_id, list(prompt_token_ids), sampling, added))
            self._cv.notify()
        try:
            await asyncio.wrap_future(added)
        except asyncio.CancelledError:  # the caller went away while queued: take the request back out
            self._streams.pop(request_id, None)
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request (no-op if it already ended); applied before the next step."""
        with self._cv:
            if self._error is None and not self._stopping:
                self._commands.append(AbortRequest(request_id))
                self._cv.notify()

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or self.engine.has_work()):
                        self._cv.wait()
                    if self._stopping:
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                cancelled = self._apply(commands)
                t_start = time.monotonic()
                outputs = self.engine.step() if self.engine.has_work() else []
                t_end = time.monotonic()
                admitted = self._admitted()
                self._count(outputs + cancelled)
                if outputs or cancelled or admitted:
                    self._loop.call_soon_threadsafe(self._deliver, cancelled + outputs, admitted, t_start, t_end)
        except BaseException as e:  # noqa: BLE001 - any failure of a step kills the engine
            log.exception("engine step failed")
            self._fail_everything(f"engine step failed: {type(e).__name__}: {e}")

    def _apply(self, commands: list[AddRequest | AbortRequest]) -> list[RequestOutput]:
        cancelled = []
        for cmd in commands:
            if isinstance(cmd, AddRequest):
                if not cmd.added.set_running_or_notify_cancel():
                    continue  # the caller went away before the add was applied
                try:
                    self.engine.add_request(cmd.prompt_token_ids, cmd.sampling, cmd.request_id)
                except Exception as e:  # noqa: BLE001 - QueueFull (or a bug) goes back to the caller
                    cmd.added.set_exception(e)
                    continue
                self._unscheduled.add(cmd.request_id)
                cmd.added.set_result(cmd.request_id)
            else:
                out = self.engine.abort(cmd.request_id)
                self._unscheduled.discard(cmd.request_id)
                if out is not None:
                    cancelled.append(out)
        return cancelled

    def _admitted(self) -> list[str]:
        requests = self.engine.scheduler.requests
        done = [rid for rid in self._unscheduled
                if rid not in requests or requests[rid].state is not RequestState.WAITING]
        self._unscheduled.difference_update(done)
        return done

    def _count(self, outputs: list[RequestOutput]) -> None:
        s = self.engine.scheduler
        self._finished += sum(o.finished for o in outputs)
        self._tokens += sum(len(o.new_token_ids) for o in outputs)
        self._status = EngineStatus(waiting=len(s.waiting), running=sum(len(r) for r in s.running),
                                    kv_usage=tuple(s.kv_usage()), steps=s.step_id,
                                    requests_finished=self._finished, tokens_generated=self._tokens)

    def _fail_everything(self, reason: str) -> None:
        with self._cv:
            if self._error is None:
                self._error = reason
            failure = not self._stopping    # a step that fails during shutdown is not reported either
            commands = list(self._commands)
            self._commands.clear()
        for cmd in commands:
            if isinstance(cmd, AddRequest) and cmd.added.set_running_or_notify_cancel():
                cmd.added.set_exception(EngineStopped(reason))
        self._status = EngineStatus(**{**self._status.__dict__, "error": reason})
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._fail_streams, reason, failure)
            except RuntimeError:  # the loop closed meanwhile: nobody is left to tell
                pass

    # ---- the event-loop side of delivery -----------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput], admitted: list[str], t_start: float, t_end: float) -> None:
        for rid in admitted:
            stream = self._streams.get(rid)
            if stream is not None and stream.scheduled_at is None:
                stream.scheduled_at = t_start
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._push(out, t_end)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_streams(self, reason: str, failure: bool) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._queue.put_nowait(EngineStopped(reason))
        if failure and self._on_failure is not None:
            self._on_failure(reason)
