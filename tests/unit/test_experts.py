"""Grouped experts (sort by expert, one GEMM per expert, no capacity) against a dense reference."""

import pytest
import torch

from expert_node.experts import ExpertShard
from moe_reference import dense_moe_reference
from models.spec import ModelSpec
from scheduler.placement import Placement

E, H, I, K = 8, 32, 48, 2


def spec(h=H, i=I):
    return ModelSpec(family="mixtral", vocab_size=10, hidden_size=h, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=h // 4, num_experts=E, top_k=K, moe_intermediate_size=i, norm_topk_prob=True,
                     moe_layers=(True,))


def weights(seed=0, h=H, i=I):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * i, h, generator=g) * 0.1, torch.randn(E, h, i, generator=g) * 0.1


def routing(n, seed=1, only=None, h=H):
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor(only if only is not None else list(range(E)))
    ids = torch.stack([choices[torch.randperm(len(choices), generator=g)[:K]] for _ in range(n)]) if n else torch.empty(0, K, dtype=torch.long)
    w = torch.softmax(torch.randn(n, K, generator=g), -1)
    return torch.randn(n, h, generator=g), ids, w


def shard_of(experts, w13, w2, h=H, i=I):
    return ExpertShard(spec(h, i), experts, {0: w13[experts]}, {0: w2[experts]})


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [0, 1, 5, 64])
def test_all_experts_on_one_rank_match_dense(n, reverse):
    w13, w2 = weights()
    x, ids, w = routing(n)
    got = shard_of(list(range(E)), w13, w2).forward(0, x, ids, w, reverse=reverse)
    torch.testing.assert_close(got, dense_moe_reference(x, ids, w, w13, w2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [0, 1, 5, 40, 300])
def test_grouped_kernel_matches_dense(n, reverse):
    """Experts big enough for the panel kernel run as one fused layer call (moe_ffn); some experts get no
    rows, some up to 8 (single panels), some more (panel pairs, 6-row tiles); a 3-expert shard leaves
    tokens out; the routing counts per expert are reported."""
    h, i = 256, 264                      # 2I x H and H x I both >= 2^16 elements; I / 8 = 33 panels (odd)
    w13, w2 = weights(h=h, i=i)
    x, ids, w = routing(n, only=[0, 1, 2, 5] if n == 40 else None, h=h)
    for experts in (list(range(E)), [1, 2, 5]):
        shard = shard_of(experts, w13, w2, h, i)
        assert shard.grouped[0] is not None                  # this machine builds the kernels (CI does too)
        got = shard.forward(0, x, ids, w, reverse=reverse)
        mask = torch.isin(ids, torch.tensor(experts))
        torch.testing.assert_close(got, dense_moe_reference(x, ids, w * mask, w13, w2), rtol=1e-4, atol=1e-4)
        if n:
            assert shard.last_counts == [int((ids == e).sum()) for e in experts]


@pytest.mark.parametrize("n", [1, 5, 40, 300])
def test_grouped_kernel_in_bfloat16_matches_dense(n):
    """bfloat16 weights (16-column panels of k pairs, AVX-512 BF16): float32 sums, the SiLU·up activations
    rounded to bfloat16, the output once; within bfloat16 rounding of the dense layer in float64."""
    h, i = 256, 272
    w13, w2 = weights(h=h, i=i)
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    x, ids, w = routing(n, h=h)
    x = x.bfloat16()
    shard = shard_of(list(range(E)), w13, w2, h, i)
    assert shard.grouped[0] is not None and shard.grouped[0][1][0].dtype == torch.bfloat16
    got = shard.forward(0, x, ids, w)
    assert got.dtype == torch.bfloat16
    want = dense_moe_reference(x.double(), ids, w.double(), w13.double(), w2.double())
    scale = want.abs().max()
    assert (got.double() - want).abs().max() <= 2e-2 * scale
    torch_path = dense_moe_reference(x, ids, w, w13, w2).double()     # the same layer in bfloat16 torch ops
    assert (got.double() - want).abs().max() <= (torch_path - want).abs().max() + 1e-3 * scale
    assert shard.last_counts == [int((ids == e).sum()) for e in range(E)]


def test_fused_layer_refuses_bad_inputs_by_name():
    h, i = 256, 264
    w13, w2 = weights(h=h, i=i)
    shard = shard_of(list(range(E)), w13, w2, h, i)
    kernels, up, down = shard.grouped[0]
    x, ids, w = routing(4, h=h)
    with pytest.raises(RuntimeError, match="moe_ffn: expected local expert ids"):
        kernels.moe_ffn(x, ids.int(), w, up, down, False)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.moe_ffn(x, torch.full_like(ids, E), w, up, down, False)
    with pytest.raises(RuntimeError, match="one up and one down weight"):
        kernels.moe_ffn(x, ids, w, up, down[:-1], False)
    with pytest.raises(RuntimeError, match="moe_ffn: expected a contiguous Float CPU x"):
        kernels.moe_ffn(x.bfloat16(), ids, w, up, down, False)


@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_partial_sums_over_any_split_match_dense(ranks):
    w13, w2 = weights()
    x, ids, w = routing(40)
    placement = Placement.contiguous(E, ranks)
    total = sum(shard_of(placement.experts_of(r), w13, w2).forward(0, x, ids, w) for r in range(ranks))
    torch.testing.assert_close(total, dense_moe_reference(x, ids, w, w13, w2), rtol=1e-5, atol=1e-5)


def test_unrouted_experts_and_foreign_tokens_contribute_nothing():
    w13, w2 = weights()
    x, ids, w = routing(10, only=[0, 1, 2])               # nothing for experts 3..7
    assert torch.count_nonzero(shard_of([5, 6, 7], w13, w2).forward(0, x, ids, w)) == 0


def test_every_routed_pair_is_computed_no_capacity():
    """All tokens to one expert: nothing dropped even at 100% skew."""
    w13, w2 = weights()
    n = 100
    x = torch.randn(n, H)
    ids = torch.tensor([[3, 4]] * n)
    w = torch.full((n, K), 0.5)
    got = shard_of([3], w13, w2).forward(0, x, ids, w)
    torch.testing.assert_close(got, dense_moe_reference(x, ids, w * (ids == 3), w13, w2), rtol=1e-5, atol=1e-5)


def test_placement_contiguous_uneven():
    p = Placement.contiguous(8, 3)
    assert [p.experts_of(r) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError, match="own nothing"):
        Placement.contiguous(4, 5)
