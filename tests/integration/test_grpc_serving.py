"""End to end through a real gRPC channel: the embedded model on a real local Ray deployment.

One server for the module (2 attention ranks, 2 expert ranks, 2 micro-batches). Before it serves,
the same engine runs the prompts offline with `Engine.generate` — exactly what `shuttle run` does —
and those greedy tokens are the reference every gRPC answer must equal.
"""

import concurrent.futures
import time

import grpc
import pytest

from grpc_harness import ServerThread
from scheduler.config import EngineConfig
from scheduler.request import SamplingParams
from serving.v1 import generation_pb2 as pb
from shuttle.client import ShuttleClient

TEXTS = [f"Request {i}: {word} is better than" for i, word in
         enumerate(("Beautiful Explicit Simple Complex Flat Sparse Readability Errors Now Namespaces "
                    "Shuttle attention experts tokens steps micro-batches routers layers gRPC streams "
                    "prefill decode caches ranks batches placement dispatch combine health drain ready deadlines").split())]
MAX_TOKENS = [6 + i % 7 for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def served():
    from shuttle.serve_cmd import _load
    from models.embedded import default_model_dir

    model_dir = default_model_dir()
    config = EngineConfig(attention_ranks=2, expert_ranks=2, micro_batches=2, max_batch_tokens=256)
    engine, model = _load(model_dir, config, None)
    try:
        prompts = [model.tokenizer.encode(t).ids for t in TEXTS]
        reference = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in MAX_TOKENS])
        server = ServerThread().attach(engine, model)
    except BaseException:
        engine.shutdown()
        raise
    with ShuttleClient(server.address, timeout_s=120) as client:
        yield client, prompts, reference, model
    server.drain(5)


def test_unary_and_stream_equal_offline_generation(served):
    client, prompts, reference, model = served
    for i in (0, 5):
        ref = reference[i]
        by_text = client.generate(TEXTS[i], max_tokens=MAX_TOKENS[i])
        by_ids = client.generate(token_ids=prompts[i], max_tokens=MAX_TOKENS[i])
        for answer in (by_text, by_ids):
            assert list(answer.token_ids) == ref.token_ids
            assert pb.FinishReason.Name(answer.finish_reason) == "FINISH_REASON_" + ref.finish_reason.name
            assert answer.text == model.tokenizer.decode(ref.token_ids)
        chunks = list(client.stream(TEXTS[i], max_tokens=MAX_TOKENS[i]))
        assert [t for c in chunks for t in c.token_ids] == ref.token_ids
        assert "".join(c.text for c in chunks) == by_text.text


def test_32_concurrent_streams_are_correct_and_distinct(served):
    client, prompts, reference, _ = served
    assert len(TEXTS) >= 32

    def one(i):
        chunks = list(client.stream(TEXTS[i], max_tokens=MAX_TOKENS[i], request_id=f"c{i}"))
        assert {c.request_id for c in chunks} == {f"c{i}"}
        return [t for c in chunks for t in c.token_ids], chunks[-1]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, (tokens, last) in enumerate(results):
        assert tokens == reference[i].token_ids, f"stream {i}"
        assert last.usage.completion_tokens == len(tokens) and last.timing.time_to_first_token_s > 0
    # Distinct outputs, so that the per-stream check above would catch streams swapping their tokens.
    # (A trained model may continue two different prompts identically: the shipped one gives 30 of 32.)
    distinct = {tuple(r.token_ids) for r in reference[:32]}
    assert len({tuple(t) for t, _ in results}) == len(distinct) >= 28


def kv_used(client):
    return sum(k.used_blocks for k in client.status().kv)


def wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_cancel_and_deadline_free_kv_on_the_ranks(served):
    client, prompts, _, _ = served
    assert wait_for(lambda: kv_used(client) == 0)
    stream = client.stream(token_ids=prompts[1] * 4, max_tokens=500, ignore_eos=True)
    next(stream)
    next(stream)
    status = client.status()
    assert kv_used(client) > 0 and status.running == 1
    stream.cancel()
    assert wait_for(lambda: kv_used(client) == 0 and client.status().running == 0)
    with pytest.raises(grpc.RpcError) as e:
        client.generate(token_ids=prompts[2], max_tokens=500, ignore_eos=True, timeout_s=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: kv_used(client) == 0 and client.status().running == 0)


def test_bad_inputs_do_not_disturb_the_others(served):
    client, prompts, reference, model = served
    info = client.model_info()
    stream = client.stream(token_ids=prompts[3], max_tokens=MAX_TOKENS[3])  # in flight meanwhile
    cases = [(dict(token_ids=[info.vocab_size]), "token_ids:"),
             (dict(token_ids=[1] * info.max_model_len), "token_ids:"),
             (dict(prompt="Hello", max_tokens=info.max_model_len), "sampling.max_tokens:"),
             (dict(prompt="Hello", temperature=float("nan")), "sampling.temperature:"),
             (dict(prompt="Hello", top_p=0.0), "sampling.top_p:"),
             (dict(prompt=""), "prompt:")]
    for kwargs, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(**kwargs)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
    assert [t for c in stream for t in c.token_ids] == reference[3].token_ids


def test_status_shows_the_deployment(served):
    client, _, _, model = served
    status = client.status()
    assert status.state == pb.ServerStatus.STATE_SERVING
    assert (status.attention_ranks, status.expert_ranks, status.micro_batches) == (2, 2, 2)
    assert sorted(e for p in status.placement for e in p.expert_ids) == list(range(model.num_experts))
    assert len(status.kv) == 2 and all(k.total_blocks > 0 for k in status.kv)
    assert status.steps > 0 and status.requests_finished >= 32
    info = client.model_info()
    assert info.family == "mixtral" and info.has_tokenizer and info.num_experts == model.num_experts
