"""Per-sequence block tables on top of the block pool (pure Python).

Sliding windows: when every layer attends only to the last `window` positions (Mistral, Mixtral),
a sequence's blocks that have fallen wholly before the window of its next token are read by no
later step, and go back to the pool. Their table entries become NO_BLOCK, so a token's block is
still table[position // block_size]; the given-back entries are always a prefix of the table.
Models with some layers that see every position (Gemma 2 and 3) keep every block: one table
serves all layers (the reason is in BENCHMARKS.md, with the memory measured).
"""
from __future__ import annotations

from engine.core.block_pool import BlockKey, BlockPool

NO_BLOCK = -1  # a table entry whose block was given back (the runner reads block 0 there, masked)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def slot(block_ids: list[int], position: int, block_size: int) -> int:
    """The pool slot holding a sequence's position: its block's first slot, plus the offset in it."""
    return block_ids[position // block_size] * block_size + position % block_size


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 window: int | None = None) -> None:
        """window: the positions every layer attends to, counting the query's own (None: some layer
        attends to every earlier one)."""
        self.block_size = block_size
        self.window = window
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        # how many leading blocks of each table are registered in (or came from) the prefix cache
        self._num_cached_blocks: dict[str, int] = {}
        # how many leading entries of each table are NO_BLOCK (given back, outside the window)
        self._num_passed: dict[str, int] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_ids(self, seq_id: str) -> list[int]:
        return self.block_tables.get(seq_id, [])

    def allocate_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Make room for the first `num_tokens` tokens of a sequence; False if the pool is short."""
        table = self.block_tables.setdefault(seq_id, [])
        missing = self.num_blocks_for(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.pool.num_free:
            return False
        table.extend(self.pool.allocate(missing))
        return True

    # --- prefix caching -------------------------------------------------------------------
    # With prefix caching off, only salted sequences (the choices of one request) register and
    # look up blocks; with it on, every sequence does.
    def _active(self, salt: str | None) -> bool:
        return self.enable_prefix_caching or salt is not None

    def take_cached_prefix(self, seq_id: str, token_ids: list[int], max_tokens: int, salt: str | None = None) -> int:
        """Start an empty table with the cached blocks of token_ids' longest cached prefix.

        At most `max_tokens` tokens are taken (the caller keeps at least the last prompt token
        to compute, whose logits pick the next token). Returns the number of tokens taken.
        """
        assert not self.block_tables.get(seq_id), f"{seq_id} already holds blocks"
        if not self._active(salt):
            return 0
        blocks, parent = [], None
        for j in range(max_tokens // self.block_size):
            block = self.pool.lookup(self._key(parent, token_ids, j, salt))
            if block is None:
                break
            blocks.append(block)
            parent = block
        if blocks:
            passed = self._passed(len(blocks) * self.block_size, len(blocks))  # (never touched)
            self.pool.touch(blocks[passed:])
            self.block_tables[seq_id] = [NO_BLOCK] * passed + blocks[passed:]
            self._num_cached_blocks[seq_id] = len(blocks)
            self._num_passed[seq_id] = passed
        return len(blocks) * self.block_size

    def cache_full_blocks(self, seq_id: str, token_ids: list[int], num_computed: int,
                          salt: str | None = None) -> None:
        """Register the sequence's blocks that are full and computed (token_ids[:num_computed]);
        computed tokens not yet in token_ids (accepted drafts, appended after) wait for a later call."""
        if not self._active(salt):
            return
        table = self.block_tables.get(seq_id, [])
        done = self._num_cached_blocks.get(seq_id, 0)
        full = min(min(num_computed, len(token_ids)) // self.block_size, len(table))
        for j in range(done, full):
            self.pool.cache(table[j], self._key(table[j - 1] if j else None, token_ids, j, salt))
        if full > done:
            self._num_cached_blocks[seq_id] = full

    # --- sliding windows ------------------------------------------------------------------
    def _passed(self, num_computed: int, num_cached: int | None) -> int:
        """Leading blocks no token from position num_computed on attends to. The token at position p
        sees p - window + 1 .. p. num_cached: the blocks registered in the prefix cache (None: the
        sequence registers none), of which the newest is kept: the next one's key names it."""
        if self.window is None:
            return 0
        passed = max(0, num_computed - self.window + 1) // self.block_size
        return passed if num_cached is None else max(0, min(passed, num_cached - 1))

    def free_passed(self, seq_id: str, num_computed: int, salt: str | None = None) -> None:
        """Give back the blocks of the sequence that fell wholly outside the window, now that it has
        computed num_computed tokens."""
        table = self.block_tables.get(seq_id)
        if self.window is None or not table:
            return
        cached = self._num_cached_blocks.get(seq_id, 0) if self._active(salt) else None
        done, passed = self._num_passed.get(seq_id, 0), self._passed(num_computed, cached)
        if passed > done:
            self.pool.free(table[done:passed])
            # a new list, as in free_tail: the runner rewrites the row of a list it has not seen
            self.block_tables[seq_id] = [NO_BLOCK] * passed + table[passed:]
            self._num_passed[seq_id] = passed

    def _key(self, parent: int | None, token_ids: list[int], j: int, salt: str | None) -> BlockKey:
        """The cache key of block j of token_ids, which follows block `parent`."""
        bs = self.block_size
        return self.pool.key(parent, tuple(token_ids[j * bs:(j + 1) * bs]), salt)

    def fork(self, parent: str, child: str, num_tokens: int) -> tuple[int, list[tuple[int, int]]]:
        """Start child's table with parent's first num_tokens tokens: the full blocks shared (by
        reference count: they are never written again), the partial last block copied. Returns the
        tokens the child now has computed and the block copies (source, destination) the runner
        must make; when the pool has no block for the copy, the child has only the full blocks
        and recomputes the rest."""
        assert not self.block_tables.get(child), f"{child} already holds blocks"
        table = self.block_tables[parent]
        full = num_tokens // self.block_size
        passed = min(self._num_passed.get(parent, 0), full)
        self.pool.touch(table[passed:full])
        new, copies = table[:full], []
        if num_tokens % self.block_size and self.pool.num_free:
            (block,) = self.pool.allocate(1)
            new.append(block)
            copies.append((table[full], block))
        self.block_tables[child] = new
        self._num_cached_blocks[child] = min(self._num_cached_blocks.get(parent, 0), full)
        self._num_passed[child] = passed
        return min(num_tokens, len(new) * self.block_size), copies

    def free_tail(self, seq_id: str, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` tokens' (slots of rejected drafts)."""
        table = self.block_tables.get(seq_id, [])
        keep = self.num_blocks_for(num_tokens)
        if len(table) > keep:
            assert keep >= self._num_cached_blocks.get(seq_id, 0), "a cached block would be given back"
            self.pool.free(table[keep:])
            # a new list, not the old one cut: the runner keeps each table's row and writes only
            # what was appended to the list it saw (model_runner._BlockTables)
            self.block_tables[seq_id] = table[:keep]

    def free(self, seq_id: str) -> None:
        """Release every block the sequence holds; harmless if it holds none."""
        self._num_cached_blocks.pop(seq_id, None)
        passed = self._num_passed.pop(seq_id, 0)
        table = self.block_tables.pop(seq_id, None)
        if table:
            self.pool.free(table[passed:])

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        refs = [0] * self.pool.num_blocks
        for seq_id, table in self.block_tables.items():
            passed = self._num_passed.get(seq_id, 0)
            assert table[:passed] == [NO_BLOCK] * passed and NO_BLOCK not in table[passed:], f"{seq_id}: {table}"
            for i in table[passed:]:
                refs[i] += 1
        assert refs == self.pool.ref_counts, "block tables and ref counts disagree"
