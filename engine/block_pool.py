"""A pool of fixed-size KV-cache blocks with reference counts (pure Python)."""
from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request, 0..1."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self.ref_counts[i] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        """Add a reference to blocks already in use (another sequence reads them too)."""
        for i in ids:
            assert self.ref_counts[i] > 0, f"block {i} is free and cannot be shared"
            self.ref_counts[i] += 1

    def free(self, ids: list[int]) -> None:
        # Tail blocks first, so the blocks of a sequence's start are reused last.
        for i in reversed(ids):
            assert self.ref_counts[i] > 0, f"block {i} freed twice"
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                self._free.append(i)

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is in the free list twice"
        for i, rc in enumerate(self.ref_counts):
            assert rc >= 0, f"block {i} has ref count {rc}"
            assert (rc == 0) == (i in free), f"block {i}: ref count {rc}, free={i in free}"
