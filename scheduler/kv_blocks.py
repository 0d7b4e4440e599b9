"""KV block accounting for one attention rank (the head's view; the rank holds the tensors).

A block holds `block_size` consecutive positions of one request. A request at `n` tokens holds
ceil(n / block_size) blocks; its block table lists them in position order.
"""

from __future__ import annotations


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Extend `block_ids` in place to cover `num_tokens`; False (and no change) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(block_ids)
        if need > len(self._free):
            return False
        for _ in range(max(need, 0)):
            block_ids.append(self._free.pop())
        return True

    def release(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))
        block_ids.clear()
