"""GenerateRequest (the wire) <-> what the engine takes, with every bad input named by its field.

Field names in errors are the proto's, dotted from the request (`sampling.top_p`, `token_ids`),
so a client in any language can find what to fix. Wire-level problems come first: a message that
does not parse, unknown fields (also what a known field sent with the wrong type becomes), and
oversized messages. Then this module checks only what exists on the wire alone (the input oneof,
text prompts, stop strings, the request id's length); the values' rules are SamplingParams' own
(checked when it is built) and the deployment's limits are `validate_request`'s (checked by
`AsyncEngine.submit`): their errors name engine fields, which `wire_field` renames.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from scheduler.request import InvalidRequest, SamplingParams
from serving.v1 import generation_pb2 as pb

DEFAULT_MAX_TOKENS = 16
MAX_REQUEST_ID_CHARS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


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


def to_engine_request(msg: pb.GenerateRequest, tokenizer, new_id) -> EngineRequest:
    """Map the fields (tokenizing a text prompt); raises InvalidRequest naming the wire field."""
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
    else:
        prompt = list(msg.token_ids.ids)
    sampling, stop = to_sampling(msg.sampling, msg.HasField("sampling"), tokenizer)
    return EngineRequest(request_id, prompt, sampling, stop)


def to_sampling(s: pb.SamplingParams, given: bool, tokenizer) -> tuple[SamplingParams, list[str]]:
    if not given:
        return SamplingParams(max_tokens=DEFAULT_MAX_TOKENS), []
    stop = list(s.stop)
    if stop and tokenizer is None:
        raise InvalidRequest("sampling.stop", "this model has no tokenizer, so no text to match: use stop_token_ids")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("sampling.stop", f"has {len(stop)} strings; the limit is {MAX_STOP_STRINGS}")
    for i, text in enumerate(stop):
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            raise InvalidRequest(f"sampling.stop[{i}]", f"must have 1 to {MAX_STOP_CHARS} characters, got {len(text)}")
    try:
        params = SamplingParams(max_tokens=s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
                                temperature=float(s.temperature), top_p=float(s.top_p) if s.HasField("top_p") else 1.0,
                                top_k=s.top_k, seed=s.seed if s.HasField("seed") else None,
                                stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos, logprobs=s.logprobs)
    except InvalidRequest as e:
        raise InvalidRequest(wire_field(e.field, None), e.reason) from None
    return params, stop


def wire_field(field_name: str, kind: str | None) -> str:
    """An engine field name (SamplingParams', `validate_request`'s) in proto terms; `kind` is the
    request's input (`prompt` or `token_ids`): the engine calls both the prompt. Wire names pass."""
    if field_name in SAMPLING_FIELDS:
        return f"sampling.{field_name}"
    if field_name in ("prompt", "token_ids"):
        return "token_ids" if kind == "token_ids" else "prompt"
    return field_name
