"""GenerateRequest (the wire) → what the engine takes, with every bad input named by its field.

Field names in errors are the proto's, dotted from the request (`sampling.top_p`, `token_ids`),
so a client in any language can find what to fix. Wire-level problems come first: a message that
does not parse, unknown fields (also what a known field sent with the wrong type becomes), and
oversized messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from scheduler.request import InvalidRequest, SamplingParams
from shuttle.v1 import generation_pb2 as pb

DEFAULT_MAX_TOKENS = 16
MAX_REQUEST_ID_CHARS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class MalformedRequest:
    """What the deserializer returns for bytes that are not a GenerateRequest (gRPC would say INTERNAL)."""

    error: str


def parse_generate_request(data: bytes) -> pb.GenerateRequest | MalformedRequest:
    msg = pb.GenerateRequest()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        return MalformedRequest(str(e))
    return msg


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: list[str]


def check_wire(msg, max_request_bytes: int) -> None:
    """Reject what is wrong with the message itself rather than its values."""
    if isinstance(msg, MalformedRequest):
        raise InvalidRequest("request", f"is not a valid shuttle.v1.GenerateRequest: {msg.error}")
    size = msg.ByteSize()
    if size > max_request_bytes:
        raise InvalidRequest("request", f"is {size} bytes; this server accepts at most {max_request_bytes}")
    for path, part in (("request", msg), ("sampling", msg.sampling), ("token_ids", msg.token_ids)):
        unknown = [f.field_number for f in unknown_fields.UnknownFieldSet(part)]
        if unknown:
            raise InvalidRequest(path, f"field number(s) {sorted(set(unknown))} are unknown to this server or sent "
                                       f"with the wrong type (see proto/shuttle/v1/generation.proto)")


def to_engine_request(msg: pb.GenerateRequest, tokenizer, vocab_size: int, new_id) -> EngineRequest:
    """Convert and validate the values; raises InvalidRequest naming the field."""
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"has {len(msg.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
    request_id = msg.request_id or new_id()
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "set either prompt (text) or token_ids")
    if kind == "prompt":
        if not msg.prompt:
            raise InvalidRequest("prompt", "is empty")
        if tokenizer is None:
            raise InvalidRequest("prompt", "this model has no tokenizer (token ids only): send token_ids instead")
        prompt = tokenizer.encode(msg.prompt).ids
        if not prompt:
            raise InvalidRequest("prompt", "tokenizes to no tokens")
    else:
        prompt = list(msg.token_ids.ids)
        if not prompt:
            raise InvalidRequest("token_ids", "is empty")
    sampling, stop = to_sampling(msg.sampling, msg.HasField("sampling"), tokenizer, vocab_size)
    return EngineRequest(request_id, prompt, sampling, stop)


def to_sampling(s: pb.SamplingParams, given: bool, tokenizer, vocab_size: int) -> tuple[SamplingParams, list[str]]:
    if not given:
        return SamplingParams(max_tokens=DEFAULT_MAX_TOKENS), []
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens <= 0:
        raise InvalidRequest("sampling.max_tokens", f"must be >= 1, got {max_tokens}")
    if math.isnan(s.temperature) or math.isinf(s.temperature) or s.temperature < 0:
        raise InvalidRequest("sampling.temperature", f"must be a finite number >= 0 (0 is greedy), got {s.temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if math.isnan(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {top_p}")
    if s.top_k < 0:
        raise InvalidRequest("sampling.top_k", f"must be >= 0 (0 disables it), got {s.top_k}")
    if s.HasField("seed") and s.seed < 0:
        raise InvalidRequest("sampling.seed", f"must be >= 0, got {s.seed}")
    bad = [t for t in s.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest("sampling.stop_token_ids", f"{bad[:5]} outside the vocabulary [0, {vocab_size})")
    stop = list(s.stop)
    if stop and tokenizer is None:
        raise InvalidRequest("sampling.stop", "this model has no tokenizer, so no text to match: use stop_token_ids")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("sampling.stop", f"has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}")
    for i, text in enumerate(stop):
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            raise InvalidRequest(f"sampling.stop[{i}]", f"must have 1 to {MAX_STOP_CHARS} characters, got {len(text)}")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=float(s.temperature), top_p=float(top_p),
                                top_k=s.top_k, seed=s.seed if s.HasField("seed") else None,
                                stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos, logprobs=s.logprobs)
    except InvalidRequest as e:
        raise InvalidRequest(f"sampling.{e.field}", str(e).split(": ", 1)[-1]) from None
    return params, stop


def engine_field(field_name: str, kind: str | None) -> str:
    """The scheduler's field names (it validates the prompt against the context) in proto terms."""
    if field_name in ("max_tokens", "temperature", "top_p", "top_k"):
        return f"sampling.{field_name}"
    if field_name in ("prompt", "token_ids"):
        return "token_ids" if kind == "token_ids" else "prompt"
    return field_name
