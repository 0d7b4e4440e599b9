"""A chosen plan as `shuttle tune plan` writes it (shuttle/plan_file.py reads it back).

    engine:      the EngineConfig values the plan fixes (what `shuttle run --plan` / `serve --plan` read)
    plan:        the devices and the shape chosen
    prediction:  the predicted times
    why:         the reasons: the ping-pong arithmetic, what the search rejected, the simulation
"""

from __future__ import annotations

import math

import yaml

from tuner.search import Plan, Requirements, SearchResult, paper_m_rule


def reasons(best: Plan, result: SearchResult) -> list[str]:
    """Why `best`: its times against the ping-pong conditions, then every rejection with an example."""
    t_f = max(best.t_a, best.t_e)
    r = best.t_c / t_f
    why = [f"chosen: {best.n_a} attention rank(s) on {best.attention_gpu} (tp {best.tp_a}), {best.n_e} expert rank(s) on "
           f"{best.expert_gpu} (tp {best.tp_e}), m={best.m}, B={best.batch}: {best.tokens_per_s:.0f} tokens/s, "
           f"TPOT {best.t_iter * 1e3:.1f} ms",
           f"T_a={best.t_a * 1e3:.3f} ms, T_e={best.t_e * 1e3:.3f} ms, T_c={best.t_c * 1e3:.3f} ms: T_c/T_f = {r:.2f}; "
           f"ping-pong needs m ≥ 2(1 + T_c/T_f) = {2 * (1 + r):.2f}; the paper's rule gives m = {paper_m_rule(best.t_c, t_f)}"]
    why += ["rejected: " + line for line in result.why_rejected()]
    return why


def plan_document(best: Plan, req: Requirements, why: list[str], simulated_s: float, gpu: bool,
                  dtype: str | None = None) -> dict:
    """The plan file's content. `gpu`: a plan for catalogue GPUs (else for the profiled machine, whose
    `dtype` the profile names)."""
    seqs = math.ceil(best.batch / best.n_a)
    engine = {"attention_ranks": best.n_a, "expert_ranks": best.n_e, "micro_batches": best.m,
              "max_num_seqs": seqs, "max_batch_tokens": max(512, seqs)}
    if dtype:
        engine["dtype"] = dtype
    elif gpu:
        engine["dtype"] = "bfloat16" if req.dtype_bytes == 2 else "float32"
    return {
        "engine": engine,
        "plan": {"attention_gpu": best.attention_gpu, "attention_tp": best.tp_a, "expert_gpu": best.expert_gpu,
                 "expert_tp": best.tp_e, "global_batch": best.batch, "gpus": best.gpus if gpu else None,
                 "relative_cost": round(best.cost, 3) if gpu else None, "context": req.ctx, "tpot_slo_ms": req.tpot_slo_s * 1e3},
        "prediction": {"tpot_ms": round(best.t_iter * 1e3, 3), "simulated_tpot_ms": round(simulated_s * 1e3, 3),
                       "tokens_per_s": round(best.tokens_per_s, 1), "t_attention_ms": round(best.t_a * 1e3, 4),
                       "t_expert_ms": round(best.t_e * 1e3, 4), "t_transfer_ms": round(best.t_c * 1e3, 4)},
        "why": why,
    }


def write_plan(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False, allow_unicode=True, width=200)
