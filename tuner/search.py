"""The plan search (MegaScale-Infer Algorithm 1, generalised): maximise decode throughput per cost.

A candidate is (attention GPU, tp_a, n_a, expert GPU, tp_e, n_e, m, B). For each structure (all but
B) the search checks memory once, bisects the largest B whose time per output token meets the SLO
(TPOT grows with B), then walks B down to the first batch that meets the ping-pong conditions.
Throughput per cost B / T_iter(B) / cost never decreases with B (every stage time is an increasing
function with a non-negative intercept and sub-linear growth), so that batch is the structure's
optimum: the search returns what brute force over every candidate returns (`brute_force`, tests).

Iteration time (closed form; `simulate` is the exact per-rank version used to re-rank the top plans):
    T_iter = max(L·m·T_a + 2T_c + T_e,                 attention ranks busy, then the last trip
                 L·m·T_e + T_a + 2T_c,                 expert ranks busy
                 L·(T_a + T_e + 2T_c) + (m-1)·T_f,     one micro-batch's round trips, the rest behind
                 L·m·(n_a·T_a·th_a + n_e·T_e·th_e)/C)  cores, when ranks share a host of C cores
             + T_head(B/n_a) + T_overhead
With T_a = T_e = T_f this is the paper's (T_a + T_e + 2T_c) + T_f·(mL - 1) once m ≥ 2(1 + T_c/T_f).

Ping-pong conditions (each rejection is counted with its reason):
    T_c < T_f; m ≥ 2(1 + T_c/T_f); max(T_a, T_e) / min(T_a, T_e) ≤ balance_limit; m = 1 only if allowed.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

from tuner.costs import (StageCosts, attention_memory_bytes, expert_memory_bytes, experts_per_rank,
                                   ranks_per_token, token_bytes)
from tuner.hardware import GpuType
from tuner.model_shape import ModelShape
from tuner.simulate import SimPlan, SimResult, simulate

CostsFor = Callable[[GpuType, int], StageCosts]


@dataclass(frozen=True)
class SearchSpace:
    attention_gpus: tuple[str, ...]
    expert_gpus: tuple[str, ...]
    tp: tuple[int, ...] = (1, 2, 4, 8)
    attention_ranks: tuple[int, ...] = tuple(range(1, 17))
    expert_ranks: tuple[int, ...] = ()                 # () → divisors of the expert count
    micro_batches: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    batches: tuple[int, ...] = tuple(sorted({int(2 ** (i / 2)) for i in range(4, 29)}))   # 4 … 16384


@dataclass(frozen=True)
class Requirements:
    tpot_slo_s: float                 # time per output token, i.e. per decode iteration
    ctx: float = 1024                 # mean context of the decoding sequences
    dtype_bytes: int = 2
    memory_util: float = 0.90         # usable fraction of device memory
    balance_limit: float = 2.0        # max(T_a, T_e) / min(T_a, T_e)
    allow_m1: bool = False            # plans without overlap (m = 1)
    threads_a: int = 1                # per rank, when ranks share a host's cores
    threads_e: int = 1


@dataclass(frozen=True)
class Plan:
    attention_gpu: str
    tp_a: int
    n_a: int
    expert_gpu: str
    tp_e: int
    n_e: int
    m: int
    batch: int
    t_a: float
    t_e: float
    t_c: float
    t_iter: float
    cost: float

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.t_iter

    @property
    def per_cost(self) -> float:
        return self.tokens_per_s / self.cost

    @property
    def gpus(self) -> int:
        return self.n_a * self.tp_a + self.n_e * self.tp_e

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "per_cost": self.per_cost}


@dataclass
class SearchResult:
    plans: list[Plan]                                 # best plan per structure, best first
    candidates: int                                   # size of the candidate space (structures × batches)
    evaluated: int                                    # candidates whose times were computed
    seconds: float
    rejected: Counter = field(default_factory=Counter)   # reason → candidates
    examples: dict = field(default_factory=dict)         # reason → one example message

    @property
    def best(self) -> Plan:
        return self.plans[0]

    def why_rejected(self, top: int = 6) -> list[str]:
        return [f"{n} candidates: {reason} (e.g. {self.examples[reason]})" for reason, n in self.rejected.most_common(top)]


class InfeasibleError(ValueError):
    """No candidate meets the requirements; the message says which constraint stopped which plans."""


def _times(shape: ModelShape, req: Requirements, ca: StageCosts, ce: StageCosts, n_a: int, n_e: int, m: int, batch: int):
    k, E = shape.top_k, shape.num_experts
    b_a = batch / (n_a * m)
    tokens = batch / m
    owned = experts_per_rank(E, n_e)
    hits = owned * (1.0 - (1.0 - k / E) ** tokens)
    t_a = ca.attention(b_a, req.ctx)
    t_e = ce.expert(tokens * k / n_e, hits)
    tb = token_bytes(shape, req.dtype_bytes)
    rpt = ranks_per_token(n_e, k)
    t_c = max(ca.transfer(b_a * rpt * tb / n_e), ce.transfer(tokens * rpt / n_e * tb / n_a))
    t_f = max(t_a, t_e)
    L = shape.moe_layers
    t_iter = max(L * m * t_a + 2 * t_c + t_e, L * m * t_e + t_a + 2 * t_c, L * (t_a + t_e + 2 * t_c) + (m - 1) * t_f)
    cores = ca.shared_host_cores
    if cores:
        t_iter = max(t_iter, L * m * (n_a * t_a * req.threads_a + n_e * t_e * req.threads_e) / cores)
    t_iter += ca.head(batch / n_a) + ca.overhead(batch)
    return t_a, t_e, t_c, t_iter


def _pingpong_problem(req: Requirements, m: int, t_a: float, t_e: float, t_c: float) -> tuple[str, str] | None:
    t_f = max(t_a, t_e)
    if m == 1:
        return None if req.allow_m1 else ("m=1: no overlap (ping-pong needs m ≥ 2)", f"T_c/T_f={t_c / t_f:.2f}")
    if t_c >= t_f:
        return "T_c ≥ T_f: transfer slower than compute", f"T_c={t_c * 1e3:.3f} ms ≥ T_f={t_f * 1e3:.3f} ms"
    need = 2 * (1 + t_c / t_f)
    if m < need - 1e-9:
        return "m < 2(1 + T_c/T_f)", f"m={m} < {need:.2f}"
    ratio = t_f / max(min(t_a, t_e), 1e-12)
    if ratio > req.balance_limit:
        return (f"T_a/T_e imbalance > {req.balance_limit:g}×",
                f"T_a={t_a * 1e3:.3f} ms, T_e={t_e * 1e3:.3f} ms")
    return None


def search(shape: ModelShape, catalogue: dict[str, GpuType], space: SearchSpace, req: Requirements,
           costs_for: CostsFor, keep: int = 50) -> SearchResult:
    t0 = time.perf_counter()
    for name in set(space.attention_gpus) | set(space.expert_gpus):
        if name not in catalogue:
            raise ValueError(f"GPU {name!r} is not in the catalogue (known: {', '.join(sorted(catalogue))})")
    batches = sorted(space.batches)
    n_b = len(batches)
    E = shape.num_experts
    expert_ranks = space.expert_ranks or tuple(d for d in range(1, E + 1) if E % d == 0)
    rejected: Counter = Counter()
    examples: dict = {}
    best_per_structure: list[Plan] = []
    candidates = evaluated = 0

    def reject(reason: str, n: int, example: str) -> None:
        rejected[reason] += n
        examples.setdefault(reason, example)

    costs_cache: dict = {}

    def costs(name: str, tp: int) -> StageCosts:
        key = (name, tp)
        if key not in costs_cache:
            costs_cache[key] = costs_for(catalogue[name], tp)
        return costs_cache[key]

    kv_per_seq = req.ctx * shape.kv_bytes_per_token(req.dtype_bytes)
    for ga in space.attention_gpus:
        gpu_a = catalogue[ga]
        for tp_a in space.tp:
            cap_a = gpu_a.memory_gb * 1e9 * req.memory_util
            weights_a = attention_memory_bytes(shape, req.dtype_bytes, tp_a, 0, 0)
            # sequences one attention rank can hold: its KV cache fits next to its weights
            seqs_per_rank = (cap_a - weights_a) * tp_a / kv_per_seq if kv_per_seq else float("inf")
            ca = costs(ga, tp_a)
            for ge in space.expert_gpus:
                gpu_e = catalogue[ge]
                for tp_e in space.tp:
                    ce = costs(ge, tp_e)
                    for n_e in expert_ranks:
                        need_e = expert_memory_bytes(shape, req.dtype_bytes, tp_e, experts_per_rank(E, n_e))
                        n_struct = len(space.attention_ranks) * len(space.micro_batches)
                        candidates += n_struct * n_b
                        if need_e > gpu_e.memory_gb * 1e9 * req.memory_util:
                            reject("expert memory", n_struct * n_b,
                                   f"{ge}×{tp_e}, {experts_per_rank(E, n_e)} experts/rank need {need_e / 1e9:.0f} GB per GPU "
                                   f"> {gpu_e.memory_gb * req.memory_util:.0f} GB usable")
                            continue
                        if seqs_per_rank < 1:
                            reject("attention memory", n_struct * n_b,
                                   f"{ga}×{tp_a}: weights {weights_a / 1e9:.0f} GB per GPU leave no room for KV "
                                   f"({gpu_a.memory_gb * req.memory_util:.0f} GB usable)")
                            continue
                        for n_a in space.attention_ranks:
                            cost = n_a * tp_a * gpu_a.price + n_e * tp_e * gpu_e.price
                            b_mem = n_a * seqs_per_rank
                            for m in space.micro_batches:
                                def times(batch: int):
                                    return _times(shape, req, ca, ce, n_a, n_e, m, batch)
                                hi = n_b                                   # batches[:hi] fit memory and B ≥ n_a·m
                                while hi and batches[hi - 1] > b_mem:
                                    hi -= 1
                                lo_ok = 0
                                while lo_ok < hi and batches[lo_ok] < n_a * m:
                                    lo_ok += 1
                                if hi < n_b:
                                    reject("KV cache memory", n_b - hi,
                                           f"B={batches[hi]} on {n_a}×{ga}×{tp_a} needs {batches[hi] / n_a * kv_per_seq / tp_a / 1e9:.0f} GB "
                                           f"of KV per GPU at context {req.ctx:g}")
                                if lo_ok:
                                    reject("B < n_a·m (empty micro-batches)", lo_ok, f"B={batches[0]}, n_a={n_a}, m={m}")
                                if lo_ok >= hi:
                                    continue
                                # largest B meeting the SLO (T_iter grows with B): bisect over batches[lo_ok:hi]
                                lo, top = lo_ok, hi
                                while lo < top:
                                    mid = (lo + top) // 2
                                    evaluated += 1
                                    if times(batches[mid])[3] <= req.tpot_slo_s:
                                        lo = mid + 1
                                    else:
                                        top = mid
                                if lo < hi:
                                    t = times(batches[lo])
                                    reject("TPOT SLO", hi - lo, f"{n_a}×{ga}×{tp_a} + {n_e}×{ge}×{tp_e}, m={m}, B={batches[lo]}: "
                                                               f"{t[3] * 1e3:.1f} ms > {req.tpot_slo_s * 1e3:g} ms")
                                for i in range(lo - 1, lo_ok - 1, -1):
                                    evaluated += 1
                                    t_a, t_e, t_c, t_iter = times(batches[i])
                                    problem = _pingpong_problem(req, m, t_a, t_e, t_c)
                                    if problem is None:
                                        best_per_structure.append(Plan(ga, tp_a, n_a, ge, tp_e, n_e, m, batches[i],
                                                                       t_a, t_e, t_c, t_iter, cost))
                                        reject("smaller B than the structure's best", i - lo_ok, "dominated")
                                        break
                                    reject(problem[0], 1, f"{n_a}×{ga}×{tp_a} + {n_e}×{ge}×{tp_e}, B={batches[i]}: {problem[1]}")
    best_per_structure.sort(key=lambda p: (-p.per_cost, -p.tokens_per_s, p.gpus))
    rejected.pop("smaller B than the structure's best", None)
    examples.pop("smaller B than the structure's best", None)
    result = SearchResult(best_per_structure[:keep], candidates, evaluated, time.perf_counter() - t0, rejected, examples)
    if not best_per_structure:
        raise InfeasibleError(infeasible_message(req, result))
    return result


def simulate_plan(shape: ModelShape, catalogue: dict[str, GpuType], plan: Plan, req: Requirements, costs_for: CostsFor,
                  skew: float = 0.0) -> SimResult:
    """A plan of the search through the discrete-event simulation (per rank, expert popularity skewed by `skew`),
    on the same costs: what the closed form approximates."""
    return simulate(SimPlan(shape, plan.n_a, plan.n_e, plan.m, plan.batch, req.ctx,
                            costs_for(catalogue[plan.attention_gpu], plan.tp_a), costs_for(catalogue[plan.expert_gpu], plan.tp_e),
                            dtype_bytes=req.dtype_bytes, skew=skew), record=False)


def infeasible_message(req: Requirements, result: SearchResult) -> str:
    lines = [f"no deployment plan meets the requirements (TPOT ≤ {req.tpot_slo_s * 1e3:g} ms, context {req.ctx:g}) "
             f"among {result.candidates} candidates; what stopped them:"]
    lines += ["  " + line for line in result.why_rejected()]
    return "\n".join(lines)


def brute_force(shape: ModelShape, catalogue: dict[str, GpuType], space: SearchSpace, req: Requirements,
                costs_for: CostsFor) -> Plan | None:
    """Every candidate evaluated, the best kept: the oracle the search is tested against."""
    E = shape.num_experts
    expert_ranks = space.expert_ranks or tuple(d for d in range(1, E + 1) if E % d == 0)
    kv_per_seq = req.ctx * shape.kv_bytes_per_token(req.dtype_bytes)
    best = None
    for ga in space.attention_gpus:
        for tp_a in space.tp:
            for ge in space.expert_gpus:
                for tp_e in space.tp:
                    ca, ce = costs_for(catalogue[ga], tp_a), costs_for(catalogue[ge], tp_e)
                    for n_e in expert_ranks:
                        for n_a in space.attention_ranks:
                            for m in space.micro_batches:
                                for batch in space.batches:
                                    if batch < n_a * m:
                                        continue
                                    mem_a = attention_memory_bytes(shape, req.dtype_bytes, tp_a, batch / n_a, req.ctx)
                                    mem_e = expert_memory_bytes(shape, req.dtype_bytes, tp_e, experts_per_rank(E, n_e))
                                    if (mem_a > catalogue[ga].memory_gb * 1e9 * req.memory_util
                                            or mem_e > catalogue[ge].memory_gb * 1e9 * req.memory_util):
                                        continue
                                    t_a, t_e, t_c, t_iter = _times(shape, req, ca, ce, n_a, n_e, m, batch)
                                    if t_iter > req.tpot_slo_s or _pingpong_problem(req, m, t_a, t_e, t_c):
                                        continue
                                    cost = n_a * tp_a * catalogue[ga].price + n_e * tp_e * catalogue[ge].price
                                    plan = Plan(ga, tp_a, n_a, ge, tp_e, n_e, m, batch, t_a, t_e, t_c, t_iter, cost)
                                    if best is None or plan.per_cost > best.per_cost * (1 + 1e-12):
                                        best = plan
    return best


def paper_m_rule(t_c: float, t_f: float) -> int:
    """MegaScale-Infer's choice: m = 3 when T_c < T_f / 2, else 4 (from m ≥ 2(1 + T_c/T_f), T_c < T_f)."""
    return 3 if t_c < t_f / 2 else 4


def min_micro_batches(t_c: float, t_f: float) -> int:
    return max(2, math.ceil(2 * (1 + t_c / t_f) - 1e-9))
