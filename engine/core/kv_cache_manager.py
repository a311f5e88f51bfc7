"""Per-sequence block tables on top of the block pool (pure Python)."""
from __future__ import annotations

from engine.core.block_pool import BlockKey, BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        # how many leading blocks of each table are registered in (or came from) the prefix cache
        self._num_cached_blocks: dict[str, int] = {}

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
            self.pool.touch(blocks)
            self.block_tables[seq_id] = blocks
            self._num_cached_blocks[seq_id] = len(blocks)
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
        self.pool.touch(table[:full])
        new, copies = table[:full], []
        if num_tokens % self.block_size and self.pool.num_free:
            (block,) = self.pool.allocate(1)
            new.append(block)
            copies.append((table[full], block))
        self.block_tables[child] = new
        self._num_cached_blocks[child] = min(self._num_cached_blocks.get(parent, 0), full)
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
        table = self.block_tables.pop(seq_id, None)
        if table:
            self.pool.free(table)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        refs = [0] * self.pool.num_blocks
        for table in self.block_tables.values():
            for i in table:
                refs[i] += 1
        assert refs == self.pool.ref_counts, "block tables and ref counts disagree"
