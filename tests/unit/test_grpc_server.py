"""The gRPC server over a real channel, with a fake deployment (no Ray): every status code and message."""

import dataclasses
import logging
import random
import threading
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpc_harness import ServerThread, self_signed
from scheduler.engine import FaultyRank
from serving.server import ServerOptions
from serving_fakes import VOCAB, expected_tokens, fake_engine, served_model, tokenizer
from serving.v1 import generation_pb2 as pb
from shuttle.client import ShuttleClient

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server():
    engine = fake_engine(step_s=0.002, max_len=256, max_queue=64)
    s = ServerThread().attach(engine, served_model(engine))
    yield s
    s.drain(1)


@pytest.fixture(scope="module")
def client(server):
    with ShuttleClient(server.address, timeout_s=30) as c:
        yield c


def code_and_message(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_unary_and_stream_agree_with_the_model(client):
    prompt = [5, 6, 7]
    want = expected_tokens(prompt, 12)
    unary = client.generate(token_ids=prompt, max_tokens=12, logprobs=True, request_id="mine")
    assert list(unary.token_ids) == want and unary.request_id == "mine"
    assert unary.finish_reason == pb.FINISH_REASON_LENGTH and unary.text == tokenizer().decode(want)
    assert list(unary.logprobs) == [-0.5] * 12
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (3, 12)
    assert 0 <= unary.timing.queue_s <= unary.timing.time_to_first_token_s <= unary.timing.total_s
    chunks = list(client.stream(token_ids=prompt, max_tokens=12))
    assert [t for c in chunks for t in c.token_ids] == want
    assert "".join(c.text for c in chunks) == unary.text
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH and chunks[-1].usage.completion_tokens == 12
    assert len(chunks) == 12 and len({c.request_id for c in chunks}) == 1 and chunks[0].request_id


def test_text_prompt_is_tokenized_and_stop_string_cuts_the_text(client):
    prompt_ids = tokenizer().encode("Hello Shuttle").ids
    full = client.generate("Hello Shuttle", max_tokens=20)
    assert list(full.token_ids) == expected_tokens(prompt_ids, 20)
    stop = full.text[5:8]
    cut = client.generate("Hello Shuttle", max_tokens=20, stop=[stop])
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.text == full.text[:full.text.index(stop)] and stop not in cut.text
    assert list(cut.token_ids) == list(full.token_ids[:len(cut.token_ids)]) and len(cut.token_ids) < 20
    streamed = list(client.stream("Hello Shuttle", max_tokens=20, stop=[stop]))
    assert "".join(c.text for c in streamed) == cut.text and streamed[-1].finish_reason == pb.FINISH_REASON_STOP


BAD = [
    (dict(token_ids=[]), "token_ids"),
    (dict(prompt=""), "prompt"),
    (dict(token_ids=[1, VOCAB]), "token_ids"),
    (dict(token_ids=[-1]), "token_ids"),
    (dict(token_ids=[1], temperature=-0.5), "sampling.temperature"),
    (dict(token_ids=[1], temperature=float("nan")), "sampling.temperature"),
    (dict(token_ids=[1], temperature=float("inf")), "sampling.temperature"),
    (dict(token_ids=[1], top_p=0.0), "sampling.top_p"),
    (dict(token_ids=[1], top_p=1.5), "sampling.top_p"),
    (dict(token_ids=[1], top_p=float("nan")), "sampling.top_p"),
    (dict(token_ids=[1], top_k=-1), "sampling.top_k"),
    (dict(token_ids=[1], max_tokens=0), "sampling.max_tokens"),
    (dict(token_ids=[1], max_tokens=-3), "sampling.max_tokens"),
    (dict(token_ids=[1], max_tokens=256), "sampling.max_tokens"),
    (dict(token_ids=[1] * 256), "token_ids"),
    (dict(prompt="word " * 300), "prompt"),
    (dict(token_ids=[1], seed=-1), "sampling.seed"),
    (dict(token_ids=[1], stop_token_ids=[VOCAB + 5]), "sampling.stop_token_ids"),
    (dict(token_ids=[1], stop=[""]), "sampling.stop[0]"),
    (dict(token_ids=[1], stop=["x"] * 17), "sampling.stop"),
    (dict(token_ids=[1], request_id="r" * 129), "request_id"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_the_field(client, kwargs, field):
    for call in (lambda: client.generate(**kwargs), lambda: list(client.stream(**kwargs))):
        code, message = code_and_message(call)
        assert code == INVALID and message.startswith(field + ":"), message


def test_wire_level_bad_input(client, server):
    raw = client.channel.unary_unary("/shuttle.v1.Generation/Generate")
    cases = [(b"", "input:"),                           # no input at all
             (b"\x10\x05", "request:"),                 # field 2 (prompt) sent as a varint
             (b"\x22\x03\xf8\x01\x07", "sampling:"),    # unknown field 31 inside sampling
             (b"\x12\x02\xff\xfe", "request:")]         # prompt that is not UTF-8
    for data, field in cases:
        code, message = code_and_message(lambda: raw(data, timeout=10))
        assert code == INVALID and message.startswith(field), message
    code, message = code_and_message(lambda: client.generate("x" * (server.options.max_request_bytes + 10)))
    assert code == INVALID and message.startswith("request: is") and "bytes" in message
    assert len(client.generate(token_ids=[3], max_tokens=2).token_ids) == 2  # still serving


def test_duplicate_request_id_in_flight(client):
    stream = client.stream(token_ids=[1], max_tokens=200, request_id="dup")
    next(stream)
    code, message = code_and_message(lambda: client.generate(token_ids=[1], request_id="dup"))
    stream.cancel()
    assert code == INVALID and message.startswith("request_id:")
    for _ in range(2):  # an id is free again once its request has ended
        assert client.generate(token_ids=[1], max_tokens=2, request_id="again").request_id == "again"


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def kv_used(client):
    return sum(k.used_blocks for k in client.status().kv)


def test_cancel_and_deadline_free_the_kv_blocks(client):
    assert wait_for(lambda: kv_used(client) == 0)
    stream = client.stream(token_ids=[1, 2, 3, 4, 5], max_tokens=250 - 5)
    next(stream)
    assert kv_used(client) > 0 and client.status().running == 1
    stream.cancel()
    assert wait_for(lambda: kv_used(client) == 0 and client.status().running == 0)
    code, _ = code_and_message(lambda: client.generate(token_ids=[1, 2], max_tokens=250 - 2, timeout_s=0.2))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: kv_used(client) == 0 and client.status().running == 0)


def test_status_and_model_info(client):
    client.generate(token_ids=[9], max_tokens=2)
    info = client.model_info()
    assert info.vocab_size == VOCAB and info.max_model_len == 256 and info.has_tokenizer
    status = client.status()
    assert status.state == pb.ServerStatus.STATE_SERVING
    assert (status.attention_ranks, status.expert_ranks, len(status.kv)) == (2, 1, 2)
    assert [(p.expert_rank, list(p.expert_ids)) for p in status.placement] == [(0, [0, 1, 2, 3])]
    assert status.steps > 0 and status.tokens_generated > 0


def test_reflection_lists_the_services(client):
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"shuttle.v1.Generation", "grpc.health.v1.Health"} <= names


def test_full_queue_is_resource_exhausted_and_others_keep_going():
    engine = fake_engine(step_s=0.01, attention_ranks=1, max_num_seqs=1, max_queue=1)
    s = ServerThread().attach(engine, served_model(engine))
    try:
        with ShuttleClient(s.address, timeout_s=30) as c:
            first = c.stream(token_ids=[1], max_tokens=40)
            next(first)
            second = c.stream(token_ids=[2], max_tokens=3)          # waits in the queue
            assert wait_for(lambda: c.status().waiting == 1)
            code, message = code_and_message(lambda: c.generate(token_ids=[3], max_tokens=3))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in message
            assert len([t for ch in first for t in ch.token_ids]) == 39
            assert len([t for ch in second for t in ch.token_ids]) == 3
    finally:
        s.drain(1)


def test_health_loading_serving_draining_and_drain_finishes_in_flight_work():
    s = ServerThread()
    with ShuttleClient(s.address, timeout_s=30) as c:
        assert c.health() == "NOT_SERVING" and c.health("shuttle.v1.Generation") == "NOT_SERVING"
        code, message = code_and_message(lambda: c.generate(token_ids=[1]))
        assert code == grpc.StatusCode.UNAVAILABLE and "loading" in message
        assert c.status().state == pb.ServerStatus.STATE_LOADING
        engine = fake_engine(step_s=0.01)
        s.attach(engine, served_model(engine))
        assert c.health() == "SERVING"
        stream = c.stream(token_ids=[1], max_tokens=60)
        next(stream)
        drainer = threading.Thread(target=s.drain, args=(30,))
        drainer.start()
        assert wait_for(lambda: c.health() == "NOT_SERVING")
        code, message = code_and_message(lambda: c.generate(token_ids=[1]))
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in message
        rest = list(stream)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and 1 + sum(len(ch.token_ids) for ch in rest) == 60
        drainer.join(30)
        assert not drainer.is_alive() and engine.ranks.shut.is_set()


def test_drain_grace_over_cancels_what_is_left():
    engine = fake_engine(step_s=0.01)
    s = ServerThread().attach(engine, served_model(engine))
    with ShuttleClient(s.address, timeout_s=30) as c:
        stream = c.stream(token_ids=[1], max_tokens=240)
        next(stream)
        drainer = threading.Thread(target=s.drain, args=(0.2,))
        drainer.start()
        last = list(stream)[-1]
        drainer.join(30)
    assert last.finish_reason == pb.FINISH_REASON_CANCELLED


def test_engine_failure_is_unavailable_not_a_hang(caplog):
    engine = fake_engine(step_s=0.01, fail_at_step=5)
    s = ServerThread().attach(engine, served_model(engine))
    try:
        with ShuttleClient(s.address, timeout_s=30) as c:
            code, message = code_and_message(lambda: c.generate(token_ids=[1], max_tokens=50, request_id="7f3a"))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert message == "request 7f3a: internal error in the engine; retry later"
            status = c.status()
            assert status.state == pb.ServerStatus.STATE_FAILED and status.error == "internal error in the engine"
            assert wait_for(lambda: c.health() == "NOT_SERVING")
            code, message = code_and_message(lambda: c.generate(token_ids=[1], request_id="late"))
            assert code == grpc.StatusCode.UNAVAILABLE and message.startswith("request late: ")
    finally:
        s.drain(0)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "injected" in str(tracebacks[0].exc_info[1])   # the details: the log, once


def test_a_lost_rank_is_declared_in_seconds_and_told_briefly():
    lost = FaultyRank("expert", 0, FaultyRank.NOT_ANSWERING, "no answer from 10.1.2.3 (pid 4242) within 0.1s")
    engine = fake_engine(step_s=0.005, hang_at_step=6, faults=[lost], fault_detect_s=0.4, max_recoveries=0)
    s = ServerThread().attach(engine, served_model(engine))
    try:
        with ShuttleClient(s.address, timeout_s=30) as c:
            stream = c.stream(token_ids=[1], max_tokens=200, request_id="7f3a")
            code, message = code_and_message(lambda: list(stream))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert message == "request 7f3a: the server lost a rank; retry later"
            assert time.monotonic() - engine.ranks.hung_at < 5       # not the transfer deadline (60 s)
            assert c.health() == "NOT_SERVING" and c.health("shuttle.v1.Generation") == "NOT_SERVING"
            status = c.status()
            assert status.state == pb.ServerStatus.STATE_FAILED and status.error == "the server lost a rank"
            assert [(f.kind, f.rank, f.cause) for f in status.faults] == [
                (pb.RankFault.KIND_EXPERT, 0, pb.RankFault.CAUSE_NOT_ANSWERING)]
            code, message = code_and_message(lambda: c.generate(token_ids=[1], request_id="next"))
            assert code == grpc.StatusCode.UNAVAILABLE and message == "request next: the server lost a rank; retry later"
    finally:
        s.drain(0)


def test_a_lost_rank_is_recovered_and_the_stream_pauses_instead_of_failing():
    lost = FaultyRank("expert", 0, FaultyRank.NOT_ANSWERING, "no answer from 10.1.2.3 (pid 4242) within 0.1s")
    engine = fake_engine(step_s=0.005, hang_at_step=6, faults=[lost], fault_detect_s=0.4, attention_ranks=1)
    s = ServerThread().attach(engine, served_model(engine))
    try:
        with ShuttleClient(s.address, timeout_s=30) as c:
            tokens = [t for chunk in c.stream(token_ids=[1], max_tokens=40, request_id="7f3a") for t in chunk.token_ids]
            assert tokens == expected_tokens([1], 40)        # recomputed after the fault: the same tokens
            status = c.status()
            assert status.state == pb.ServerStatus.STATE_SERVING and status.recoveries == 1 and not status.faults
            assert c.health() == "SERVING"
            assert engine.ranks.recoveries == 1
    finally:
        s.drain(0)


METHODS = ["Generate", "GenerateStream", "GetModelInfo", "GetServerStatus"]


def raw_call(client, method):
    path = f"/shuttle.v1.Generation/{method}"
    if method == "GenerateStream":
        call = client.channel.unary_stream(path)
        return lambda data: list(call(data, timeout=10))
    call = client.channel.unary_unary(path)
    return lambda data: call(data, timeout=10)


@pytest.mark.parametrize("method", METHODS)
def test_every_rpc_refuses_garbage_and_unknown_fields_without_a_traceback(client, method, caplog):
    call = raw_call(client, method)
    rng = random.Random(method)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(20)]
    unknown = [b"\xf8\x01\x07",                     # field 31 (varint)
               b"\xaa\x06\x02hi"]                    # field 101 (bytes)
    for data in garbage + unknown:
        code, message = code_and_message(lambda: call(data))
        assert code == INVALID and message.startswith(("request:", "sampling:", "token_ids:")), (data, message)
        assert len(message) < 200 and "Error" not in message and "Traceback" not in message, message
    for data in unknown:
        assert "field number(s)" in code_and_message(lambda: call(data))[1]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    if method.startswith("Get"):      # the empty message is the valid one
        assert call(b"")


