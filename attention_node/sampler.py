"""Pick the next token of each sampled row: greedy, or temperature / top-k / top-p with a seed.

Legend: N rows, V vocab. Greedy rows are one argmax over the batch. A sampled row draws from its
own generator seeded by (request seed, output index), so its tokens do not depend on the batch it
ran in, on the rank, or on a preemption. Logprobs (of the model's raw distribution) are computed
only for rows that asked for them (a full log-softmax over the vocabulary is not free); the others
report NaN.

Numerics: every value `SamplingParams` accepts is safe here, whatever the logits' dtype (float32
from the LM head; bfloat16 / float16 rows are widened to float32 for the sampling arithmetic, a
bf16 cumsum over a vocabulary being far off). Validation checks the parameters in float64, the
sampler works in float32, so:
- a temperature outside float32's normal range (1e-40 and 1e-300 are 0 or subnormal there, 1e39 is
  inf) is applied in float64 to the logits minus their maximum, and a temperature so small that
  `logits / temperature` overflows is its limit: greedy, uniform over tokens tied at the maximum;
- a top_p below the smallest float32 probability (1e-300, 5e-324 are 0 there) keeps the top token;
- a row whose distribution is still not a probability vector (the logits hold NaN or +inf, or every
  entry is -inf: nothing the parameters can cause) falls back to greedy for that row alone and is
  logged on "shuttle.sampler"; the other rows of the batch are untouched and nothing raises.
"""

from __future__ import annotations

import logging
import math

import torch

from models.cpu_kernels import for_tensor
from scheduler.request import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # spreads consecutive output indices over the seed space

log = logging.getLogger("shuttle.sampler")


