"""Pick the next token of each sampled row: greedy, or temperature / top-k / top-p with a seed.

Legend: N rows, V vocab. Greedy rows are one argmax over the batch. A sampled row draws from its
own generator seeded by (request seed, output index), so its tokens do not depend on the batch it
ran in, on the rank, or on a preemption. Logprobs (of the model's raw distribution) are computed
only for rows that asked for them (a full log-softmax over the vocabulary is not free); the others
report NaN.
"""

from __future__ import annotations

import torch

from scheduler.request import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # spreads consecutive output indices over the seed space


def token_generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * _MIX + output_index) % (2**63 - 1))
    return g


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row [V]: temperature, then top-k, then top-p (nucleus); removed entries become -inf."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= p.top_p          # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> tuple[list[int], list[float]]:
    """logits [N, V] float32 → (token ids, logprobs of those tokens)."""
    if logits.shape[0] == 0:
        return [], []
    ids = logits.argmax(dim=-1)                                      # [N]
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(filter_logits(logits[i], p), dim=-1)
        ids[i] = torch.multinomial(probs, 1, generator=token_generator(p.seed, output_index[i], logits.device))[0]
    chosen = torch.full((len(params),), float("nan"), device=logits.device)
    want = [i for i, p in enumerate(params) if p.logprobs]
    if want:
        rows = torch.tensor(want, device=logits.device)
        chosen[rows] = torch.log_softmax(logits[rows], dim=-1).gather(1, ids[rows, None])[:, 0].to(chosen.dtype)
    return ids.tolist(), chosen.tolist()
