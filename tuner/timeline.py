"""Gantt charts of one decode iteration: attention, transfer and expert lanes, coloured by micro-batch.

Each panel is one timeline (the simulator's prediction, or a real run's measured trace), drawn on
the same time axis so the two read side by side. Solid bars are compute (attention, LM head with
hatching, experts); on attention lanes a thin grey bar marks time blocked on a combine; the transfer
lane shows dispatches in its upper half and combines in its lower half. Overlap shows as bars of
different colours at the same time on the attention and expert lanes; its absence as lanes that
take turns.
"""

from __future__ import annotations

from tuner.measure import Measured, measure_decode
from tuner.profile import Profile
from tuner.simulate import SimResult, Span

Panel = tuple[str, list[Span], float]          # (title, spans, iteration seconds)


def decode_timelines(profile: Profile, n_a: int, n_e: int, m: int, batch: int, ctx: float, skew: float = 0.0,
                     model_dir: str | None = None, progress=lambda msg: None
                     ) -> tuple[list[Panel], SimResult, Measured | None]:
    """The panels to draw for a deployment (n_a, n_e, m, global batch): the profile's prediction and, with
    `model_dir`, a real run of it beneath (then predicted at the context the run reached)."""
    shape = f"A={n_a}, E={n_e}, m={m}, B={batch}"
    sim = profile.predict(n_a, n_e, m, batch, ctx, skew)
    if model_dir is None:
        return [(f"predicted ({shape})", sim.spans, sim.iteration_s)], sim, None
    measured = measure_decode(model_dir, n_a, n_e, m, batch, int(ctx), steps=4, dtype=profile.dtype, progress=progress)
    sim = profile.predict(n_a, n_e, m, batch, measured.ctx, skew)
    return ([(f"predicted ({shape})", sim.spans, sim.iteration_s), (f"measured ({shape})", measured.spans, measured.step_s)],
            sim, measured)


def _lane_order(spans: list[Span]) -> list[str]:
    lanes = {s.lane for s in spans}
    att = sorted((l for l in lanes if l.startswith("attention")), key=lambda l: int(l.split()[1]))
    exp = sorted((l for l in lanes if l.startswith("expert")), key=lambda l: int(l.split()[1]))
    return att + (["transfer"] if "transfer" in lanes else []) + exp


def draw_timeline(panels: list[Panel], path: str, title: str = "") -> dict:
    """Writes a PNG, one panel above the other; returns {"lanes": [...], "bars": {lane: n}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not panels:
        raise ValueError("nothing to draw: no timeline given")
    colours = plt.get_cmap("tab10").colors
    horizon = max(max((s.end for s in spans), default=0.0) for _, spans, _ in panels) * 1e3
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 1.2 + 0.55 * max(len(_lane_order(p[1])) for p in panels) * len(panels)),
                             squeeze=False)
    bars: dict[str, int] = {}
    lanes_all: list[str] = []
    m = 1 + max((s.micro_batch for _, spans, _ in panels for s in spans), default=0)
    whole_step = any(s.micro_batch < 0 for _, spans, _ in panels for s in spans)
    for ax, (name, spans, iteration_s) in zip(axes[:, 0], panels):
        lanes = _lane_order(spans)
        lanes_all += [l for l in lanes if l not in lanes_all]
        y = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}
        for s in spans:
            row = y[s.lane]
            x, w = s.start * 1e3, max((s.end - s.start) * 1e3, horizon * 1e-4)
            colour = colours[s.micro_batch % len(colours)] if s.micro_batch >= 0 else "0.35"   # -1: the whole step
            if s.kind == "wait":
                ax.broken_barh([(x, w)], (row - 0.06, 0.12), facecolors="0.6")
            elif s.kind in ("dispatch", "combine"):
                lo = row + (0.02 if s.kind == "dispatch" else -0.4)
                ax.broken_barh([(x, w)], (lo, 0.38), facecolors=colour, alpha=0.55, edgecolor="none")
            else:
                ax.broken_barh([(x, w)], (row - 0.4, 0.8), facecolors=colour, edgecolor="black", linewidth=0.3,
                               hatch="//" if s.kind == "head" else None)
            key = f"{name}: {s.lane}"
            bars[key] = bars.get(key, 0) + 1
        ax.set_yticks([y[l] for l in lanes], lanes)
        ax.set_ylim(-0.7, len(lanes) - 0.3)
        ax.set_xlim(0, horizon * 1.01)
        ranks_ms = max((s.end for s in spans), default=0.0) * 1e3
        ax.set_title(f"{name}: {iteration_s * 1e3:.1f} ms per iteration ({ranks_ms:.1f} ms on the ranks, "
                     f"the rest at the head: scheduling, control calls)", fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms since the iteration started")
    handles = [Patch(color=colours[j % len(colours)], label=f"micro-batch {j}") for j in range(m)]
    if whole_step:
        handles.append(Patch(color="0.35", label="whole step"))
    handles += [Patch(facecolor="white", edgecolor="black", hatch="//", label="LM head"), Patch(color="0.6", label="waiting on combine")]
    fig.legend(handles=handles, loc="upper right", ncol=min(len(handles), 6), fontsize=8)
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"lanes": lanes_all, "bars": bars}
