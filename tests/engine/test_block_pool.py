"""BlockPool and KVCacheManager: exact block ids, reference counts, invariants."""
import pytest

from engine.core.block_pool import BlockPool, NoFreeBlocksError
from engine.core.kv_cache_manager import NO_BLOCK, KVCacheManager


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
    pool.touch(ids)  # a second sequence takes them (a prefix-cache hit on blocks in use)
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


# --- prefix caching ---------------------------------------------------------------------------
def _computed(kv: KVCacheManager, seq: str, tokens: list[int]) -> list[int]:
    """A sequence that has computed `tokens`: allocate, register its full blocks, return its table."""
    assert kv.allocate_slots(seq, len(tokens))
    kv.cache_full_blocks(seq, tokens, len(tokens))
    return kv.block_ids(seq)


def test_prefix_hit_takes_the_same_blocks_back_verified_by_token_ids():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    tokens = list(range(100, 110))  # 2 full blocks + 2 tokens
    table = _computed(kv, "a", tokens)
    assert table == [0, 1, 2] and kv.pool.num_cached == 2  # the partial block is not cached
    kv.free("a")
    assert kv.pool.num_free == 8  # cached blocks count as free: they can be evicted
    # same first block, different second block: one block hit, verified token by token
    assert kv.take_cached_prefix("b", tokens[:4] + [1, 2, 3, 4, 5], max_tokens=8) == 4
    assert kv.block_ids("b") == [0] and kv.pool.ref_counts[0] == 1
    assert kv.take_cached_prefix("c", tokens + [7], max_tokens=10) == 8
    assert kv.block_ids("c") == [0, 1] and kv.pool.ref_counts[:2] == [2, 1]
    kv.check_invariants()


def test_prefix_hit_leaves_the_last_token_to_compute():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    tokens = list(range(8))
    _computed(kv, "a", tokens)
    # the whole prompt is cached, but its last token's logits are needed: only 1 block is taken
    assert kv.take_cached_prefix("b", tokens, max_tokens=len(tokens) - 1) == 4
    assert kv.take_cached_prefix("c", tokens[1:], max_tokens=6) == 0  # shifted by one: no hit
    assert kv.block_ids("c") == []
    kv.check_invariants()


def test_a_block_in_a_different_context_is_not_a_hit():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    _computed(kv, "a", [1, 2, 3, 4])
    # block [3, 4] after [9, 9] is other KV than [3, 4] after [1, 2]
    assert kv.take_cached_prefix("b", [9, 9, 3, 4, 5], max_tokens=4) == 0
    kv.check_invariants()


def test_eviction_is_lru_and_reused_parents_invalidate_their_children():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    _computed(kv, "a", [1, 2, 3, 4])  # blocks 0 (parent), 1 (child)
    _computed(kv, "b", [5, 6])  # block 2
    kv.free("a")  # free list: 3, 1, 0 (tail first)
    kv.free("b")  # ..., 2
    assert kv.pool.num_cached == 3
    assert kv.allocate_slots("c", 4) and kv.block_ids("c") == [3, 1]  # evicts the child first
    assert kv.pool.num_cached == 2
    assert kv.take_cached_prefix("d", [1, 2, 3, 4, 0], max_tokens=4) == 2  # the parent is still there
    assert kv.block_ids("d") == [0]
    kv.check_invariants()


def test_generation_makes_stale_children_unreachable():
    pool = BlockPool(2)
    parent, child = pool.allocate(2)
    pool.cache(parent, pool.key(None, (1,)))
    pool.cache(child, pool.key(parent, (2,)))
    old_child_key = pool.key(parent, (2,))
    pool.free([parent])  # the child is still in use; the parent gets reused for new content
    (again,) = pool.allocate(1)
    assert again == parent
    assert pool.lookup(pool.key(None, (1,))) is None
    pool.cache(parent, pool.key(None, (9,)))
    # the same block id now holds other content: its old child must not be found under it
    assert pool.lookup(pool.key(parent, (2,))) is None
    assert pool.lookup(old_child_key) == child  # the stale key names the old generation only
    pool.check_invariants()


