"""Transfer backends through `transfer.connect`: gloo between real processes (no Ray) and the
in-process backend between threads: a round trip sums expert outputs per token, and a silent peer
fails with a clear error."""

import multiprocessing as mp
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

H, K = 16, 2
OWNER = [0, 0, 1, 1]   # 4 experts over 2 expert ranks; global ranks: attention 0, experts 1 and 2


def _plane(port: int, timeout_s: float, inline_bytes: int):
    from transfer.base import DataPlane
    return DataPlane("gloo", "127.0.0.1", port, num_attention=1, owner=tuple(OWNER), hidden_size=H, top_k=K,
                     dtype="float32", timeout_s=timeout_s, inline_bytes=inline_bytes)


def _expert(rank: int, port: int, mode: str, inline_bytes: int) -> None:
    from transfer.base import EXPERT, connect
    t = connect(_plane(port, 10, inline_bytes), EXPERT, rank - 1)
    if mode == "silent":
        time.sleep(30)
        os._exit(0)
    _echo(t, rank - 1)


def _echo(t, expert_rank: int) -> None:
    """An expert rank whose "expert e" multiplies by (e + 1): output = Σ local experts weight · (e + 1) · x."""
    while (batch := t.dispatch_wait()) is not None:
        outs = []
        for x, ids, w in zip(batch.hidden, batch.topk_ids, batch.topk_weights):
            local = (torch.tensor(OWNER)[ids] == expert_rank)
            outs.append(x * ((ids + 1) * w * local).sum(-1, keepdim=True))
        t.combine_launch(batch, outs)
    t.close()


def _run(mode: str, timeout_s: float, inline_bytes: int = 64 * 1024):
    from transfer.base import ATTENTION, connect
    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_expert, args=(r, store.port, mode, inline_bytes), daemon=True) for r in (1, 2)]
    for p in procs:
        p.start()
    t = connect(_plane(store.port, timeout_s, inline_bytes), ATTENTION, 0)
    ok = False
    try:
        results = _dispatch_two_layers(t)
        ok = True
        return results
    finally:
        if ok:
            t.close()           # shutdown headers: the expert loops end
        else:
            dist.destroy_process_group()   # a silent peer: nobody to tell
        for p in procs:
            p.join(timeout=5 if ok else 0.1)     # after a failure (a silent peer) there is nothing to wait for
            if p.is_alive():
                p.kill()


def _dispatch_two_layers(t):
    x = torch.randn(6, H)
    ids = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 0], [3, 1], [0, 1]])
    w = torch.rand(6, K)
    results = []
    for layer in range(2):
        handles = [t.dispatch_launch(1, layer, j, x, ids, w) for j in range(2)]   # both micro-batches in flight
        results += [t.combine_wait(h) for h in handles]
    return x, ids, w, results


@pytest.mark.parametrize("inline_bytes", [64 * 1024, 4 * (H + 2 * K) * 4], ids=["inline", "overflow"])
def test_round_trip_sums_expert_outputs_per_token(inline_bytes):
    # "overflow": room for 4 rows in the dispatch message, so expert rank 0's 5 tokens follow as a
    # separate payload while expert rank 1's 3 tokens still travel inline.
    x, ids, w, results = _run("echo", timeout_s=20, inline_bytes=inline_bytes)
    expected = x * ((ids + 1) * w).sum(-1, keepdim=True)
    for got in results:
        torch.testing.assert_close(got, expected)


def test_silent_expert_fails_with_peer_layer_and_micro_batch_named():
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        _run("silent", timeout_s=2)
    assert time.monotonic() - t0 < 20
    msg = str(err.value)
    assert "expert rank 0" in msg and "layer 0" in msg and "micro-batch 0" in msg and "timeout 2s" in msg


def _in_process(mode: str, timeout_s: float):
    from transfer.base import ATTENTION, EXPERT, DataPlane, connect
    from transfer.inprocess import Hub
    plane = DataPlane("inprocess", "", 0, num_attention=1, owner=tuple(OWNER), hidden_size=H, top_k=K,
                      dtype="float32", timeout_s=timeout_s, local=Hub(1, 2))
    experts = [connect(plane, EXPERT, e) for e in range(2)]
    threads = [threading.Thread(target=_echo, args=(t, e), daemon=True) for e, t in enumerate(experts)
               if mode == "echo" or e == 0]              # "silent": expert rank 1 never answers
    for th in threads:
        th.start()
    t = connect(plane, ATTENTION, 0)
    try:
        return _dispatch_two_layers(t)
    finally:
        t.close()
        for th in threads:
            th.join(timeout=5)


def test_in_process_round_trip_sums_expert_outputs_per_token():
    x, ids, w, results = _in_process("echo", timeout_s=20)
    expected = x * ((ids + 1) * w).sum(-1, keepdim=True)
    for got in results:
        torch.testing.assert_close(got, expected)


def test_in_process_silent_expert_fails_with_peer_layer_and_micro_batch_named():
    with pytest.raises(Exception) as err:
        _in_process("silent", timeout_s=0.5)
    msg = str(err.value)
    assert "expert rank 1" in msg and "layer 0" in msg and "micro-batch 0" in msg and "timeout 0.5s" in msg


def test_an_unknown_backend_is_named():
    from transfer.base import ATTENTION, DataPlane, connect
    plane = DataPlane("carrier-pigeon", "", 0, 1, (0,), H, K, "float32", 1.0)
    with pytest.raises(ValueError, match="carrier-pigeon"):
        connect(plane, ATTENTION, 0)


def test_in_process_inline_expert_ranks_compute_on_the_dispatching_thread():
    from transfer.base import ATTENTION, DataPlane, connect
    from transfer.inprocess import Hub
    hub = Hub(1, 2)
    plane = DataPlane("inprocess", "", 0, num_attention=1, owner=tuple(OWNER), hidden_size=H, top_k=K,
                      dtype="float32", timeout_s=1.0, local=hub)
    threads = []

    def compute(e):
        def run(batch):
            threads.append(threading.get_ident())
            (x,), (ids,), (w,) = batch.hidden, batch.topk_ids, batch.topk_weights
            return [x * ((ids + 1) * w * (torch.tensor(OWNER)[ids] == e)).sum(-1, keepdim=True)]
        return run
    for e in range(2):
        hub.serve_inline(e, compute(e))
    t = connect(plane, ATTENTION, 0)
    x, ids, w, results = _dispatch_two_layers(t)
    t.close()
    for got in results:
        torch.testing.assert_close(got, x * ((ids + 1) * w).sum(-1, keepdim=True))
    assert set(threads) == {threading.get_ident()}
