"""Least-squares fits of stage times, and how well they fit.

A `LinearFit` is t = Σ coef_i · feature_i(x) over named features (e.g. "b", "b*ctx", "1"). Several
candidate forms are fitted to the same samples; `best_fit` keeps the one with the lowest
leave-one-out relative error (so a form with more terms must earn them), and reports R², the mean
and the worst relative error in-sample. Coefficients are constrained to be >= 0 (a stage never gets
faster with more work): terms that would go negative are dropped and the rest refitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Sample = tuple[dict, float]          # (features by name, measured seconds)


@dataclass(frozen=True)
class LinearFit:
    terms: tuple[str, ...]
    coef: tuple[float, ...]
    r2: float = 0.0
    mean_rel_err: float = 0.0          # in-sample, |pred - t| / t
    max_rel_err: float = 0.0
    loo_rel_err: float = 0.0           # leave-one-out mean relative error
    n: int = 0

    def __call__(self, x: dict) -> float:
        return sum(c * x[t] for t, c in zip(self.terms, self.coef))

    def formula(self, unit: float = 1e-3, unit_name: str = "ms") -> str:
        parts = [f"{c / unit:.4g}{'' if t == '1' else '·' + t}" for t, c in zip(self.terms, self.coef) if c]
        return f"{' + '.join(parts) or '0'} {unit_name}"

    def quality(self) -> str:
        return (f"R² {self.r2:.3f}, mean err {100 * self.mean_rel_err:.1f}%, max {100 * self.max_rel_err:.1f}%, "
                f"leave-one-out {100 * self.loo_rel_err:.1f}% (n={self.n})")

    def to_dict(self) -> dict:
        return {"terms": list(self.terms), "coef": list(self.coef), "r2": self.r2, "mean_rel_err": self.mean_rel_err,
                "max_rel_err": self.max_rel_err, "loo_rel_err": self.loo_rel_err, "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> "LinearFit":
        return cls(tuple(d["terms"]), tuple(d["coef"]), d.get("r2", 0.0), d.get("mean_rel_err", 0.0),
                   d.get("max_rel_err", 0.0), d.get("loo_rel_err", 0.0), d.get("n", 0))


def _solve(a: list[list[float]], y: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(y)
    m = [row[:] + [v] for row, v in zip(a, y)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-300:
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                if f:
                    m[r] = [vr - f * vc for vr, vc in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] for i in range(n)]


def _nnls(samples: list[Sample], terms: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[float, ...]] | None:
    """Relative-error least squares (rows weighted by 1/t), dropping negative terms until none is left."""
    terms = tuple(terms)
    while terms:
        rows = [[x[t] / y for t in terms] for x, y in samples]
        ata = [[sum(r[i] * r[j] for r in rows) for j in range(len(terms))] for i in range(len(terms))]
        aty = [sum(r[i] for r in rows) for i in range(len(terms))]    # target: y / y = 1
        coef = _solve(ata, aty)
        if coef is None:
            return None
        if min(coef) >= 0:
            return terms, tuple(coef)
        worst = min(range(len(terms)), key=lambda i: coef[i])
        terms = terms[:worst] + terms[worst + 1:]
    return None


def fit_form(samples: list[Sample], terms: tuple[str, ...]) -> LinearFit | None:
    samples = [(x, y) for x, y in samples if y > 0]
    if len(samples) < len(terms):
        return None
    solved = _nnls(samples, terms)
    if solved is None:
        return None
    kept, coef = solved
    fit = LinearFit(kept, coef)
    errs = [abs(fit(x) - y) / y for x, y in samples]
    mean_y = sum(y for _, y in samples) / len(samples)
    ss_tot = sum((y - mean_y) ** 2 for _, y in samples) or 1e-30
    ss_res = sum((fit(x) - y) ** 2 for x, y in samples)
    loo = []
    if len(samples) > len(kept) + 1:
        for i in range(len(samples)):
            rest = samples[:i] + samples[i + 1:]
            s = _nnls(rest, kept)
            if s is not None:
                x, y = samples[i]
                loo.append(abs(LinearFit(*s)(x) - y) / y)
    return LinearFit(kept, coef, r2=1 - ss_res / ss_tot, mean_rel_err=sum(errs) / len(errs), max_rel_err=max(errs),
                     loo_rel_err=sum(loo) / len(loo) if loo else sum(errs) / len(errs), n=len(samples))


def best_fit(samples: list[Sample], forms: list[tuple[str, ...]], what: str) -> LinearFit:
    fits = [f for f in (fit_form(samples, form) for form in forms) if f is not None]
    if not fits:
        raise ValueError(f"cannot fit {what}: {len(samples)} usable samples for forms {forms}")
    return min(fits, key=lambda f: (round(f.loo_rel_err, 3), len(f.terms)))


def features(**named: float) -> dict:
    """A feature dict with the constant term."""
    return {"1": 1.0, **named}


FeatureFn = Callable[..., dict]
