"""Per-sequence block tables on top of the block pool (pure Python)."""
from __future__ import annotations

from engine.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

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

    def share_prefix(self, src_seq_id: str, dst_seq_id: str, num_blocks: int) -> None:
        """Let dst start with the first `num_blocks` full blocks of src (reference counted)."""
        assert dst_seq_id not in self.block_tables or not self.block_tables[dst_seq_id]
        shared = self.block_tables[src_seq_id][:num_blocks]
        self.pool.share(shared)
        self.block_tables[dst_seq_id] = list(shared)

    def free(self, seq_id: str) -> None:
        """Release every block the sequence holds; harmless if it holds none."""
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
