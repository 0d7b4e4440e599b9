"""Which expert rank owns which logical expert (the same for every MoE layer).

The default placement splits experts into contiguous ranges as evenly as counts allow: 8 experts
over 3 ranks gives ranks 0, 1, 2 the experts [0, 1, 2], [3, 4, 5], [6, 7]. Torch-free, so the head
can show it and the tuner can reason about it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    owner: tuple[int, ...]   # owner[e] = expert rank that holds expert e
    num_ranks: int

    def __post_init__(self) -> None:
        bad = [e for e, r in enumerate(self.owner) if not 0 <= r < self.num_ranks]
        if bad:
            raise ValueError(f"experts {bad} are placed on ranks outside [0, {self.num_ranks})")

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> "Placement":
        if num_ranks < 1:
            raise ValueError("need at least one expert rank")
        if num_ranks > num_experts:
            raise ValueError(f"{num_ranks} expert ranks for {num_experts} experts: some ranks would own nothing")
        base, extra = divmod(num_experts, num_ranks)
        owner: list[int] = []
        for r in range(num_ranks):
            owner += [r] * (base + (1 if r < extra else 0))
        return cls(tuple(owner), num_ranks)

    def experts_of(self, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.owner) if r == rank]
