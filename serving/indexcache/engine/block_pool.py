"""The paged KV pool's bookkeeping on the host: which blocks are free, who holds which, which hold a
cached prefix.

The device side is `model.paged.PagedKVCache`: every layer's cache is `n_blocks` blocks of `block_size`
rows (the MLA latent or GQA k/v of every layer, the indexer keys of F layers only). A request owns a
block table (its blocks in order: logical position p lives in row `table[p // bs] * bs + p % bs`).

Block 0 is the null block: no request owns it. Unused block-table entries point there and the padding
rows of a CUDA-graph decode write there, so a table always holds valid block ids.

Prefix caching (vLLM's automatic prefix caching, block-level): a block whose `block_size` tokens are all
in the cache gets a hash chained over every token before it and the IndexCache pattern the request ran
with (`prefix_hashes`). The pattern is in the chain because what a block holds depends on it: an F layer
writes indexer keys that an S layer does not, and the latents of every layer after the first layer
whose F/S kind differs are computed from different top-k selections. So a request on a new pattern never
reuses a block written under another one (no stale indexer keys or selections); the old pattern's
blocks age out of the LRU. A block is shared read-only: a request reuses only whole blocks strictly
before its last prompt token, so every block it writes is its own.

Freed blocks that carry a hash stay cached (reference count 0, in LRU order) until an allocation needs
them; `allocate` takes never-hashed free blocks first, then evicts the least recently used.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for (the engine waits or preempts; never corrupts)."""


NULL_BLOCK = 0


def chain_hash(prev: bytes | None, block_tokens: list[int], pattern: str) -> bytes:
    """The hash of one full block given the hash of the block before it (None for the first block).
    Same tokens from the start + same pattern <=> same hash (sha256)."""
    if prev is None:
        prev = hashlib.sha256(f"pattern:{pattern}".encode()).digest()
    return hashlib.sha256(prev + b"|" + ",".join(map(str, block_tokens)).encode()).digest()


def prefix_hashes(tokens: list[int], block_size: int, pattern: str, n_blocks: int | None = None) -> list[bytes]:
    """Hashes of the first `n_blocks` full blocks of `tokens` (default: all full blocks)."""
    n = len(tokens) // block_size if n_blocks is None else min(n_blocks, len(tokens) // block_size)
    out, prev = [], None
    for i in range(n):
        prev = chain_hash(prev, tokens[i * block_size:(i + 1) * block_size], pattern)
        out.append(prev)
    return out


class BlockPool:
    """`n_blocks` blocks (block 0 reserved as the null block), reference counted, with a prefix table."""

    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if n_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the null block), got {n_blocks}: "
                             f"give a larger token budget or GPU memory share")
        self.n_blocks, self.block_size, self.prefix_caching = n_blocks, block_size, prefix_caching
        self.free: list[int] = list(range(n_blocks - 1, 0, -1))   # never-hashed free blocks (pop from the end)
        self.refs = [0] * n_blocks
        self.hash_of: dict[int, bytes] = {}                 # block -> its prefix hash (cached or in use)
        self.pattern_of: dict[int, str] = {}                # block -> the pattern it was written under
        self.block_of: dict[bytes, int] = {}                # prefix hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()   # hashed, refcount 0, least recent first

    @property
    def usable(self) -> int:
        return self.n_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free + cached but unused)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.usable - self.num_free

    def usage(self) -> float:
        """Blocks held by requests / usable blocks (0..1); cached-but-unused prefix blocks count as free."""
        return self.num_used / self.usable

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.free:
                block = self.free.pop()
            else:                                            # evict the least recently used cached prefix block
                block, _ = self.evictable.popitem(last=False)
                del self.block_of[self.hash_of.pop(block)]
                del self.pattern_of[block]
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds is free again (or cached, if hashed).
        Released in reverse so a request's last blocks are evicted before its first (shared prefixes)."""
        for block in reversed(blocks):
            if block == NULL_BLOCK:
                continue
            if self.refs[block] <= 0:
                raise RuntimeError(f"KV block {block} released more often than it was taken")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The longest cached prefix: blocks for hashes[0..m), each now referenced once more (the caller
        owns them and must `release` them)."""
        if not self.prefix_caching:
            return []
        out = []
        for h in hashes:
            block = self.block_of.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                self.evictable.pop(block, None)
            self.refs[block] += 1
            out.append(block)
        return out

    def register(self, block: int, block_hash: bytes, pattern: str) -> None:
        """Record that `block` (held by a request, full) holds the prefix `block_hash`. A hash already
        cached keeps its first block; this one stays private and is freed normally."""
        if not self.prefix_caching or block_hash in self.block_of or block in self.hash_of:
            return
        self.block_of[block_hash] = block
        self.hash_of[block] = block_hash
        self.pattern_of[block] = pattern

    def drop_prefixes(self, keep_patterns: set[str]) -> int:
        """Forget the cached prefixes written under patterns not in `keep_patterns` (their indexer-key
        pools were freed, so their blocks can no longer be trusted if that pattern comes back). Returns
        how many blocks were forgotten."""
        gone = [b for b, p in self.pattern_of.items() if p not in keep_patterns]
        for block in gone:
            del self.block_of[self.hash_of.pop(block)]
            del self.pattern_of[block]
            if block in self.evictable:
                del self.evictable[block]
                self.free.append(block)
        return len(gone)

    def clear_prefixes(self) -> None:
        """Forget every cached prefix (unused cached blocks become plain free blocks)."""
        for block in list(self.evictable):
            self.free.append(block)
        self.evictable.clear()
        self.block_of.clear()
        self.hash_of.clear()
        self.pattern_of.clear()
