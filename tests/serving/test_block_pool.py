"""The paged pool's bookkeeping (engine/block_pool.py): reference counts, the null block, the prefix table
and its LRU eviction, what a request would notice if any of it broke (a block handed to two owners, a
cached prefix served under another pattern, a hot prefix evicted before a cold one)."""
import pytest

from indexcache.engine.block_pool import NULL_BLOCK, BlockPool, OutOfBlocks, prefix_hashes


def test_blocks_are_handed_out_once_and_come_back_on_release():
    pool = BlockPool(5, 4, prefix_caching=False)
    a, b = pool.allocate(2), pool.allocate(2)
    assert NULL_BLOCK not in a + b and len(set(a + b)) == 4 and pool.num_free == 0 and pool.usage() == 1.0
    with pytest.raises(OutOfBlocks, match="asked for 1 KV blocks, 0 free"):
        pool.allocate(1)
    pool.release(a)
    assert pool.num_free == 2 and sorted(pool.allocate(2)) == sorted(a)
    pool.release(b)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(b)


def test_prefix_hashes_chain_tokens_and_pattern():
    t = list(range(12))
    h = prefix_hashes(t, 4, "FS")
    assert len(h) == 3 and len(set(h)) == 3
    assert prefix_hashes(t[:8] + [99, 98, 97, 96], 4, "FS")[:2] == h[:2]          # same prefix, same hashes
    assert prefix_hashes([0, 1, 2, 99] + t[4:], 4, "FS")[1] != h[1]              # an earlier change moves later ones
    assert not set(prefix_hashes(t, 4, "FF")) & set(h)                            # another pattern shares nothing


def test_cached_prefixes_are_shared_then_evicted_least_recently_used_first():
    pool = BlockPool(5, 4)
    hot, cold = prefix_hashes(list(range(8)), 4, "F"), prefix_hashes(list(range(50, 58)), 4, "F")
    blocks_hot, blocks_cold = pool.allocate(2), pool.allocate(2)
    for blk, h in zip(blocks_hot + blocks_cold, hot + cold):
        pool.register(blk, h, "F")
    pool.release(blocks_cold)
    pool.release(blocks_hot)
    assert pool.num_free == 4 and pool.num_used == 0
    assert pool.lookup(hot) == blocks_hot                 # a hit takes references: the blocks are in use again
    assert pool.num_used == 2
    pool.release(blocks_hot)                              # hot is now the most recently used
    fresh = pool.allocate(2)                              # evicts the cold prefix, not the hot one
    assert sorted(fresh) == sorted(blocks_cold) and pool.lookup(cold) == []
    assert pool.lookup(hot) == blocks_hot


def test_dropping_a_patterns_prefixes_frees_their_blocks():
    pool = BlockPool(4, 4)
    f, s = pool.allocate(1), pool.allocate(1)
    pool.register(f[0], prefix_hashes([1, 2, 3, 4], 4, "FF")[0], "FF")
    pool.register(s[0], prefix_hashes([1, 2, 3, 4], 4, "FS")[0], "FS")
    pool.release(f + s)
    assert pool.drop_prefixes({"FS"}) == 1
    assert pool.lookup(prefix_hashes([1, 2, 3, 4], 4, "FF")) == []
    assert pool.lookup(prefix_hashes([1, 2, 3, 4], 4, "FS")) == s
