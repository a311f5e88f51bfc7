"""BlockPool and KVCacheManager: exact block ids, reference counts, invariants."""
import pytest

from engine.block_pool import BlockPool, NoFreeBlocksError
from engine.kv_cache_manager import KVCacheManager


def test_allocate_and_free_exact_ids():
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.num_free == 5
    assert pool.allocate(2) == [3, 4]
    pool.free([0, 1, 2])  # freed tail first: 2, 1, 0 go to the back of the free list
    assert pool.allocate(5) == [5, 6, 7, 2, 1]
    assert pool.usage == pytest.approx(7 / 8)
    pool.check_invariants()


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.check_invariants()


def test_shared_block_returns_only_after_last_reference():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.share(ids)
    pool.free(ids)
    assert pool.num_free == 2 and pool.ref_counts[:2] == [1, 1]
    pool.free(ids)
    assert pool.num_free == 4
    pool.check_invariants()


def test_double_free_is_caught():
    pool = BlockPool(2)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(AssertionError):
        pool.free(ids)


def test_manager_grows_tables_block_by_block():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    assert kv.allocate_slots("a", 5)  # 5 tokens -> 2 blocks
    assert kv.block_ids("a") == [0, 1]
    assert kv.allocate_slots("a", 8)  # still 2 blocks
    assert kv.block_ids("a") == [0, 1]
    assert kv.allocate_slots("a", 9)
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.allocate_slots("b", 12)
    assert kv.block_ids("b") == [3, 4, 5]
    assert not kv.allocate_slots("c", 1)  # pool empty: refused, nothing half-allocated
    assert kv.block_ids("c") == []
    kv.check_invariants()
    kv.free("a")
    kv.free("a")  # harmless the second time
    assert kv.pool.num_free == 3
    kv.check_invariants()


def test_share_prefix_counts_references():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots("p", 10)  # blocks 0, 1, 2
    kv.share_prefix("p", "c", 2)
    assert kv.block_ids("c") == [0, 1]
    assert kv.allocate_slots("c", 10)
    assert kv.block_ids("c") == [0, 1, 3]
    assert kv.pool.ref_counts[:4] == [2, 2, 1, 1]
    kv.check_invariants()
    kv.free("p")
    assert kv.pool.ref_counts[:4] == [1, 1, 0, 1]
    kv.free("c")
    assert kv.pool.num_free == 8
    kv.check_invariants()