class BrokenTokenizer:
    """Decodes, but encoding (text prompts) fails like a bug would."""

    def encode(self, text):
        raise RuntimeError("tokenizer worker at 10.1.2.3:7000 crashed")

    def __getattr__(self, name):
        return getattr(tokenizer(), name)


def test_a_bug_is_internal_with_the_request_id_and_logged_once(caplog):
    engine = fake_engine()
    s = ServerThread().attach(engine, dataclasses.replace(served_model(engine), tokenizer=BrokenTokenizer()))
    try:
        with ShuttleClient(s.address, timeout_s=30) as c:
            for call in (lambda: c.generate("hello", request_id="b00"), lambda: list(c.stream("hello", request_id="b00"))):
                code, message = code_and_message(call)
                assert code == grpc.StatusCode.INTERNAL and message == "request b00: internal error"
            assert len(c.generate(token_ids=[1], max_tokens=2).token_ids) == 2      # still serving
    finally:
        s.drain(0)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2 and all("crashed" in str(r.exc_info[1]) for r in tracebacks)


def test_token_id_only_model_says_so():
    engine = fake_engine()
    s = ServerThread().attach(engine, served_model(engine, with_tokenizer=False))
    try:
        with ShuttleClient(s.address, timeout_s=30) as c:
            assert not c.model_info().has_tokenizer
            code, message = code_and_message(lambda: c.generate("hello"))
            assert code == INVALID and message.startswith("prompt:") and "token_ids" in message
            code, message = code_and_message(lambda: c.generate(token_ids=[1], stop=["x"]))
            assert code == INVALID and message.startswith("sampling.stop:")
            out = c.generate(token_ids=[4, 5], max_tokens=3)
            assert list(out.token_ids) == expected_tokens([4, 5], 3) and out.text == ""
    finally:
        s.drain(1)


