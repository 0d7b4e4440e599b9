"""A stopped expert rank is declared in seconds, not when the transfer deadline passes.

A real local Ray deployment (tiny Mixtral: one attention rank, one expert rank) behind the gRPC
server, with transfer_timeout_s 60 and fault_detect_s 2. The expert rank is SIGSTOPped while a
stream decodes: nothing fails on the data plane for a minute, so only the watchdog can end the
stream early. Recovery is off here (max_recoveries 0: the stream fails, the server says FAILED);
tests/chaos shows the default, where the ranks are replaced and the stream resumes. Times are
printed; the assertion bound (30 s) only separates "the watchdog" from "the transfer deadline".
"""

import os
import signal
import time

import grpc
import pytest
import ray

from grpc_harness import ServerThread
from scheduler.config import EngineConfig
from serving.v1 import generation_pb2 as pb
from shuttle.client import ShuttleClient

TRANSFER_TIMEOUT_S = 60.0
FAULT_DETECT_S = 2.0


def test_a_stopped_expert_rank_is_declared_well_before_the_transfer_deadline(ray_session, tiny_model):
    from shuttle.serve_cmd import _load
    config = EngineConfig(attention_ranks=1, expert_ranks=1, transfer_timeout_s=TRANSFER_TIMEOUT_S,
                          fault_detect_s=FAULT_DETECT_S, max_recoveries=0)
    engine, model = _load(tiny_model("mixtral"), config, None)
    try:
        server = ServerThread().attach(engine, model)
    except BaseException:
        engine.shutdown()
        raise
    victim = engine.ranks.health()[1]["pid"]          # attention rank 0, then expert rank 0
    stopped = False
    try:
        with ShuttleClient(server.address, timeout_s=120) as client:
            stream = client.stream(token_ids=[1, 2, 3, 4], max_tokens=500, ignore_eos=True, request_id="victim")
            assert next(stream).token_ids                 # prefill done: decoding
            os.kill(victim, signal.SIGSTOP)
            stopped, t0 = True, time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(stream)                              # 500 tokens take far longer than the wait below
            failed_s = time.monotonic() - t0
            status = client.status()
            health = client.health()
            print(f"stream failed {failed_s:.2f}s after SIGSTOP (fault_detect_s {FAULT_DETECT_S:g}, "
                  f"transfer_timeout_s {TRANSFER_TIMEOUT_S:g}): {err.value.code().name} {err.value.details()!r}")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "request victim: the server lost a rank; retry later"
            assert failed_s < 30, f"took {failed_s:.1f}s: the transfer deadline, not the watchdog"
            assert health == "NOT_SERVING"
            assert status.state == pb.ServerStatus.STATE_FAILED and status.error == "the server lost a rank"
            assert [(f.kind, f.rank, f.cause) for f in status.faults] == [
                (pb.RankFault.KIND_EXPERT, 0, pb.RankFault.CAUSE_NOT_ANSWERING)]
    finally:
        if stopped:
            os.kill(victim, signal.SIGCONT)
        t0 = time.monotonic()
        server.drain(0)
        print(f"drained in {time.monotonic() - t0:.2f}s")
    for actor in engine.ranks.attention + engine.ranks.experts:     # nothing is left running (or stopped)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.check_health.remote(), timeout=30)