@pytest.mark.parametrize("caching", [False, True])
def test_salted_blocks_are_shared_by_reference_only_under_the_same_salt(caching):
    """n > 1: a request's choices share its prompt blocks under its salt (caching on or off)."""
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=caching)
    tokens = list(range(10))
    assert kv.allocate_slots("p", 10)  # blocks 0, 1, 2
    kv.cache_full_blocks("p", tokens, 10, salt="r")
    assert kv.take_cached_prefix("x", tokens, max_tokens=9) == 0  # unsalted: another request
    assert kv.take_cached_prefix("y", tokens, max_tokens=9, salt="s") == 0
    assert kv.take_cached_prefix("c", tokens, max_tokens=9, salt="r") == 8
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


def test_caching_disabled_never_hits():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    _computed(kv, "a", [1, 2, 3, 4])
    kv.free("a")
    assert kv.pool.num_cached == 0
    assert kv.take_cached_prefix("b", [1, 2, 3, 4, 5], max_tokens=4) == 0


# --- sliding windows ----------------------------------------------------------------------------
def test_blocks_wholly_before_the_window_go_back_exactly_when_passed():
    # window 6, blocks of 4: the token at position p sees p - 5 .. p, so block 0 (positions 0..3)
    # is passed once the next token is at position 9, block 1 (4..7) at 13
    kv = KVCacheManager(num_blocks=8, block_size=4, window=6)
    for computed, passed in [(8, 0), (9, 1), (12, 1), (13, 2), (20, 3)]:
        assert kv.allocate_slots("a", computed + 1)
        kv.free_passed("a", computed)
        table = kv.block_ids("a")
        assert table[:passed] == [NO_BLOCK] * passed and NO_BLOCK not in table[passed:]
        assert kv.pool.num_free == 8 - (len(table) - passed)
        kv.check_invariants()
    kv.free("a")
    assert kv.pool.num_free == 8
    kv.check_invariants()


def test_no_block_goes_back_without_a_window():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("a", 30)
    kv.free_passed("a", 29)
    assert NO_BLOCK not in kv.block_ids("a") and kv.pool.num_free == 0


def test_a_fork_shares_the_window_and_not_the_blocks_given_back():
    kv = KVCacheManager(num_blocks=8, block_size=4, window=4)
    assert kv.allocate_slots("a", 14)
    kv.free_passed("a", 14)  # the next token (14) sees 11..14: blocks 0 and 1 passed
    computed, copies = kv.fork("a", "b", 14)
    assert computed == 14 and kv.block_ids("b")[:3] == [NO_BLOCK, NO_BLOCK, kv.block_ids("a")[2]]
    assert copies == [(kv.block_ids("a")[3], kv.block_ids("b")[3])]
    kv.check_invariants()
    kv.free("a")
    kv.free("b")
    assert kv.pool.num_free == 8
    kv.check_invariants()


def test_prefix_cache_keeps_its_chain_under_a_window():
    # the newest registered block stays (the next block's key names it), and a hit takes back only
    # the blocks the window still reaches
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True, window=4)
    tokens = list(range(100, 124))  # 6 blocks
    assert kv.allocate_slots("a", 12)
    kv.cache_full_blocks("a", tokens, 12)
    kv.free_passed("a", 12)  # window passed blocks 0, 1 (next token 12 sees 9..12); 2 is the newest cached
    assert kv.block_ids("a")[:2] == [NO_BLOCK, NO_BLOCK]
    assert kv.allocate_slots("a", 24)
    kv.cache_full_blocks("a", tokens, 24)  # blocks 3.. register as children of block 2
    assert kv.pool.num_cached == 6
    kv.free("a")
    assert kv.take_cached_prefix("b", tokens + [1], max_tokens=24) == 24
    table = kv.block_ids("b")
    assert table[:5] == [NO_BLOCK] * 5 and kv.pool.ref_counts[table[5]] == 1  # 24 sees 21..24: block 5
    assert kv.pool.num_free == 15
    kv.check_invariants()