def test_bearer_token_auth():
    engine = fake_engine()
    s = ServerThread(ServerOptions(port=0, auth_token="s3cret")).attach(engine, served_model(engine))
    try:
        for token in (None, "wrong"):
            with ShuttleClient(s.address, token=token, timeout_s=30) as c:
                for call in (lambda: c.generate(token_ids=[1]), lambda: list(c.stream(token_ids=[1])), c.status):
                    code, message = code_and_message(call)
                    assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in message
                assert c.health() == "SERVING"  # probes need no token
        with ShuttleClient(s.address, token="s3cret", timeout_s=30) as c:
            assert len(c.generate(token_ids=[1], max_tokens=4).token_ids) == 4
            assert len(list(c.stream(token_ids=[1], max_tokens=4))) == 4
    finally:
        s.drain(1)


def test_tls_accepts_the_trusting_client_and_rejects_others():
    cert, key = self_signed()
    other_cert, _ = self_signed()
    engine = fake_engine()
    s = ServerThread(ServerOptions(port=0, tls_cert=cert, tls_key=key)).attach(engine, served_model(engine))
    address = f"localhost:{s.port}"
    try:
        with ShuttleClient(address, tls_ca=cert, timeout_s=30) as c:
            assert len(c.generate(token_ids=[1], max_tokens=3).token_ids) == 3
        for bad in (ShuttleClient(address, timeout_s=5), ShuttleClient(address, tls_ca=other_cert, timeout_s=5)):
            with bad:
                code, _ = code_and_message(lambda: bad.generate(token_ids=[1]))
                assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        s.drain(1)
