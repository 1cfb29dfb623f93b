"""The paged KV cache on the device: every layer's cache is one pool of `n_blocks` blocks of `block_size`
rows, read and written through per-request block tables (engine/block_pool.py keeps the books).

    GQA:      k, v          (n_blocks, block_size, Hkv, Dh)   every layer
    MLA:      kv            (n_blocks, block_size, kv_lora_rank + rope_dim)   every layer
    indexer:  indexer_k     (n_blocks, block_size, index_head_dim)   F layers only (IndexCache: S layers
              indexer_k_scale (n_blocks, block_size) with FP8 keys       run no indexer and own none)

How the model uses it (dsa.py, `block_tables=` on forward): the context turns the (B, max_blocks)
tables into `rows` (B, kv_bound), the physical pool row of each logical position; new keys scatter to
`rows[b, position]`; the reference path gathers each request's prefix through `rows` (same tensors as the
contiguous cache hands it); the in-place GPU path keeps the pool flat and maps the top-k logical indices
to physical rows (`map_indices`, SGLang's `topk_transform`) so the sparse-attention kernels are unchanged.
The indexer's keys are gathered through `rows` (no block-table path in the Triton indexer yet).
"""
from __future__ import annotations

import torch

from .config import ModelArgs
from .kv_cache import KVCache


class PagedKVCache(KVCache):
    """KVCache's tensors with (n_blocks, block_size) rows instead of (n_slots, max_len): a pool that the
    engine's block tables address (pattern switches and byte counts as in KVCache)."""
    paged = True

    def __init__(self, args: ModelArgs, n_blocks: int, block_size: int, pattern: str,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 indexer_fp8: bool = False):
        self.n_blocks, self.block_size = n_blocks, block_size
        self._allocate(args, (n_blocks, block_size), pattern, dtype, device, indexer_fp8)


def kv_bytes_per_token(args: ModelArgs, pattern: str, dtype: torch.dtype, indexer_fp8: bool) -> int:
    """Cache bytes one token costs under `pattern`: its latent (or k and v) in every layer, and its indexer
    key (plus an fp32 scale when FP8) in the F layers only."""
    elem = torch.empty((), dtype=dtype).element_size()
    if args.attention == "gqa":
        per_layer = 2 * args.n_kv_heads * args.head_dim * elem
    else:
        per_layer = (args.kv_lora_rank + args.qk_rope_head_dim) * elem
    index = args.index_head_dim * (1 if indexer_fp8 else elem) + (4 if indexer_fp8 else 0)
    return args.n_layers * per_layer + pattern.count("F") * index


def logical_rows(block_tables: torch.Tensor, block_size: int, kv_bound: int) -> torch.Tensor:
    """block_tables (B, max_blocks) -> rows (B, kv_bound) int64: the pool row of logical positions
    0..kv_bound-1 of each request (positions past its blocks map into whatever block id the table holds
    there, the null block for unused entries; they are never visible to a query)."""
    pos = torch.arange(kv_bound, device=block_tables.device)                         # (S,)
    blocks = block_tables.to(torch.int64)[:, pos // block_size]                       # (B, S)
    return blocks * block_size + pos % block_size


def write_rows(cache_tensor: torch.Tensor, new: torch.Tensor, rows: torch.Tensor) -> None:
    """Scatter new (B, T, ...) into the pool (n_blocks, block_size, ...) at physical rows (B, T)."""
    cache_tensor.flatten(0, 1)[rows] = new.to(cache_tensor.dtype)


def gather_rows(cache_tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The requests' prefixes (B, S, ...) gathered from the pool at physical rows (B, S)."""
    return cache_tensor.flatten(0, 1)[rows]


def map_indices(indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Top-k logical indices (B, T, K) (-1 = no key) -> physical pool rows (B, T, K) int64 (-1 kept)."""
    B, T, K = indices.shape
    logical = indices.clamp(min=0).to(torch.int64).reshape(B, T * K)
    physical = rows.gather(1, logical).view(B, T, K)
    return torch.where(indices >= 0, physical, -1)
