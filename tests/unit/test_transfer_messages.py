"""The M2N message plan: each token goes once to each expert rank that owns one of its experts."""

import torch

from transfer.messages import HEADER_BYTES, Header, KIND_DATA, Layout, pack_payload, payload_buffers, route_plan, unpack_payload


def test_route_plan_sends_each_token_once_per_owning_rank():
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])     # 8 experts over 3 ranks
    ids = torch.tensor([[0, 1],    # both on rank 0: sent once
                        [0, 7],    # ranks 0 and 2
                        [3, 6],    # ranks 1 and 2
                        [2, 1]])   # rank 0 only
    plan = route_plan(ids, owner, 3)
    assert [p.tolist() for p in plan] == [[0, 1, 3], [2], [1, 2]]


def test_route_plan_can_leave_a_rank_empty():
    plan = route_plan(torch.tensor([[0, 1]]), torch.tensor([0, 0, 1, 1]), 2)
    assert plan[1].numel() == 0


def test_header_round_trip():
    h = Header(KIND_DATA, step=7, layer=3, micro_batch=1, count=42)
    assert Header.from_tensor(h.to_tensor()) == h


def test_payload_round_trip_float32_is_one_message():
    hidden, ids, w = torch.randn(5, 16), torch.randint(0, 60, (5, 2)), torch.rand(5, 2)
    msgs = pack_payload(hidden, ids, w)
    assert len(msgs) == 1 and msgs[0].shape == (5, 16 + 4)
    bufs = payload_buffers(5, 16, 2, torch.float32, "cpu")
    for b, m in zip(bufs, msgs):
        b.copy_(m)
    h2, ids2, w2 = unpack_payload(bufs, 16, 2)
    assert torch.equal(h2, hidden) and torch.equal(ids2, ids) and torch.equal(w2, w)


def test_payload_bfloat16_keeps_expert_ids_exact():
    hidden, ids, w = torch.randn(3, 8).bfloat16(), torch.tensor([[255, 257], [1000, 3], [0, 511]]), torch.rand(3, 2)
    msgs = pack_payload(hidden, ids, w)
    assert [m.dtype for m in msgs] == [torch.bfloat16, torch.float32]
    h2, ids2, w2 = unpack_payload(msgs, 8, 2)
    assert torch.equal(ids2, ids) and torch.equal(h2, hidden) and torch.equal(w2, w)


def test_dispatch_message_carries_a_small_payload_inline():
    for dtype in (torch.float32, torch.bfloat16):
        layout = Layout(hidden_size=8, top_k=2, dtype=dtype, inline_bytes=1024)
        hidden, ids, w = torch.randn(3, 8).to(dtype), torch.tensor([[5, 1], [1000, 3], [0, 7]]), torch.rand(3, 2)
        header = Header(KIND_DATA, step=2, layer=1, micro_batch=0, count=3)
        msg, rest = layout.pack(header, pack_payload(hidden, ids, w), "cpu")
        assert rest == [] and msg.numel() == layout.message_bytes == HEADER_BYTES + layout.inline_rows * layout.row_bytes
        received = layout.empty_message("cpu").copy_(msg)       # what the pre-posted receive holds
        assert layout.header(received) == header
        h2, ids2, w2 = unpack_payload(layout.inline_payload(received, 3), 8, 2)
        assert torch.equal(h2, hidden) and torch.equal(ids2, ids) and torch.equal(w2, w)


def test_dispatch_message_leaves_a_large_payload_to_follow():
    layout = Layout(hidden_size=8, top_k=2, dtype=torch.float32, inline_bytes=2 * (8 + 4) * 4)
    assert layout.inline_rows == 2
    payload = pack_payload(torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2))
    msg, rest = layout.pack(Header(KIND_DATA, 0, 0, 0, 3), payload, "cpu")
    assert layout.header(msg).count == 3 and len(rest) == 1 and torch.equal(rest[0], payload[0])
