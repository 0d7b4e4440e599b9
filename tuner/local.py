"""Plans for the profiled machine itself: every rank shares its cores, so each shape is simulated
(`Profile.predict`, with the deployment's thread rule, cluster/threads.py).
"""

from __future__ import annotations

import time
from collections import Counter

from tuner.costs import ranks_per_token, token_bytes
from tuner.profile import Profile
from tuner.search import InfeasibleError, Plan, Requirements, SearchResult, _pingpong_problem, infeasible_message
from tuner.simulate import SimPlan, SimResult


def stage_times(sim: SimPlan) -> tuple[float, float, float]:
    """(T_a, T_e, T_c) of the plan's first micro-batch, for the ping-pong conditions and the table."""
    s = sim.shape
    b_a = max(1, sim.batch // (sim.n_a * sim.m))
    tokens = sim.batch / sim.m
    owned = -(-s.num_experts // sim.n_e)
    hits = owned * (1 - (1 - s.top_k / s.num_experts) ** tokens)
    t_a = sim.attention_costs.attention(b_a, sim.ctx)
    t_e = sim.expert_costs.expert(tokens * s.top_k / sim.n_e, hits)
    t_c = sim.attention_costs.transfer(b_a * ranks_per_token(sim.n_e, s.top_k) / sim.n_e * token_bytes(s, sim.dtype_bytes))
    return t_a, t_e, t_c


def search_local(profile: Profile, req: Requirements, max_attention: int = 4, max_expert: int = 4,
                 micro_batches: tuple[int, ...] = (1, 2, 3, 4), batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128),
                 skew: float = 0.0, keep: int = 20) -> SearchResult:
    """Every (n_a, n_e, m) with the largest B meeting the SLO, each simulated; rank by throughput."""
    t0 = time.perf_counter()
    rejected: Counter = Counter()
    examples: dict = {}
    plans: list[Plan] = []
    candidates = evaluated = 0
    for n_a in range(1, max_attention + 1):
        for n_e in range(1, min(max_expert, profile.model.num_experts) + 1):
            for m in micro_batches:
                ok = [b for b in sorted(batches) if b >= n_a * m]
                candidates += len(batches)
                if len(ok) < len(batches):
                    rejected["B < n_a·m (empty micro-batches)"] += len(batches) - len(ok)
                    examples.setdefault("B < n_a·m (empty micro-batches)", f"n_a={n_a}, m={m}, B={min(batches)}")
                lo, hi = 0, len(ok)
                results: dict[int, SimResult] = {}
                while lo < hi:                          # largest B under the SLO (TPOT grows with B)
                    mid = (lo + hi) // 2
                    results[mid] = profile.predict(n_a, n_e, m, ok[mid], req.ctx, skew, record=False)
                    evaluated += 1
                    if results[mid].iteration_s <= req.tpot_slo_s:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < len(ok):
                    rejected["TPOT SLO"] += len(ok) - lo
                    r = results.get(lo) or profile.predict(n_a, n_e, m, ok[lo], req.ctx, skew, record=False)
                    examples.setdefault("TPOT SLO", f"n_a={n_a}, n_e={n_e}, m={m}, B={ok[lo]}: {r.iteration_s * 1e3:.1f} ms "
                                                    f"> {req.tpot_slo_s * 1e3:g} ms")
                for i in range(lo - 1, -1, -1):
                    r = results.get(i) or profile.predict(n_a, n_e, m, ok[i], req.ctx, skew, record=False)
                    evaluated += 1
                    t_a, t_e, t_c = stage_times(profile.sim_plan(n_a, n_e, m, ok[i], req.ctx, skew))
                    problem = _pingpong_problem(req, m, t_a, t_e, t_c)
                    if problem is None:
                        plans.append(Plan("local", 1, n_a, "local", 1, n_e, m, ok[i], t_a, t_e, t_c, r.iteration_s, n_a + n_e))
                        break
                    rejected[problem[0]] += 1
                    examples.setdefault(problem[0], f"n_a={n_a}, n_e={n_e}, m={m}, B={ok[i]}: {problem[1]}")
    # one machine: cost is the machine, so rank by throughput
    plans.sort(key=lambda p: (-p.tokens_per_s, p.n_a + p.n_e))
    result = SearchResult(plans[:keep], candidates, evaluated, time.perf_counter() - t0, rejected, examples)
    if not plans:
        raise InfeasibleError(infeasible_message(req, result))
    return result
