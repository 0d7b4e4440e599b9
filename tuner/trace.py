"""Measured timelines: TraceEvents of a real run → spans (the simulator's shape) and profile samples.

A traced step gives, per layer l and micro-batch j: the attention rank's "attention" span (compute,
ending when the dispatch is launched, or after the shared expert where the model has one), its "wait" span (blocked on the combine), the expert ranks'
"expert" spans; per micro-batch a layer -1 "attention" span (the final norm); and one "lm_head" span
(micro-batch -1: LM head and sampling over every row of the step). Transfer spans are derived: a dispatch runs from the end of the
attention span to the start of each expert rank's span that consumes it; a combine from the end of the
expert span to the end of the attention rank's wait (or, if the combine was already there, the
start of that wait).
"""

from __future__ import annotations

from collections import defaultdict

from tuner.simulate import Span


def spans_from_trace(events: list, step: int | None = None) -> tuple[list[Span], float]:
    """Spans of one step (the last traced one by default), times relative to its first span.

    Returns (spans, step wall time from first start to last end)."""
    if not events:
        raise ValueError("the trace is empty: run with engine.record_trace = True and fetch the expert trace")
    steps = sorted({e.step for e in events if e.side == "attention"})
    if not steps:
        raise ValueError("the trace holds no attention-rank spans")
    step = steps[-1] if step is None else step
    chosen = [e for e in events if e.step == step]
    if not chosen:
        raise ValueError(f"the trace holds no spans of step {step} (steps: {steps[0]}…{steps[-1]})")
    t0 = min(e.start for e in chosen)
    spans: list[Span] = []
    attention_end: dict[tuple, float] = {}
    expert_start: dict[tuple, float] = {}
    expert_end: dict[tuple, float] = {}
    waits: dict[tuple, tuple[float, float]] = {}
    for e in chosen:
        start, end = e.start - t0, e.end - t0
        if e.side == "attention":
            lane = f"attention {e.rank}"
            if e.phase == "attention" and e.layer < 0:      # after the last layer: final norm of the micro-batch
                spans.append(Span(lane, "head", e.layer, e.micro_batch, start, end))
            elif e.phase == "attention":
                spans.append(Span(lane, "attention", e.layer, e.micro_batch, start, end))
                attention_end[(e.rank, e.layer, e.micro_batch)] = end
            elif e.phase == "lm_head":                       # LM head + sampling of the whole step (micro_batch -1)
                spans.append(Span(lane, "head", e.layer, e.micro_batch, start, end))
            elif e.phase == "wait":
                spans.append(Span(lane, "wait", e.layer, e.micro_batch, start, end))
                waits[(e.rank, e.layer, e.micro_batch)] = (start, end)
        else:
            spans.append(Span(f"expert {e.rank}", "expert", e.layer, e.micro_batch, start, end))
            expert_start[(e.rank, e.layer, e.micro_batch)] = start
            expert_end[(e.rank, e.layer, e.micro_batch)] = end
    for (a, l, j), end in attention_end.items():
        for (r, el, ej), start in expert_start.items():
            if (el, ej) == (l, j):
                spans.append(Span("transfer", "dispatch", l, j, end, max(end, start)))
    for (r, l, j), end in expert_end.items():
        for (a, wl, wj), (ws, we) in waits.items():
            if (wl, wj) == (l, j):
                spans.append(Span("transfer", "combine", l, j, end, max(end, we if we - ws > 1e-5 else ws)))
    wall = max(s.end for s in spans)
    return spans, wall


def step_gaps(events: list, q: float = 0.5) -> dict[int, dict]:
    """Per step: the q-quantile of attention/expert durations and transfer gaps, the head, the span extent."""
    by_step = defaultdict(list)
    for e in events:
        by_step[e.step].append(e)
    out = {}
    for step, evs in by_step.items():
        att = {(e.rank, e.layer, e.micro_batch): e for e in evs
               if e.side == "attention" and e.phase == "attention" and e.layer >= 0}
        wait = {(e.rank, e.layer, e.micro_batch): e for e in evs if e.side == "attention" and e.phase == "wait"}
        exp = defaultdict(list)
        for e in evs:
            if e.side == "expert":
                exp[(e.layer, e.micro_batch)].append(e)
        dispatch, transfer = [], []
        for (a, l, j), ae in att.items():
            if (l, j) in exp:
                dispatch.append(min(x.start for x in exp[(l, j)]) - ae.end)
                if (a, l, j) in wait:
                    # the round trip less the expert compute: dispatch + combine, halved (one message). The
                    # two processes' clocks never meet in a difference here: both ends are the attention rank's.
                    expert = max(x.end - x.start for x in exp[(l, j)])
                    transfer.append((wait[(a, l, j)].end - ae.end - expert) / 2)
        out[step] = {
            "attention": quantile([e.end - e.start for e in att.values()], q),
            "expert": quantile([x.end - x.start for xs in exp.values() for x in xs], q),
            # final norms of the micro-batches, then one LM head + sampling over the step's rows
            "head": sum(e.end - e.start for e in evs if e.phase == "lm_head" or (e.phase == "attention" and e.layer < 0)),
            "dispatch": quantile(dispatch, q),
            "transfer": quantile(transfer, q),          # one message, from the round trip (m = 1 profiles)
            "extent": max(e.end for e in evs) - min(e.start for e in evs),
            "expert_spans": sum(len(xs) for xs in exp.values()),
        }
    return out


def _median(xs: list[float]) -> float:
    return quantile(xs, 0.5)


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile; a low one (q = 0.25) filters other jobs' interference on a shared machine."""
    if not xs:
        return 0.0
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