def token_generator(seed: int | None, output_index: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(((seed or 0) * _MIX + output_index) % (2**63 - 1))  # the head always sets a seed; None: 0
    return g


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _greedy_limit(x: torch.Tensor) -> torch.Tensor:
    """The temperature → 0 limit of a row: 0 at the entries equal to its maximum, -inf elsewhere."""
    return torch.zeros_like(x).masked_fill_(x != x.max(), float("-inf"))


def _apply_temperature(x: torch.Tensor, t: float) -> torch.Tensor:
    fi = torch.finfo(x.dtype)
    if t <= 0.0:
        return _greedy_limit(x)
    if t < fi.tiny or t > fi.max:
        # In x's dtype t is 0 / subnormal (x / t is inf or nan, or loses the temperature's digits) or
        # inf (x / t is 0, and nan at -inf). float64 holds every temperature validation accepts;
        # shifting by the maximum first keeps the quotient from overflowing at the top token, and
        # what overflows below it becomes -inf, which is its probability in x's dtype anyway.
        d = x.double() - x.max()
        return (d / torch.full_like(d, t)).to(x.dtype)   # a tensor divisor: CUDA turns `/ scalar` into `* (1 / t)`
    y = x / t                                             # the ordinary path, unchanged
    if t < 1.0 and not torch.isfinite(y.max()):
        # Overflow (|x| / t above the dtype's max). Then every other distinct value lies at least
        # ~2^-24 * max / t ≈ 2e31 below the top one after scaling: its probability is exactly 0 in
        # this dtype, so the greedy limit is the exact distribution, not an approximation.
        return _greedy_limit(x)
    return y


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row [V]: temperature, then top-k, then top-p (nucleus); removed entries become -inf.

    Returns float32 (float64 for float64 input). Given a row with a finite maximum, the result has a
    finite maximum for every value `SamplingParams` accepts, so its softmax is a distribution."""
    logits = _apply_temperature(logits.to(_work_dtype(logits.dtype)), float(p.temperature))
    k = p.top_k
    if 0 < k < logits.shape[-1]:
        kth = torch.topk(logits, math.ceil(k)).values[-1]   # ceil: validation lets a non-integer top_k through
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= p.top_p          # keep the smallest prefix whose mass reaches top_p
        drop[0] = False   # the top token always stays: a top_p that is 0 in float32 (1e-300) would drop every token
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits


def _row_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, argmax) of each row: one pass of Shuttle's CPU kernel for float32 CPU logits (torch's
    argmax took ~1 ms at 64 × 32000), torch's ops elsewhere; both put a NaN first."""
    kernels = for_tensor(logits)
    if kernels is not None and logits.dtype == torch.float32 and logits.is_contiguous() and logits.shape[-1]:
        return kernels.row_max(logits)
    return logits.amax(dim=-1), logits.argmax(dim=-1)


def _is_distribution(probs: torch.Tensor) -> bool:
    """What torch.multinomial demands of a row (no inf or nan, no negative entry, a positive sum)."""
    total, low = torch.stack([probs.sum(), probs.min()]).tolist()
    return math.isfinite(total) and total > 0 and low >= 0


def _argmax_ignoring_nan(row: torch.Tensor) -> torch.Tensor:
    """The greedy fallback's token: the first +inf if any, else the largest finite entry; 0 if none."""
    return row.masked_fill(row.isnan(), float("-inf")).argmax()


def _limit_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax in float64 of rows [R, V], finite at every token the sampler can return for them.

    For a row with a finite maximum this is the plain log-softmax (float64 keeps x_j - max finite for
    float32 logits 6e38 apart). An invalid row (see the module notes) gets its limiting distribution:
    NaN entries dropped, uniform over the +inf entries if there are any, else uniform over the
    vocabulary when no entry is finite."""
    x = x.double()
    x = x.masked_fill(x.isnan(), float("-inf"))
    pos = x == float("inf")
    x = torch.where(pos.any(-1, keepdim=True), torch.zeros_like(x).masked_fill_(~pos, float("-inf")), x)
    x = x.masked_fill((x == float("-inf")).all(-1, keepdim=True), 0.0)
    return torch.log_softmax(x, dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> tuple[list[int], list[float]]:
    """logits [N, V] float32 (or bfloat16) → (token ids, logprobs of those tokens).

    Never raises for parameters `SamplingParams` accepts. A row whose logits have no finite maximum
    (NaN, +inf, or every entry -inf), or whose filtered distribution is not a probability vector,
    takes the greedy fallback (`_argmax_ignoring_nan`), is logged once per call, and, if it asked
    for logprobs, reports the finite logprob of its limiting distribution (`_limit_log_softmax`)."""
    if logits.shape[0] == 0:
        return [], []
    top, ids = _row_max(logits)                                      # [N] each
    row_ok = [math.isfinite(v) for v in top.tolist()]               # NaN propagates through the max
    fallback = {i: "logits have no finite maximum (NaN, +inf, or every entry -inf)"
                for i, ok in enumerate(row_ok) if not ok}
    for i, p in enumerate(params):
        if p.greedy or i in fallback:
            continue
        probs = torch.softmax(filter_logits(logits[i], p), dim=-1)
        if _is_distribution(probs):
            ids[i] = torch.multinomial(probs, 1, generator=token_generator(p.seed, output_index[i], logits.device))[0]
        else:
            fallback[i] = "the filtered distribution is not a probability vector"
    for i, why in sorted(fallback.items()):
        ids[i] = _argmax_ignoring_nan(logits[i])
        log.warning("sampler: row %d (output index %d, %s): %s; greedy fallback for this row, token %d",
                    i, output_index[i], params[i], why, int(ids[i]))
    chosen = [float("nan")] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs]
    if want:
        rows = torch.tensor(want, device=logits.device)
        x = logits[rows]
        lps = torch.log_softmax(x.to(_work_dtype(x.dtype)), dim=-1).gather(1, ids[rows, None])[:, 0].tolist()
        redo = [k for k, lp in enumerate(lps) if not math.isfinite(lp)]
        if redo:   # an invalid row, or float32's x_j - max overflowing: float64 and the limit
            r = torch.tensor(redo, device=logits.device)
            again = _limit_log_softmax(x[r]).gather(1, ids[rows[r], None])[:, 0].tolist()
            for k, lp in zip(redo, again):
                lps[k] = lp
        for i, lp in zip(want, lps):
            chosen[i] = lp
    return ids.tolist(), chosen
