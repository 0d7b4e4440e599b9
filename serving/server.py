"""The gRPC front door: `shuttle.v1.Generation` over one AsyncEngine, plus health and reflection.

Lifecycle: `start()` binds the port with health NOT_SERVING (load balancers wait while weights
load; generation calls get UNAVAILABLE); `attach()` hands it the engine (run on a thread by an
AsyncEngine it owns from then on) and turns health SERVING; `drain()` turns health NOT_SERVING,
refuses new calls, lets in-flight requests finish for a grace period, cancels the rest (they end
with FINISH_REASON_CANCELLED), stops the server and the engine. `drain()` before `attach()` (the
model failed to load) just stops the server.

Every call in flight is a `GenerationJob`: its engine stream, detokeniser and stop strings. When a
call ends early (client cancel, disconnect, deadline) its handler is cancelled and the job aborts
the engine request, so the KV blocks are free at the next step.

A request is checked once on its way in: the wire mapping (`wire.py`) checks what only the wire
has, SamplingParams its values, `AsyncEngine.submit` the deployment's limits and the request id.
Every RPC's request bytes go through the wire checks: bytes that are not its message, or carry
fields this server does not know, are INVALID_ARGUMENT (nothing logged).

What clients are told when a call fails is short and stable: a status code, then "request <id>:
<reason>" (UNAVAILABLE: loading, draining, the server lost a rank, the engine failed; INTERNAL:
a bug); the details (ranks, addresses, tracebacks) are logged once, by the engine or here. When the
engine loses a rank (its watchdog: `async_engine.py`), health turns NOT_SERVING and
GetServerStatus names the ranks and causes (`faults`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scheduler.engine import Engine, FaultyRank
from scheduler.request import FinishReason, InvalidRequest
from scheduler.scheduler import QueueFull
from serving.async_engine import AsyncEngine
from serving.streams import EngineStopped, RequestStream
from serving.detokenize import IncrementalDetokenizer, StopStrings
from serving.v1 import generation_pb2 as pb
from serving.wire import (check_wire, parse_generate_request, parse_request, request_id_of, to_engine_request,
                          wire_field)

log = logging.getLogger("shuttle.server")

SERVICE = "shuttle.v1.Generation"
FINISH = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.STOP: pb.FINISH_REASON_STOP,
          FinishReason.EOS: pb.FINISH_REASON_EOS, FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED}
RANK_KIND = {"attention": pb.RankFault.KIND_ATTENTION, "expert": pb.RankFault.KIND_EXPERT}
FAULT_CAUSE = {FaultyRank.DEAD: pb.RankFault.CAUSE_DEAD, FaultyRank.NOT_ANSWERING: pb.RankFault.CAUSE_NOT_ANSWERING,
               FaultyRank.STOPPED_SERVING: pb.RankFault.CAUSE_STOPPED_SERVING}


@dataclass(frozen=True)
class ServedModel:
    """What clients are told about the model (built by the console script from the deployment)."""

    name: str
    family: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    num_layers: int
    num_experts: int
    experts_per_token: int
    hidden_size: int
    dtype: str
    expert_owner: tuple[int, ...]   # expert e lives on expert rank expert_owner[e]
    tokenizer: object | None = None  # a `tokenizers.Tokenizer`, or None for token-id-only models


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051                   # 0: any free port (see `Server.port`)
    max_request_bytes: int = 1 << 20    # larger requests: INVALID_ARGUMENT; beyond 4x, gRPC's RESOURCE_EXHAUSTED
    auth_token: str | None = None       # require "authorization: Bearer <token>" (health is exempt)
    tls_cert: bytes | None = None       # PEM; with tls_key, serve TLS only
    tls_key: bytes | None = None
    drain_grace_s: float = 30.0


@dataclass(eq=False)   # a job is itself, not its fields: Server keeps a set of them
class GenerationJob:
    """One call in flight: turns engine outputs into token ids, text and a finish reason."""

    request_id: str
    prompt_len: int
    stream: RequestStream
    detok: IncrementalDetokenizer | None
    stops: StopStrings
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish: FinishReason | None = None

    def feed(self, out) -> tuple[list[int], str, list[float]]:
        """New (token ids, final text, logprobs) from one engine output; sets `finish` at the end."""
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs
        text = ""
        if self.detok is not None:
            text, stopped = self.stops.feed(self.detok.add(out.new_token_ids))
            if stopped:
                self.finish = FinishReason.STOP
            elif out.finished:
                tail, stopped = self.stops.feed(self.detok.flush())
                text += tail if stopped else tail + self.stops.flush()
                self.finish = FinishReason.STOP if stopped else out.finish_reason
        elif out.finished:
            self.finish = out.finish_reason
        self.text.append(text)
        return list(out.new_token_ids), text, list(out.new_logprobs)


class Server:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.engine: AsyncEngine | None = None
        self.model: ServedModel | None = None
        self.port: int | None = None
        self.state = pb.ServerStatus.STATE_LOADING
        self.health = health.aio.HealthServicer()
        self.started_at = time.monotonic()
        self.failed = asyncio.Event()       # set when the engine dies (not on a drain)
        self._jobs: set[GenerationJob] = set()
        limit = max(4 * options.max_request_bytes, 4 << 20)
        interceptors = [BearerTokenAuth(options.auth_token)] if options.auth_token else []
        self._grpc = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)])

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> int:
        self._grpc.add_generic_rpc_handlers([self._handlers()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], self._grpc)
        address = f"{self.options.host}:{self.options.port}"
        if self.options.tls_cert:
            creds = grpc.ssl_server_credentials([(self.options.tls_key, self.options.tls_cert)])
            self.port = self._grpc.add_secure_port(address, creds)
        else:
            self.port = self._grpc.add_insecure_port(address)
        for service in ("", SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._grpc.start()
        return self.port

    async def attach(self, engine: Engine, model: ServedModel) -> None:
        """Serve this engine: start it on a thread driven from this loop; health turns SERVING."""
        self.engine = AsyncEngine(engine, on_failure=self._engine_failed, on_recovery=self._recovering)
        self.engine.start()
        self.model = model
        self.state = pb.ServerStatus.STATE_SERVING
        for service in ("", SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting, finish in-flight work within the grace period, then stop everything."""
        grace_s = self.options.drain_grace_s if grace_s is None else grace_s
        if self.state != pb.ServerStatus.STATE_FAILED:
            self.state = pb.ServerStatus.STATE_DRAINING
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace_s
        while self._jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._jobs:
            log.warning("drain: cancelling %d requests still running after %.1fs", len(self._jobs), grace_s)
            for job in list(self._jobs):
                self.engine.abort(job.request_id)
            end = time.monotonic() + 5.0
            while self._jobs and time.monotonic() < end:
                await asyncio.sleep(0.05)
        await self._grpc.stop(grace=2.0)
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)

    @property
    def calls_in_flight(self) -> int:
        """Generation calls running now (what a drain waits for)."""
        return len(self._jobs)

    @property
    def engine_error(self) -> str | None:
        """Why the engine failed, or None."""
        return None if self.engine is None else self.engine.error

    def _recovering(self, faults) -> None:
        """The engine replaces its ranks (faults) or is done (None): NOT_SERVING meanwhile."""
        if self.state not in (pb.ServerStatus.STATE_SERVING, pb.ServerStatus.STATE_RECOVERING):
            return          # draining or failed: those states win
        self.state = pb.ServerStatus.STATE_RECOVERING if faults else pb.ServerStatus.STATE_SERVING
        serving = health_pb2.HealthCheckResponse.NOT_SERVING if faults else health_pb2.HealthCheckResponse.SERVING
        for service in ("", SERVICE):
            asyncio.ensure_future(self.health.set(service, serving))

    def _engine_failed(self, reason: str) -> None:
        self.state = pb.ServerStatus.STATE_FAILED
        for service in ("", SERVICE):
            asyncio.ensure_future(self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING))
        self.failed.set()

    # ---- handlers ----------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(fn, request, out):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=parse_request(request),
                                                       response_serializer=out.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": unary(self.Generate, pb.GenerateRequest, pb.GenerateResponse),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.GenerateStream, request_deserializer=parse_generate_request,
                response_serializer=pb.GenerateChunk.SerializeToString),
            "GetModelInfo": unary(self.GetModelInfo, pb.GetModelInfoRequest, pb.ModelInfo),
            "GetServerStatus": unary(self.GetServerStatus, pb.GetServerStatusRequest, pb.ServerStatus),
        })

    async def Generate(self, request, context) -> pb.GenerateResponse:
        request_id = await self._checked(request, context)
        async with self._answering(request_id, context):
            job = await self._begin(request_id, request, context)
            try:
                async for out in job.stream:
                    job.feed(out)
                    if job.finish is not None:
                        break
                return pb.GenerateResponse(request_id=job.request_id, token_ids=job.token_ids, text="".join(job.text),
                                           finish_reason=FINISH[job.finish], logprobs=job.logprobs if self._wants_logprobs(request) else [],
                                           usage=self._usage(job), timing=self._timing(job.stream))
            finally:
                self._end(job)

    async def GenerateStream(self, request, context):
        request_id = await self._checked(request, context)
        logprobs = self._wants_logprobs(request)
        async with self._answering(request_id, context):
            job = await self._begin(request_id, request, context)
            try:
                async for out in job.stream:
                    ids, text, lps = job.feed(out)
                    chunk = pb.GenerateChunk(request_id=job.request_id, token_ids=ids, text=text,
                                             logprobs=lps if logprobs else [])
                    if job.finish is not None:
                        chunk.finish_reason = FINISH[job.finish]
                        chunk.usage.CopyFrom(self._usage(job))
                        chunk.timing.CopyFrom(self._timing(job.stream))
                        yield chunk
                        return
                    yield chunk
            finally:
                self._end(job)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        await self._checked(request, context)
        m = self.model
        if m is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        async with self._answering(None, context):
            return pb.ModelInfo(name=m.name, family=m.family, vocab_size=m.vocab_size, max_model_len=m.max_model_len,
                                eos_token_ids=m.eos_token_ids, has_tokenizer=m.tokenizer is not None,
                                num_layers=m.num_layers, num_experts=m.num_experts,
                                experts_per_token=m.experts_per_token, hidden_size=m.hidden_size, dtype=m.dtype,
                                max_request_bytes=self.options.max_request_bytes)

    async def GetServerStatus(self, request, context) -> pb.ServerStatus:
        await self._checked(request, context)
        async with self._answering(None, context):
            return self._server_status()

    def _server_status(self) -> pb.ServerStatus:
        status = pb.ServerStatus(state=self.state, uptime_s=time.monotonic() - self.started_at)
        if self.engine is None:
            return status
        c = self.engine.engine.config
        s = self.engine.status()
        status.MergeFrom(pb.ServerStatus(
            attention_ranks=c.attention_ranks, expert_ranks=c.expert_ranks, micro_batches=c.micro_batches,
            max_batch_tokens=c.max_batch_tokens, max_num_seqs=c.max_num_seqs, max_queue=c.max_queue,
            waiting=s.waiting, running=s.running, steps=s.steps, requests_finished=s.requests_finished,
            tokens_generated=s.tokens_generated, error=s.error or "", recoveries=s.recoveries))
        block_size = self.engine.engine.limits.block_size
        for r, (used, total) in enumerate(s.kv_usage):
            status.kv.add(attention_rank=r, used_blocks=used, total_blocks=total, block_size=block_size)
        owner = self.model.expert_owner
        for r in range(c.expert_ranks):
            status.placement.add(expert_rank=r, expert_ids=[e for e, o in enumerate(owner) if o == r])
        for f in s.faults:
            status.faults.add(kind=RANK_KIND.get(f.kind, pb.RankFault.KIND_UNSPECIFIED), rank=f.rank,
                              cause=FAULT_CAUSE.get(f.cause, pb.RankFault.CAUSE_UNSPECIFIED))
        return status

    # ---- a call's start and end --------------------------------------------------------------
    async def _checked(self, request, context) -> str | None:
        """The wire checks every RPC's request passes (INVALID_ARGUMENT ends the call here); returns a
        GenerateRequest's id, the caller's or a new one."""
        try:
            check_wire(request, self.options.max_request_bytes)
            return request_id_of(request, lambda: uuid.uuid4().hex) if isinstance(request, pb.GenerateRequest) else None
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.field}: {e.reason}")

    @contextlib.asynccontextmanager
    async def _answering(self, request_id: str | None, context):
        """How a call that fails is answered: a stable code and a short message naming the request;
        anything unforeseen is logged here, once, with its traceback, and answered INTERNAL."""
        told = f"request {request_id}: " if request_id else ""
        try:
            yield
        except grpc.aio.AbortError:     # the call was already answered
            raise
        except EngineStopped as e:      # the engine logged why
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{told}{e}; retry later")
        except Exception:  # noqa: BLE001 - a bug: the client gets a short answer, the log the details
            log.exception("%scall failed", told)
            await context.abort(grpc.StatusCode.INTERNAL, f"{told}internal error")

    async def _begin(self, request_id: str, request, context) -> GenerationJob:
        told = f"request {request_id}: "
        if self.state == pb.ServerStatus.STATE_LOADING:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{told}the model is still loading; retry when health is SERVING")
        if self.state == pb.ServerStatus.STATE_DRAINING:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{told}the server is draining (shutting down)")
        if self.state == pb.ServerStatus.STATE_FAILED:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{told}{self.engine.error}; retry later")
        m = self.model
        kind = request.WhichOneof("input")
        try:
            req = to_engine_request(request, m.tokenizer, request_id)
            stream = await self.engine.submit(req.prompt_token_ids, req.sampling, req.request_id)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{wire_field(e.field, kind)}: {e.reason}")
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{told}{e}; retry later")
        detok = IncrementalDetokenizer(m.tokenizer, req.prompt_token_ids) if m.tokenizer is not None else None
        job = GenerationJob(req.request_id, len(req.prompt_token_ids), stream, detok, StopStrings(req.stop))
        self._jobs.add(job)
        return job

    def _end(self, job: GenerationJob) -> None:
        """Always runs (finished, cancelled, deadline, error): a request the engine still runs is aborted."""
        self._jobs.discard(job)
        if not job.stream.finished:   # a stop string matched, or the call ended early
            self.engine.abort(job.request_id)

    @staticmethod
    def _wants_logprobs(request) -> bool:
        return request.sampling.logprobs

    @staticmethod
    def _usage(job: GenerationJob) -> pb.Usage:
        return pb.Usage(prompt_tokens=job.prompt_len, completion_tokens=len(job.token_ids))

    @staticmethod
    def _timing(stream) -> pb.Timing:
        end = stream.last_token_at or time.monotonic()
        first = stream.first_token_at or end
        n = 0 if stream.first_token_at is None else max(0, stream.tokens - 1)
        return pb.Timing(queue_s=(stream.scheduled_at or end) - stream.arrival, time_to_first_token_s=first - stream.arrival,
                         time_per_output_token_s=(end - first) / n if n else 0.0, total_s=end - stream.arrival)


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Every call but health checks needs `authorization: Bearer <token>` (compared in constant time)."""

    EXEMPT = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)
        self._deny_bidi = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.EXEMPT):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return await continuation(details)
        if details.method.endswith("/GenerateStream"):
            return self._deny_stream
        if "ServerReflection" in details.method:
            return self._deny_bidi
        return self._deny
