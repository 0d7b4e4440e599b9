"""A profile: stage times measured on this machine, and the cost model fitted to them.

Samples (one per measured configuration, each a median over layers and steps):
    attention[threads]: (b, ctx, seconds)        T_a of one layer, b sequences of mean context ctx
    expert[threads]:    (pairs, hits, seconds)   T_e of one layer: token-expert pairs, experts hit
    head[threads]:      (b, seconds)             final norm + LM head + sampling
    transfer:           (bytes, seconds)         T_c, one message (dispatch and combine gaps)
    overhead:           (B, seconds)             step wall time outside the ranks' spans (control plane)

Candidate forms (the fit keeps the one with the lowest leave-one-out error, see `fit.py`):
    T_a = k1·b + k2 (MegaScale-Infer) | + k3·b·ctx (KV reads)   T_e = k3·pairs + k4 | + k5·hits (weight reads)
    T_c = latency + bytes / bandwidth                            head = k·b + c      overhead = k·B + c
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from scheduler.tuner.costs import ProfiledCosts
from scheduler.tuner.fit import LinearFit, best_fit, features
from scheduler.tuner.model_shape import ModelShape

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
    samples: dict = field(default_factory=lambda: {"attention": {}, "expert": {}, "head": {}, "transfer": [], "overhead": []})
    fits: dict = field(default_factory=dict)

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

    def costs(self, threads: int) -> ProfiledCosts:
        """Stage costs of a rank running `threads` threads (the nearest profiled count at or below)."""
        if not self.fits:
            raise ValueError("profile has no fits: call fit() first")
        have = self.threads
        t = max([x for x in have if x <= threads] or [min(have)])
        key = str(t)
        return ProfiledCosts(self.fits["attention"][key], self.fits["expert"][key], self.fits["transfer"],
                             self.fits["head"][key], self.fits["overhead"], shared_host_cores=self.cores)

    def report(self) -> list[str]:
        lines = [f"profile of {self.model.name} ({self.dtype}) on {self.machine}, {self.cores} cores"]
        for t in self.threads:
            key = str(t)
            for what, label in (("attention", "T_a"), ("expert", "T_e"), ("head", "LM head")):
                f = self.fits[what][key]
                lines.append(f"  {label:7s} @{t} thr = {f.formula(1e-6, 'µs'):40s} {f.quality()}")
        for what, label in (("transfer", "T_c"), ("overhead", "step overhead")):
            f = self.fits[what]
            lines.append(f"  {label:13s} = {f.formula(1e-6, 'µs'):36s} {f.quality()}")
        return lines

    # ---- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        fits = {k: ({t: f.to_dict() for t, f in v.items()} if isinstance(v, dict) else v.to_dict()) for k, v in self.fits.items()}
        return {"format": FORMAT, "model": self.model.to_dict(), "dtype": self.dtype, "cores": self.cores,
                "machine": self.machine, "samples": self.samples, "fits": fits}

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
        p = cls(ModelShape.from_dict(d["model"]), d["dtype"], d["cores"], d["machine"], d["samples"])
        return p.fit()
