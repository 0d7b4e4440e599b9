"""The plan search: brute-force optimum, infeasible requests, speed, and MegaScale-Infer's m rule."""

import random
from dataclasses import dataclass, replace

import pytest

from tuner.costs import RooflineCosts, StageCosts
from tuner.hardware import BUILTIN, GpuType
from tuner.model_shape import PRESETS, ModelShape
from tuner.search import (InfeasibleError, Requirements, SearchSpace, brute_force, min_micro_batches,
                                    paper_m_rule, search)

SHAPE = ModelShape("synthetic", num_layers=12, hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128,
                   num_experts=8, top_k=2, expert_intermediate=4096, vocab_size=32000)


@dataclass
class SyntheticCosts(StageCosts):
    """Affine stage times with random coefficients (seconds); expert time grows with weights read (hits)."""
    a: tuple
    e: tuple
    c: tuple
    h: tuple
    o: float

    def attention(self, b, ctx):
        return self.a[0] + self.a[1] * b + self.a[2] * b * ctx

    def expert(self, pairs, hits):
        return self.e[0] + self.e[1] * pairs + self.e[2] * hits

    def transfer(self, nbytes):
        return self.c[0] + nbytes / self.c[1]

    def head(self, b):
        return self.h[0] + self.h[1] * b

    def overhead(self, batch):
        return self.o


def synthetic(seed: int):
    rng = random.Random(seed)
    catalogue = {name: GpuType(name, memory_gb=rng.choice([16, 24, 40, 80]), bandwidth_gbs=1000, bf16_tflops=100,
                               price=rng.uniform(0.2, 1.5)) for name in ("X", "Y", "Z")}
    coef = {(name, tp): SyntheticCosts(a=(rng.uniform(20e-6, 200e-6) / tp, rng.uniform(1e-6, 5e-6) / tp, rng.uniform(0, 5e-9) / tp),
                                       e=(rng.uniform(20e-6, 200e-6) / tp, rng.uniform(1e-7, 2e-6) / tp, rng.uniform(5e-6, 80e-6) / tp),
                                       c=(rng.uniform(5e-6, 40e-6), rng.uniform(2e9, 50e9)), h=(rng.uniform(1e-5, 1e-4), 1e-7),
                                       o=rng.uniform(0, 2e-3))
            for name in catalogue for tp in (1, 2, 4)}
    space = SearchSpace(attention_gpus=("X", "Y", "Z"), expert_gpus=("X", "Y", "Z"), tp=(1, 2, 4), attention_ranks=(1, 2, 3, 5),
                        expert_ranks=(1, 2, 4, 8), micro_batches=(1, 2, 3, 4), batches=(4, 8, 16, 24, 32, 64, 96, 128, 256, 512, 1024))
    req = Requirements(tpot_slo_s=rng.uniform(0.01, 0.08), ctx=rng.choice([256, 1024, 4096]), balance_limit=rng.choice([1.5, 2.0, 4.0]),
                       allow_m1=rng.random() < 0.5)
    return catalogue, space, req, (lambda g, tp: coef[(g.name, tp)])


@pytest.mark.parametrize("seed", range(8))
def test_search_returns_the_brute_force_optimum(seed):
    catalogue, space, req, costs_for = synthetic(seed)
    oracle = brute_force(SHAPE, catalogue, space, req, costs_for)
    if oracle is None:
        with pytest.raises(InfeasibleError):
            search(SHAPE, catalogue, space, req, costs_for)
        return
    best = search(SHAPE, catalogue, space, req, costs_for).best
    assert best.per_cost == pytest.approx(oracle.per_cost, rel=1e-9), (best, oracle)
    assert best.t_iter <= req.tpot_slo_s


def test_most_seeds_are_feasible():
    """Guard: the optimum test above must compare plans, not only agree that nothing fits."""
    feasible = sum(brute_force(SHAPE, *synthetic(seed)[:3], synthetic(seed)[3]) is not None for seed in range(8))
    assert feasible >= 6


def test_infeasible_request_says_what_stopped_it():
    shape = PRESETS["dbrx-132b"]
    space = SearchSpace(("L4",), ("L4",), tp=(1, 2), attention_ranks=(1, 2), expert_ranks=(1, 16), micro_batches=(2, 3))
    with pytest.raises(InfeasibleError) as err:
        search(shape, BUILTIN, space, Requirements(tpot_slo_s=0.005), lambda g, tp: RooflineCosts(shape, g, tp))
    text = str(err.value)
    assert "no deployment plan meets the requirements (TPOT ≤ 5 ms" in text
    assert "expert memory" in text and "16 experts/rank need 254 GB per GPU" in text   # all of DBRX on one L4 rank
    assert "TPOT SLO" in text and "> 5 ms" in text                                   # one expert per L4: too slow


def test_unknown_gpu_is_named():
    with pytest.raises(ValueError, match="'Q9000' is not in the catalogue"):
        search(SHAPE, BUILTIN, SearchSpace(("Q9000",), ("H100",)), Requirements(0.1), lambda g, tp: None)


def test_the_big_search_space_holds_1e5_candidates():
    """The space bench/tuner_search.py times (its speed is a benchmark's business, not a test's)."""
    shape = PRESETS["dbrx-132b"]
    space = SearchSpace(("H20", "H100"), ("L40S", "H100"), tp=(1, 2, 4, 8), attention_ranks=tuple(range(1, 9)))
    result = search(shape, BUILTIN, space, Requirements(tpot_slo_s=0.15), lambda g, tp: RooflineCosts(shape, g, tp))
    assert result.candidates >= 100_000 and result.plans


@pytest.mark.parametrize("model", ["dbrx-132b", "scaled-moe-317b"])
@pytest.mark.parametrize("net_gbs,expected_m", [(50, 3), (2, 4)])
def test_megascale_inputs_follow_the_papers_m_rule(model, net_gbs, expected_m):
    """H20 attention, L40S/H100 experts, TPOT 150 ms: m = 3 when T_c < T_f/2, else 4 (a slow network)."""
    shape = PRESETS[model]
    assert 130e9 < shape.total_params() < 320e9
    catalogue = {k: replace(v, net_gbs=net_gbs) for k, v in BUILTIN.items()}
    space = SearchSpace(("H20",), ("L40S", "H100"), tp=(1, 2), attention_ranks=tuple(range(6, 17)),
                        expert_ranks=(shape.num_experts // 2, shape.num_experts), micro_batches=(2, 3, 4, 5))
    best = search(shape, catalogue, space, Requirements(tpot_slo_s=0.15, ctx=1024), lambda g, tp: RooflineCosts(shape, g, tp)).best
    t_f = max(best.t_a, best.t_e)
    assert best.m == paper_m_rule(best.t_c, t_f) == expected_m
    assert best.t_c < t_f and best.m >= 2 * (1 + best.t_c / t_f)
    assert max(best.t_a, best.t_e) / min(best.t_a, best.t_e) <= 2.0     # T_a ≈ T_e
    assert best.t_iter <= 0.15


def test_min_micro_batches():
    assert min_micro_batches(0.0, 1.0) == 2
    assert min_micro_batches(0.4, 1.0) == 3
    assert min_micro_batches(0.5, 1.0) == 3
    assert min_micro_batches(0.9, 1.0) == 4
    assert paper_m_rule(0.49, 1.0) == 3 and paper_m_rule(0.5, 1.0) == 4
