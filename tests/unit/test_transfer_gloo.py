"""The gloo backend between real processes (no Ray): a round trip, and a silent peer's clear error."""

import multiprocessing as mp
import os
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
    while (batch := t.dispatch_wait()) is not None:
        # "expert e" multiplies by (e + 1): output = sum over local experts of weight · (e + 1) · x
        outs = []
        for x, ids, w in zip(batch.hidden, batch.topk_ids, batch.topk_weights):
            local = (torch.tensor(OWNER)[ids] == rank - 1)
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
        x = torch.randn(6, H)
        ids = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 0], [3, 1], [0, 1]])   # rank 1 gets no token of layer... some rows
        w = torch.rand(6, K)
        results = []
        for layer in range(2):
            handles = [t.dispatch_launch(1, layer, j, x, ids, w) for j in range(2)]
            results += [t.combine_wait(h) for h in handles]
        ok = True
        return x, ids, w, results
    finally:
        if ok:
            t.close()           # shutdown headers: the expert loops end
        else:
            dist.destroy_process_group()   # a silent peer: nobody to tell
        for p in procs:
            p.join(timeout=5 if ok else 0.1)     # after a failure (a silent peer) there is nothing to wait for
            if p.is_alive():
                p.kill()


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
