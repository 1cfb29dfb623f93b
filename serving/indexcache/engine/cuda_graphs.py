"""CUDA graphs of the engine's decode step: one graph per (batch bucket, context bucket, pattern).

A decode step of a 47-layer DSA model is ~1,500 small kernel launches; replayed as one CUDA graph the
launch gaps disappear (vLLM and SGLang do the same). What a graph bakes in is static:
  - the batch size: requests are padded up to a bucket (1, 2, 4, 8, 16, 32, 64, ... up to the engine's
    maximum); padding rows decode token 0 at position 0 of a scratch slot that no request owns;
  - the number of cache rows the indexer reads (`kv_bound`): a power of two >= the longest context in the
    batch (from 1024 up to max_model_len), so a short request does not pay for a long maximum;
  - the IndexCache pattern (which layers run an indexer): a pattern switch selects the new pattern's
    graphs (captured on first use) while requests admitted earlier keep replaying theirs.
Inputs are copied into static buffers before each replay; the logits come back from a static output.
Paged KV cache (`max_blocks`): the block tables are one more static input, (Bmax, max_blocks) int32 with
max_blocks = ceil(max_len / block_size) columns, so every context bucket reads through the same buffer;
entries past a request's blocks and the padding rows' tables hold the null block 0, which no request owns.
All graphs share one memory pool: they replay one at a time, and each keeps its output tensor alive.
The eager forward is the twin (`enforce_eager=True`), compared token for token in tests/engine.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_CONTEXT_BUCKET = 1024


def batch_buckets(max_batch_size: int) -> list[int]:
    return [b for b in BATCH_BUCKETS if b < max_batch_size] + [max_batch_size]


def context_bucket(n: int, max_len: int) -> int:
    """The smallest power of two >= n (at least MIN_CONTEXT_BUCKET), capped at max_len."""
    bucket = MIN_CONTEXT_BUCKET
    while bucket < n:
        bucket *= 2
    return min(bucket, max_len)


def padded_tables(tables: list[list[int]], rows: int, width: int) -> torch.Tensor:
    """(rows, width) int32 host tensor: each request's blocks, then the null block 0 (also for padding rows)."""
    if any(len(t) > width for t in tables):
        raise ValueError(f"a block table is longer than the graphs' {width} columns (max_len / block_size)")
    out = torch.zeros(rows, width, dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out


class DecodeGraphs:
    """Captures and replays decode steps of `model` over `cache`. `pad_slot`: a cache slot no request
    owns, where padding rows write."""

    def __init__(self, model, cache, max_batch_size: int, max_len: int, pad_slot: int, max_blocks: int | None = None):
        self.model, self.cache, self.max_len, self.pad_slot = model, cache, max_len, pad_slot
        self.buckets = batch_buckets(max_batch_size)
        device = model.lm_head.weight.device
        n = self.buckets[-1]
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=device)       # (Bmax, 1)
        self.starts = torch.zeros(n, dtype=torch.long, device=device)          # (Bmax,)
        self.slots = torch.full((n,), pad_slot, dtype=torch.long, device=device)
        self.logits_at = torch.zeros(n, dtype=torch.long, device=device)       # decode: the one new token
        self.block_tables = (None if max_blocks is None else
                             torch.zeros(n, max_blocks, dtype=torch.int32, device=device))   # (Bmax, max_blocks)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.captures = 0

    def bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the largest graph bucket {self.buckets[-1]}")

    def run(self, tokens: list[int], starts: list[int], slots: list[int], pattern: str,
            tables: list[list[int]] | None = None) -> torch.Tensor:
        """One decode position for len(tokens) requests -> logits (B, V) fp32 (a view of a static buffer:
        read it before the next replay). `tables`: each request's blocks (paged cache)."""
        B = len(tokens)
        bb = self.bucket(B)
        kv_bound = context_bucket(max(starts) + 1, self.max_len)
        host = torch.tensor([tokens, starts, slots], dtype=torch.long)           # (3, B): one copy to the device
        dev = host.to(self.tokens.device, non_blocking=True)
        self.tokens[:B, 0].copy_(dev[0])
        self.starts[:B].copy_(dev[1])
        self.slots[:B].copy_(dev[2])
        if bb > B:   # padding rows: token 0 at position 0 of the scratch slot
            self.tokens[B:bb].zero_()
            self.starts[B:bb].zero_()
            self.slots[B:bb].fill_(self.pad_slot)
        if self.block_tables is not None:
            self.block_tables[:bb].copy_(padded_tables(tables, bb, self.block_tables.shape[1]), non_blocking=True)
        key = (bb, kv_bound, pattern)
        if key not in self.graphs:
            self.graphs[key] = self._capture(bb, kv_bound, pattern)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:B]

    def drop_patterns(self, keep: set[str]) -> None:
        """Free the graphs of patterns no request uses any more (after a pattern switch)."""
        for key in [k for k in self.graphs if k[2] not in keep]:
            del self.graphs[key]

    def _forward(self, bb: int, kv_bound: int, pattern: str) -> torch.Tensor:
        where = ({"slots": self.slots[:bb]} if self.block_tables is None
                 else {"block_tables": self.block_tables[:bb]})
        return self.model(self.tokens[:bb], start_pos=self.starts[:bb], cache=self.cache, pattern=pattern,
                          logits_at=self.logits_at[:bb], kv_bound=kv_bound, **where)

    @torch.no_grad()
    def _capture(self, bb: int, kv_bound: int, pattern: str):
        # Warm up on a side stream first (Triton autotuning and lazily built tables stay out of the graph).
        # The warm-up writes the real batch's rows at their current positions: the replay rewrites the same
        # values there, so nothing is corrupted.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(bb, kv_bound, pattern)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(bb, kv_bound, pattern)
        self.captures += 1
        log.info("captured a decode graph: batch %d, %d context rows, %d F layers", bb, kv_bound, pattern.count("F"))
        return graph, logits
