"""GenerateRequest (the wire) <-> what the engine takes, with every bad input named by its field.

Field names in errors are the proto's, dotted from the request (`sampling.top_p`, `token_ids`),
so a client in any language can find what to fix. Wire-level problems come first, for every RPC's
request (`parse_request`, `check_wire`): a message that does not parse, unknown fields (also what a
known field sent with the wrong type becomes), and oversized messages; the server answers them
INVALID_ARGUMENT and logs nothing. Then this module checks only what exists on the wire alone (the input oneof,
text prompts, stop strings, the request id's length); the values' rules are SamplingParams' own
(checked when it is built) and the deployment's limits are `validate_request`'s (checked by
`AsyncEngine.submit`): their errors name engine fields, which `wire_field` renames.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

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
    """What the deserializer returns for bytes that are not the RPC's request message (left to gRPC,
    a parse failure would answer UNKNOWN and log a traceback per call)."""

    message_type: str    # the full proto name of the message expected


def parse_request(message_class) -> Callable[[bytes], object]:
    """The request deserializer of one RPC: the message, or a MalformedRequest (it never raises)."""
    def parse(data: bytes):
        msg = message_class()
        try:
            msg.ParseFromString(data)
        except DecodeError:
            return MalformedRequest(msg.DESCRIPTOR.full_name)
        return msg
    return parse


parse_generate_request = parse_request(pb.GenerateRequest)


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: list[str]


def check_wire(msg, max_request_bytes: int) -> None:
    """Reject what is wrong with the message itself rather than its values (any RPC's request)."""
    if isinstance(msg, MalformedRequest):
        raise InvalidRequest("request", f"is not a valid {msg.message_type}")
    size = msg.ByteSize()
    if size > max_request_bytes:
        raise InvalidRequest("request", f"is {size} bytes; this server accepts at most {max_request_bytes}")
    found = _unknown_fields(msg, "request")
    if found:
        path, numbers = found
        raise InvalidRequest(path, f"field number(s) {numbers} are unknown to this server or sent "
                                   f"with the wrong type (see proto/shuttle/v1/generation.proto)")


def _unknown_fields(msg, path: str) -> tuple[str, list[int]] | None:
    """(path, field numbers) of the first message, depth first, that carries fields this server's
    proto does not know; paths are the proto's field names below the request (`sampling`)."""
    numbers = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(msg)})
    if numbers:
        return path, numbers
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        name = fd.name if path == "request" else f"{path}.{fd.name}"
        parts = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if fd.is_repeated else [(name, value)]
        for part_path, part in parts:
            found = _unknown_fields(part, part_path)
            if found:
                return found
    return None


def request_id_of(msg: pb.GenerateRequest, new_id) -> str:
    """The caller's request id (checked), or a new one from `new_id()`."""
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"has {len(msg.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
    return msg.request_id or new_id()


def to_engine_request(msg: pb.GenerateRequest, tokenizer, request_id: str) -> EngineRequest:
    """Map the fields (tokenizing a text prompt); raises InvalidRequest naming the wire field.
    `request_id` is `request_id_of(msg, ...)`."""
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
