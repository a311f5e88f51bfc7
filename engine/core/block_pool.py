"""A pool of fixed-size KV-cache blocks with reference counts and a prefix cache (pure Python).

Prefix caching: a full block, once computed, is registered under a key naming its exact
content: (parent block id, parent's generation, the block's token ids). A block's KV depends on
every token before it, and two sequences only ever share a block when their prefixes are equal,
so the parent block's identity stands for the whole prefix; the token ids are compared by the
dict itself, so a hit is verified, never just a hash match. When a block is handed out for new
content its generation goes up, which makes every key naming it as a parent unreachable.

A salt (a string) may stand in for the missing parent of a sequence's first block: keys with a
salt are found only by lookups with the same salt. The scheduler salts a request's keys with its id
when prefix caching is off, so that its own choices (n > 1) share its prompt and nobody else can.

Freed blocks keep their KV and their key: the free list is an LRU (front = evicted first) from
which a later request with the same prefix takes them back, until allocate() reuses them.
"""
from __future__ import annotations

from collections import OrderedDict

# (parent block id, or the salt or -1 for a first block; the parent's generation; the block's token ids)
BlockKey = tuple[int | str, int, tuple[int, ...]]


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._keys: list[BlockKey | None] = [None] * num_blocks
        self._generation = [0] * num_blocks
        self._cached: dict[BlockKey, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached ones included: they can be evicted at any time)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request, 0..1."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """n blocks for new content, least recently freed first (evicting their cached KV)."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        ids = []
        for _ in range(n):
            i, _ = self._free.popitem(last=False)
            self._uncache(i)
            self._generation[i] += 1
            self.ref_counts[i] = 1
            ids.append(i)
        return ids

    def free(self, ids: list[int]) -> None:
        # Tail blocks first, so the blocks of a sequence's start are evicted last.
        for i in reversed(ids):
            assert self.ref_counts[i] > 0, f"block {i} freed twice"
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                self._free[i] = None

    # --- the prefix cache ----------------------------------------------------------------
    def key(self, parent: int | None, tokens: tuple[int, ...], salt: str | None = None) -> BlockKey:
        """The key of a block holding `tokens` right after block `parent` (None: at the start,
        where `salt` keeps the chain apart from unsalted ones and those of other salts)."""
        if parent is None:
            return (-1 if salt is None else salt, 0, tokens)
        return (parent, self._generation[parent], tokens)

    def lookup(self, key: BlockKey) -> int | None:
        return self._cached.get(key)

    def cache(self, block: int, key: BlockKey) -> None:
        """Register a full, computed block; a block already cached, or a twin of one, is left as is."""
        assert self.ref_counts[block] > 0, f"block {block} is free and cannot be cached"
        if self._keys[block] is None and key not in self._cached:
            self._cached[key] = block
            self._keys[block] = key

    def touch(self, ids: list[int]) -> None:
        """Take a reference on cached blocks, in use or free (a prefix-cache hit)."""
        for i in ids:
            if self.ref_counts[i] == 0:
                del self._free[i]
            self.ref_counts[i] += 1

    def _uncache(self, i: int) -> None:
        key = self._keys[i]
        if key is not None:
            del self._cached[key]
            self._keys[i] = None

    def check_invariants(self) -> None:
        for i, rc in enumerate(self.ref_counts):
            assert rc >= 0, f"block {i} has ref count {rc}"
            assert (rc == 0) == (i in self._free), f"block {i}: ref count {rc}, free={i in self._free}"
        for key, i in self._cached.items():
            assert self._keys[i] == key, f"block {i} is cached under a key it does not hold"
        assert sum(k is not None for k in self._keys) == len(self._cached)
