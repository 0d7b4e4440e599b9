"""A profile: stage times measured on this machine, and the cost model fitted to them.

Samples (one per measured configuration, each a median over layers and steps):
    attention[threads]: (b, ctx, seconds)        T_a of one layer, b sequences of mean context ctx
    expert[threads]:    (pairs, hits, seconds)   T_e of one layer: token-expert pairs, experts hit
    head[threads]:      (b, seconds)             final norm + LM head + sampling
    transfer:           (bytes, seconds)         T_c, one message (dispatch and combine gaps)
    overhead:           (B, seconds)             step wall time outside the ranks' spans (control plane)
    calibration:        (n_a, n_e, m, B, ctx, s) decode step time of whole multi-rank deployments
    contention:         {"alone_s", "together_s", "slowdown"} the speed probe alone and in k processes at once

The stage samples come from a deployment whose two ranks take turns, so they cannot show what
happens when ranks on one host run at once or hear from several peers. `calibrate()` fits the
two interference terms of the simulator (`overlap_slowdown`, `wakeup_latency_s`, see simulate.py) to
the calibration runs. When the profile measured the contention directly (`contention`), the slowdown
is taken from it and only the wake-up latency is searched; otherwise a grid search for the pair
whose simulated step times best match the runs.

Candidate forms (the fit keeps the one with the lowest leave-one-out error, see `fit.py`):
    T_a = k1·b + k2 (MegaScale-Infer) | + k3·b·ctx (KV reads)   T_e = k3·pairs + k4 | + k5·hits (weight reads)
    T_c = latency + bytes / bandwidth                            head = k·b + c      overhead = k·B + c
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from cluster.threads import rank_threads, useful_threads
from tuner.costs import ProfiledCosts, experts_hit
from tuner.fit import best_fit, features
from tuner.model_shape import ModelShape
from tuner.simulate import SimPlan, SimResult, simulate
from tuner.trace import quantile

ATTENTION_FORMS = [("b", "1"), ("b", "b*ctx", "1"), ("b*ctx", "1")]
EXPERT_FORMS = [("pairs", "1"), ("pairs", "hits", "1"), ("hits", "1"), ("pairs", "hits")]
TRANSFER_FORMS = [("bytes", "1"), ("1",)]
HEAD_FORMS = [("b", "1"), ("1",)]
OVERHEAD_FORMS = [("B", "1"), ("1",)]
FORMAT = "shuttle-profile/1"


@dataclass
class Profile:
    model: ModelShape
    dtype: str
    cores: int
    machine: str
    samples: dict = field(default_factory=lambda: {"attention": {}, "expert": {}, "head": {}, "transfer": [], "overhead": [],
                                                   "calibration": []})
    fits: dict = field(default_factory=dict)
    interference: dict = field(default_factory=lambda: {"overlap_slowdown": 0.0, "wakeup_latency_s": 0.0})
    # {"reference_s", "probes", "range_s"} when every sample was stamped with the machine's speed probe
    # (tuner/speed.py) and rescaled to the reference (median) probe; empty for older profiles
    speed: dict = field(default_factory=dict)

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def threads(self) -> list[int]:
        return sorted(int(t) for t in self.samples["attention"])

    def fit(self) -> "Profile":
        s = self.samples
        fits = {"attention": {}, "expert": {}, "head": {}}
        for t in self.threads:
            key = str(t)
            fits["attention"][key] = best_fit([(features(b=b, **{"b*ctx": b * c}), y) for b, c, y in s["attention"][key]],
                                              ATTENTION_FORMS, f"T_a at {t} thread(s)")
            fits["expert"][key] = best_fit([(features(pairs=p, hits=h), y) for p, h, y in s["expert"][key]],
                                           EXPERT_FORMS, f"T_e at {t} thread(s)")
            fits["head"][key] = best_fit([(features(b=b), y) for b, y in s["head"][key]], HEAD_FORMS, f"LM head at {t} thread(s)")
        fits["transfer"] = best_fit([(features(bytes=n), y) for n, y in s["transfer"]], TRANSFER_FORMS, "T_c")
        fits["overhead"] = best_fit([(features(B=n), y) for n, y in s["overhead"]], OVERHEAD_FORMS, "step overhead")
        self.fits = fits
        return self

    @classmethod
    def merge(cls, profiles: list["Profile"]) -> "Profile":
        """One profile from several passes over the same grid (taken at different times): every sample is
        the median of its passes, coordinate by coordinate. On a machine whose speed drifts, passes spread
        over the whole session see the same spells as the deployments they predict. Returns it unfitted."""
        if not profiles:
            raise ValueError("no profiles to merge")
        first = profiles[0]
        for p in profiles[1:]:
            if (p.model, p.dtype, p.cores) != (first.model, first.dtype, first.cores) or p.threads != first.threads:
                raise ValueError("profiles to merge must share the model, dtype, cores and thread counts")

        def med(rows_by_pass: list[list]) -> list:
            n = len(rows_by_pass[0])
            if any(len(rows) != n for rows in rows_by_pass):
                raise ValueError("profiles to merge must have measured the same grid")
            return [[_median(col) for col in zip(*(rows[i] for rows in rows_by_pass))] for i in range(n)]

        samples: dict = {}
        for bucket in ("attention", "expert", "head"):
            samples[bucket] = {key: med([p.samples[bucket][key] for p in profiles]) for key in first.samples[bucket]}
        for bucket in ("transfer", "overhead", "calibration", "calibration_spans"):
            samples[bucket] = med([p.samples.get(bucket) or [] for p in profiles])
        contention = [p.samples["contention"] for p in profiles if p.samples.get("contention")]
        if contention:
            samples["contention"] = {k: _median([c[k] for c in contention]) for k in contention[0]}
        merged = cls(first.model, first.dtype, first.cores, first.machine, samples)
        speeds = [p.speed for p in profiles if p.speed]
        if speeds:
            merged.speed = {"reference_s": _median([x["reference_s"] for x in speeds]),
                            "probes": sum(x["probes"] for x in speeds),
                            "range_s": [min(x["range_s"][0] for x in speeds), max(x["range_s"][1] for x in speeds)],
                            "rescaled": all(x.get("rescaled", True) for x in speeds)}
        merged.samples["passes"] = len(profiles)
        return merged

    def costs(self, threads: int) -> ProfiledCosts:
        """Stage costs of a rank running `threads` threads (the nearest profiled count at or below)."""
        if not self.fits:
            raise ValueError("profile has no fits: call fit() first")
        t = self._profiled_threads(threads)
        key = str(t)
        return ProfiledCosts(self.fits["attention"][key], self.fits["expert"][key], self.fits["transfer"],
                             self.fits["head"][key], self.fits["overhead"], shared_host_cores=self.cores,
                             overlap_slowdown=self.interference["overlap_slowdown"],
                             wakeup_latency_s=self.interference["wakeup_latency_s"],
                             compute_scale=self._compute_scale(t),
                             core_policy=self.interference.get("core_policy", "share"))

    # ---- plans on the profiled machine ---------------------------------------------------------
    def rank_threads(self, n_a: int, n_e: int, m: int) -> int:
        """Threads each rank of a deployment (n_a, n_e, m) runs on the profiled machine: the deployment's
        rule (cluster/threads.py) with every rank on this one node."""
        threads = rank_threads(self.cores, n_a, n_e, m)
        return useful_threads(threads, self.model.hidden_size, self.model.expert_intermediate)

    def sim_plan(self, n_a: int, n_e: int, m: int, batch: int, ctx: float, skew: float = 0.0, threads: int = 0) -> SimPlan:
        t = threads or self.rank_threads(n_a, n_e, m)
        costs = self.costs(t)
        return SimPlan(self.model, n_a, n_e, m, batch, ctx, costs, costs, dtype_bytes=self.dtype_bytes,
                       threads_a=t, threads_e=t, skew=skew)

    def predict(self, n_a: int, n_e: int, m: int, batch: int, ctx: float, skew: float = 0.0, threads: int = 0,
                record: bool = True) -> SimResult:
        """One decode iteration of the deployment (n_a, n_e, m, global batch) on the profiled machine, every
        rank sharing its cores."""
        if n_e > self.model.num_experts:
            raise ValueError(f"{n_e} expert ranks for {self.model.num_experts} experts: some rank would own none")
        if batch < n_a * m:
            raise ValueError(f"batch {batch} < attention ranks × micro-batches = {n_a * m}: some micro-batch would be empty")
        return simulate(self.sim_plan(n_a, n_e, m, batch, ctx, skew, threads), record=record)

    def rescale_to_reference(self, stamps: list[tuple[float, list[tuple]]], apply: bool = True) -> "Profile":
        """`stamps`: per measurement, (speed probe seconds, [(bucket, threads key or None, sample index), ...]).

        Records the reference speed (the median probe); with `apply`, rewrites those samples' seconds to what
        they would have been at that speed, so samples taken in a slow spell and in a fast one land on one scale."""
        if not stamps:
            return self
        probes = sorted(p for p, _ in stamps)
        if probes[0] <= 0:
            raise ValueError(f"speed probes must be positive seconds, got {probes[0]}")
        ref = probes[len(probes) // 2]
        for p, where in stamps if apply else []:
            for bucket, key, i in where:
                rows = self.samples[bucket] if key is None else self.samples[bucket][key]
                row = list(rows[i])
                row[-1] *= ref / p
                rows[i] = row
        self.speed = {"reference_s": ref, "probes": len(probes), "range_s": [probes[0], probes[-1]], "rescaled": apply}
        return self

    def speed_factor(self, probe_s: float | None) -> float:
        """How much slower than the profile's reference the machine was when `probe_s` was measured
        (1.0 when either side has no probe)."""
        ref = self.speed.get("reference_s")
        return probe_s / ref if ref and probe_s else 1.0

    def _profiled_threads(self, threads: int) -> int:
        """The profiled thread count that stands for `threads`: the nearest at or below (else the fewest)."""
        return max([x for x in self.threads if x <= threads] or [min(self.threads)])

    def _compute_scale(self, threads: int) -> float:
        """The calibrated compute scale, for the thread counts the calibration runs used (1.0 for the others:
        nothing measured them in a whole deployment)."""
        i = self.interference
        used = i.get("compute_scale_threads")
        return i.get("compute_scale", 1.0) if used is None or threads in used else 1.0

    def _span_ratio(self, a: int, e: int, m: int, b: int, ctx: float, att_s: float, exp_s: float) -> float:
        """A calibration run's median compute spans / the profile's alone-time for the same work (the mean of
        the two sides' ratios)."""
        alone_att, alone_exp = self.alone_times(a, e, m, b, ctx)
        return (att_s / alone_att + exp_s / alone_exp) / 2

    def alone_times(self, a: int, e: int, m: int, b: int, ctx: float) -> tuple[float, float]:
        """(T_a, T_e) of one layer of one micro-batch of shape (a, e, m, b) from the fits, nothing else running."""
        key = str(self._profiled_threads(self.rank_threads(a, e, m)))
        sh = self.model
        b_mb = b / (a * m)
        tokens = b / m
        hits = experts_hit(tokens, sh.num_experts, sh.top_k, -(-sh.num_experts // e))
        alone_att = self.fits["attention"][key](features(b=b_mb, **{"b*ctx": b_mb * ctx}))
        alone_exp = self.fits["expert"][key](features(pairs=tokens * sh.top_k / e, hits=hits))
        return alone_att, alone_exp

    def calibrate(self) -> "Profile":
        """Fit the interference terms to the calibration runs (no runs: both stay 0)."""
        runs = self.samples.get("calibration") or []
        if not runs:
            self.interference = {"overlap_slowdown": 0.0, "wakeup_latency_s": 0.0}
            return self
        used = sorted({self._profiled_threads(self.rank_threads(a, e, m)) for a, e, m, *_ in runs})

        policy = "share"

        def error(s: float, d: float, c: float = 1.0) -> float:
            self.interference = {"overlap_slowdown": s, "wakeup_latency_s": d, "compute_scale": c, "compute_scale_threads": used,
                                 "core_policy": policy}
            return sum(abs(math.log(self.predict(a, e, m, b, ctx, record=False).iteration_s / t))
                       for a, e, m, b, ctx, t in runs) / len(runs)

        contention = self.samples.get("contention") or {}
        spans = self.samples.get("calibration_spans") or []
        c = 1.0
        if len(spans) == len(runs):
            # The runs' own spans against the profile's alone-times for the same work: runs whose two sides
            # take turns (m = 1) give the compute scale; runs that overlap (m >= 2) the slowdown on top of it.
            # Only the wake-up latency and the core policy are left to the step times.
            s_runs, c_runs = [], []
            for (a, e, m, b, ctx, _), (att, exp) in zip(runs, spans):
                r = self._span_ratio(a, e, m, b, ctx, att, exp)
                (c_runs if m == 1 else s_runs).append((r, min(a + e, self.cores)))
            c = _median([r for r, _ in c_runs]) if c_runs else 1.0
            s = max(0.0, _median([(r / c - 1) / max(1, k - 1) for r, k in s_runs])) if s_runs else 0.0
            best = []
            for policy in ("share", "queue"):
                d = min((j * 0.1e-3 for j in range(61)), key=lambda d: error(s, d, c))
                best.append((error(s, d, c), policy, d))
            _, policy, d = min(best)
            how = "spans"
        elif "slowdown" in contention:
            # The slowdown was measured directly (speed.concurrent_slowdown). Left to the step times: the
            # wake-up latency, and how much slower compute spans run in a whole deployment than in the
            # profile's turn-taking one. (Fitting slowdown and latency to step times instead traded one
            # for the other: docs/tuning.md, "Calibration".)
            s = contention["slowdown"]
            # coarse grid, then a finer one around its best point; latency outer and ascending, so that
            # where the runs cannot tell latencies apart the smallest wins
            # and the core policy (processor sharing or queueing for a free core) that fits the runs best
            grid = [(j * 0.5e-3, k / 10) for j in range(13) for k in range(7, 17)]
            best = []
            for policy in ("share", "queue"):
                d0, c0 = min(grid, key=lambda dc: error(s, *dc))
                fine = [(max(0.0, d0 + j * 0.1e-3), c0 + k * 0.02) for j in range(-5, 6) for k in range(-5, 6)]
                d, c = min(fine, key=lambda dc: error(s, *dc))
                best.append((error(s, d, c), policy, d, c))
            _, policy, d, c = min(best)
            how = "measured"
        else:
            # coarse grid, then a finer one around its best point
            grid = [(s / 10, d * 0.25e-3) for s in range(16) for d in range(13)]
            best = min(grid, key=lambda sd: error(*sd))
            fine = [(max(0.0, best[0] + i * 0.02), max(0.0, best[1] + j * 0.05e-3)) for i in range(-5, 6) for j in range(-5, 6)]
            s, d = min(fine, key=lambda sd: error(*sd))
            how = "fitted"
        err = error(s, d, c)
        self.interference = {"overlap_slowdown": s, "wakeup_latency_s": d, "compute_scale": c, "compute_scale_threads": used,
                             "core_policy": policy, "mean_abs_log_error": err,
                             "runs": len(runs), "slowdown_from": how}
        return self

    def report(self) -> list[str]:
        passes = self.samples.get("passes", 1)
        lines = [f"profile of {self.model.name} ({self.dtype}) on {self.machine}, {self.cores} cores"
                 + (f"; every sample the median of {passes} passes" if passes > 1 else "")]
        for t in self.threads:
            key = str(t)
            for what, label in (("attention", "T_a"), ("expert", "T_e"), ("head", "LM head")):
                f = self.fits[what][key]
                lines.append(f"  {label:7s} @{t} thr = {f.formula(1e-6, 'µs'):40s} {f.quality()}")
        for what, label in (("transfer", "T_c"), ("overhead", "step overhead")):
            f = self.fits[what]
            lines.append(f"  {label:13s} = {f.formula(1e-6, 'µs'):36s} {f.quality()}")
        if self.speed:
            lo, hi = self.speed["range_s"]
            what = "times at the reference probe" if self.speed.get("rescaled", True) else "reference probe (times as measured)"
            lines.append(f"  speed: {what} {self.speed['reference_s'] * 1e3:.2f} ms (median of "
                         f"{self.speed['probes']} probes, {lo * 1e3:.2f}-{hi * 1e3:.2f} ms while profiling)")
        i = self.interference
        if i.get("runs"):
            how = {"spans": "from the runs' spans", "measured": "measured"}.get(i.get("slowdown_from"), "fitted")
            at = "/".join(str(t) for t in i.get("compute_scale_threads") or self.threads)
            lines.append(f"  interference: cores {i.get('core_policy', 'share')}d, compute spans x{i.get('compute_scale', 1.0):.2f} in whole deployments at {at} thread(s), "
                         f"overlap slowdown {i['overlap_slowdown']:.2f} ({how}) per extra running rank, wake-up "
                         f"latency {i['wakeup_latency_s'] * 1e3:.2f} ms for a message sent while every core computes (calibrated on {i['runs']} "
                         f"multi-rank runs, mean error {100 * (math.exp(i['mean_abs_log_error']) - 1):.1f}%)")
        else:
            lines.append("  interference: not calibrated (no multi-rank runs in this profile): concurrent ranks are "
                         "modelled by core sharing alone")
        return lines

    # ---- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        fits = {k: ({t: f.to_dict() for t, f in v.items()} if isinstance(v, dict) else v.to_dict()) for k, v in self.fits.items()}
        return {"format": FORMAT, "model": self.model.to_dict(), "dtype": self.dtype, "cores": self.cores,
                "machine": self.machine, "samples": self.samples, "fits": fits, "interference": self.interference,
                "speed": self.speed}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Profile":
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError as e:
            raise ValueError(f"profile {path!r}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"profile {path!r} is not JSON: {e.msg}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"profile {path!r} is not a {FORMAT} file (make one with `shuttle tune profile`)")
        samples = {"calibration": [], **d["samples"]}
        p = cls(ModelShape.from_dict(d["model"]), d["dtype"], d["cores"], d["machine"], samples).fit()
        p.speed = d.get("speed") or {}
        if d.get("interference"):
            p.interference = d["interference"]
        elif samples["calibration"]:
            p.calibrate()
        return p


def _median(xs) -> float:
    return quantile(list(xs), 0.5)
