"""The Engine on a background thread, for an asyncio server.

The Engine is single-threaded: one *engine thread* owns it and loops apply commands → step →
deliver. Everything else talks to it through a command queue (the commands, the streams and the
status snapshot are in serving/streams.py):
- `submit()` (from the event loop) is where a served request enters: it checks the request
  against the deployment's limits and that its id is not in flight (the only place either is
  checked: the Engine trusts what it is given), then queues an `AddRequest`; the engine thread
  applies it between steps and answers through a future (QueueFull);
- `abort()` queues an `AbortRequest`; it takes effect between steps, so a cancelled request's KV
  blocks are free before the next step is scheduled;
- each step's outputs go back to the loop in one `loop.call_soon_threadsafe`, which feeds every
  request's own asyncio queue (`RequestStream`).
If a step raises, the engine is dead: every in-flight and queued request fails with
`EngineStopped`, later submits fail at once, `status()` shows the reason, and `on_failure` (a
constructor argument) hears it. A shutdown is not a failure.

Faults. A rank that dies or stops must not hang every stream until a transfer deadline (a minute by
default). The *watchdog* (its own thread) looks every fault_detect_s/4 (EngineConfig): once the step
in flight has run that long it asks every rank whether it is alive (`Engine.probe`, deadline
fault_detect_s/2), so a rank that stops is declared within fault_detect_s of the step that waits on
it. A step that raises is followed by one probe too, so a failure a rank caused is blamed on it.

Recovery (EngineConfig.max_recoveries > 0, the default). A declared fault *fences* the faulty ranks
(they are killed, so the step waiting on them fails at once instead of at a deadline), and a step
that fails with a RankFault makes the engine thread recover: `Engine.recover()` replaces the ranks
on a new data-plane epoch and re-queues every running request, to be recomputed from its prompt
plus the tokens it already streamed. Clients see a pause, not an error; `status()` says
`recovering` and names the faults meanwhile, and `on_recovery` hears the start (with the faults)
and the end (None), so the server turns NOT_SERVING and back. A request caught by more than
max_recoveries faults fails alone (LOST_RANK); a recovery that itself fails stops the engine. With
max_recoveries 0, a fault fails what is in flight and stops the engine.

Failures are told twice: the details (ranks, layers, addresses, the traceback) to the log, once;
clients a short reason (`EngineStopped`: LOST_RANK, ENGINE_FAILED, SHUT_DOWN), which the server
prefixes with the request id.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Callable

from scheduler.engine import Engine, FaultyRank, RankFault
from scheduler.request import FinishReason, InvalidRequest, RequestOutput, RequestState, SamplingParams
from scheduler.scheduler import validate_request
from serving.streams import (ENGINE_FAILED, LOST_RANK, SHUT_DOWN, AbortRequest, AddRequest, EngineStatus, EngineStopped,
                             RequestStream)

log = logging.getLogger("shuttle.async_engine")


class AsyncEngine:
    def __init__(self, engine: Engine, on_failure: Callable[[str], None] | None = None,
                 on_recovery: Callable[[tuple[FaultyRank, ...] | None], None] | None = None):
        """on_failure: called on the event loop with the reason when the engine stops for good (not on
        shutdown); on_recovery: called on the event loop with the faults when a recovery starts and
        with None when it is done."""
        self.engine = engine
        self._on_failure = on_failure
        self._on_recovery = on_recovery
        self._recovering = False              # engine thread and watchdog; read by status
        self._recoveries = 0
        self._fenced_at = -1                  # _steps_ended when the watchdog last fenced a rank
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cv = threading.Condition()
        self._commands: deque[AddRequest | AbortRequest] = deque()   # guarded by _cv
        self._stopping = False                # guarded by _cv
        self._error: str | None = None        # guarded by _cv; set once, when the engine stops
        self._faults: tuple[FaultyRank, ...] = ()  # guarded by _cv; set with _error
        self._streams: dict[str, RequestStream] = {}  # touched on the loop thread only
        self._unscheduled: set[str] = set()   # engine thread only
        self._status = EngineStatus()
        self._finished = 0
        self._tokens = 0
        # Written by the engine thread, read by the watchdog (single attribute reads: no lock).
        self._stepping = False                # a step is in flight
        self._step_started = 0.0              # when the latest step started (monotonic)
        self._steps_ended = 0
        self._watchdog: threading.Thread | None = None
        self._watchdog_quit = threading.Event()
        self._probe_failures = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._count([])  # the first snapshot, before any step
        self._thread = threading.Thread(target=self._run, name="shuttle-engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="shuttle-watchdog", daemon=True)
        self._watchdog.start()

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop the engine thread (after its current step), fail what is left, stop the ranks. Blocking."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._watchdog_quit.set()
        if self._thread is not None:
            # After a fault the step in flight may wait on a rank that never answers: stopping the
            # ranks ends it, so do not wait for it first.
            self._thread.join(0.1 if self._faults else timeout_s)
        if self._watchdog is not None:
            self._watchdog.join(timeout_s)    # at most one probe's deadline
        self._fail_everything(SHUT_DOWN)
        self.engine.shutdown()

    @property
    def error(self) -> str | None:
        """Why the engine stopped (LOST_RANK, ENGINE_FAILED, SHUT_DOWN), or None while it runs."""
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
                    while not (self._commands or self._stopping or self._error or self.engine.has_work()):
                        self._cv.wait()
                    if self._stopping or self._error is not None:
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                cancelled = self._apply(commands)
                t_start = time.monotonic()
                try:
                    outputs = self._step() if self.engine.has_work() else []
                except RankFault as fault:
                    if not self.engine.config.max_recoveries or self._error is not None or self._stopping:
                        raise
                    outputs = self._recover(fault)
                t_end = time.monotonic()
                if self._error is not None:     # a fault was declared while the step ran
                    return
                admitted = self._admitted()
                self._count(outputs + cancelled)
                if outputs or cancelled or admitted:
                    self._loop.call_soon_threadsafe(self._deliver, cancelled + outputs, admitted, t_start, t_end)
        except BaseException as e:  # noqa: BLE001 - any failure of a step stops the engine
            self._step_failed(e)

    def _step(self) -> list[RequestOutput]:
        self._step_started = time.monotonic()
        self._stepping = True
        try:
            return self.engine.step()
        finally:
            self._stepping = False
            self._steps_ended += 1

    def _recover(self, fault: RankFault) -> list[RequestOutput]:
        """On the engine thread, after a step failed with a RankFault: replace the ranks and re-queue
        what was running (see the module docstring). Raises if the ranks cannot be replaced."""
        faults = self._faults or tuple(self._probe())
        self._begin_recovery(faults)
        log.error("rank fault (%s): %s; replacing the ranks and recomputing the requests in flight",
                  "; ".join(f"{f}: {f.detail}" if f.detail else str(f) for f in faults) or "no rank named by a probe",
                  _first_line(fault))
        t0 = time.monotonic()
        attempts = self.engine.config.max_recoveries
        for attempt in range(1, attempts + 1):      # a rank may die again while the new set loads
            try:
                failed = self.engine.recover()
                break
            except RankFault as again:
                if attempt == attempts:
                    raise
                log.error("recovery attempt %d of %d failed (%s); trying again", attempt, attempts, _first_line(again))
        with self._cv:
            self._recovering, self._faults = False, ()
            self._recoveries += 1
        log.warning("recovered in %.1fs: %d requests re-queued, %d failed after too many faults",
                    time.monotonic() - t0, len(self.engine.scheduler.waiting), len(failed))
        self._notify_recovery(None)
        return failed

    def _begin_recovery(self, faults: tuple[FaultyRank, ...]) -> None:
        with self._cv:
            if self._recovering:
                return
            self._recovering, self._faults = True, faults
        self._status = replace(self._status, faults=faults, recovering=True)
        self._notify_recovery(faults)

    def _notify_recovery(self, faults: tuple[FaultyRank, ...] | None) -> None:
        if self._on_recovery is not None and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._on_recovery, faults)
            except RuntimeError:
                pass

    def _step_failed(self, error: BaseException) -> None:
        if self._error is not None or self._stopping:   # the fault (or shutdown) came first: its echo
            log.info("the step in flight ended after the engine stopped: %s", _first_line(error))
            return
        log.error("engine step failed", exc_info=error)          # the details, once
        faults = self._probe()
        if faults:
            self._stop_on_fault(faults)
        else:
            self._fail_everything(ENGINE_FAILED)

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
                                    requests_finished=self._finished, tokens_generated=self._tokens,
                                    error=self._error, faults=self._faults, recovering=self._recovering,
                                    recoveries=self._recoveries)

    # ---- faults --------------------------------------------------------------------------------
    def _watch(self) -> None:
        """The watchdog thread (see the module docstring): probes while a step runs long."""
        period = self.engine.config.fault_detect_s / 4
        while not self._watchdog_quit.wait(period):
            if self._error is not None:
                return
            if not self._stepping or time.monotonic() - self._step_started < period:
                continue
            ended, recoveries = self._steps_ended, self._recoveries
            faults = self._probe()
            if self._steps_ended != ended:      # the step ended meanwhile: a silent rank was only slow
                faults = [f for f in faults if f.cause != FaultyRank.NOT_ANSWERING]
            if self._recovering or self._recoveries != recoveries:
                faults = []                     # found in a rank set that is being (or has been) replaced
            if faults and self._steps_ended != self._fenced_at:
                self._on_fault(faults)
                if self._error is not None:
                    return

    def _probe(self) -> list[FaultyRank]:
        try:
            return self.engine.probe(self.engine.config.fault_detect_s / 2)
        except Exception as e:  # noqa: BLE001 - a probe that fails finds nothing; the step's own deadline still holds
            self._probe_failures += 1
            log.warning("rank probe failed: %s", _first_line(e), exc_info=self._probe_failures == 1)
            return []

    def _on_fault(self, faults: list[FaultyRank]) -> None:
        """The fault hook (from the watchdog, or after a failed step): these ranks are dead or not
        answering. With recovery on, they are fenced (killed): the step waiting on them fails now and
        the engine thread recovers (`_recover`). Without it the engine stops: every request queued or
        in flight fails with LOST_RANK (clients get UNAVAILABLE), `status().faults` names the ranks,
        `on_failure` hears it (the server turns NOT_SERVING)."""
        if self.engine.config.max_recoveries and not self._stopping:
            self._fenced_at = self._steps_ended
            self._begin_recovery(tuple(faults))
            log.error("rank fault: %s; fencing it", "; ".join(f"{f}: {f.detail}" if f.detail else str(f) for f in faults))
            try:
                self.engine.fence(faults)
            except Exception as e:  # noqa: BLE001 - the step's own deadline still ends it
                log.warning("fencing failed: %s", _first_line(e))
            return
        self._stop_on_fault(faults)

    def _stop_on_fault(self, faults: list[FaultyRank]) -> None:
        """No recovery: every request queued or in flight fails with LOST_RANK; the engine stops."""
        ran = time.monotonic() - self._step_started
        if self._fail_everything(LOST_RANK, tuple(faults)):
            log.error("rank fault: %s (the latest step started %.1fs ago); the requests in flight failed",
                      "; ".join(f"{f}: {f.detail}" if f.detail else str(f) for f in faults), ran)

    def _fail_everything(self, reason: str, faults: tuple[FaultyRank, ...] = ()) -> bool:
        """Stop the engine (the first call wins): fail what is queued and in flight with `reason`.
        Returns whether this call stopped it."""
        with self._cv:
            if self._error is not None:
                return False
            self._error, self._faults = reason, faults
            failure = not self._stopping    # a shutdown is not a failure
            commands = list(self._commands)
            self._commands.clear()
            self._cv.notify()               # an idle engine thread ends
        self._watchdog_quit.set()
        for cmd in commands:
            if isinstance(cmd, AddRequest) and cmd.added.set_running_or_notify_cancel():
                cmd.added.set_exception(EngineStopped(reason))
        self._status = replace(self._status, error=reason, faults=faults)
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._fail_streams, reason, failure)
            except RuntimeError:  # the loop closed meanwhile: nobody is left to tell
                pass
        return True

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
            if out.finish_reason is FinishReason.ERROR:     # lived through more faults than allowed
                stream._queue.put_nowait(EngineStopped(LOST_RANK))
                del self._streams[out.request_id]
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


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
