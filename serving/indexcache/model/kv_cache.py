"""The KV cache the model reads and writes: per layer, the MLA latent (or GQA k and v) of every position, and
the lightning indexer's keys for the F layers only (an S layer runs no indexer and owns none).

Two layouts share one class: `KVCache`, rows for `n_slots` sequences of up to `max_len` tokens each (slot,
position), and `model.paged.PagedKVCache`, a pool of `n_blocks` blocks of `block_size` rows read through
block tables. Every tensor is (outer, inner, ...) with (outer, inner) = (n_slots, max_len) or
(n_blocks, block_size):

    GQA:      k, v               (outer, inner, Hkv, Dh)                          every layer
    MLA:      kv                 (outer, inner, kv_lora_rank + rope_dim)          every layer
    indexer:  indexer_k          (outer, inner, index_head_dim)                   F layers only
              indexer_k_scale    (outer, inner) fp32, with FP8 (e4m3) indexer keys
"""
from __future__ import annotations

import torch

from .config import ModelArgs


class KVCache:
    """Preallocated per-layer caches for `n_slots` sequences of up to `max_len` tokens.

    GQA: k, v (slots, S, Hkv, Dh). MLA: kv (slots, S, kv_lora_rank + rope_dim), the normalised latent then
    the RoPE key. Indexer K (slots, S, index_head_dim) exists only for F layers: an S layer runs no indexer
    and needs none. A pattern switch that turns a layer F allocates its indexer cache then.
    `indexer_fp8`: indexer keys stored as e4m3 with one fp32 scale per key (`indexer_k_scale`), what the
    FP8 lightning indexer reads (DeepSeek-V3.2 runs its indexer in FP8); half the bytes of bf16 keys.
    """
    paged = False

    def __init__(self, args: ModelArgs, n_slots: int, max_len: int, pattern: str,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 indexer_fp8: bool = False):
        self.n_slots, self.max_len = n_slots, max_len
        self._allocate(args, (n_slots, max_len), pattern, dtype, device, indexer_fp8)

    def _allocate(self, args: ModelArgs, rows: tuple[int, int], pattern: str, dtype: torch.dtype,
                  device: torch.device | str, indexer_fp8: bool) -> None:
        """Every layer's latent (or k, v) as (outer, inner, ...) = `rows`, then the F layers' indexer keys."""
        self.args, self.dtype, self.device, self.indexer_fp8 = args, dtype, device, indexer_fp8
        self._rows = rows
        self.layers: list[dict[str, torch.Tensor]] = []
        for _ in range(args.n_layers):
            if args.attention == "gqa":
                shape = (*rows, args.n_kv_heads, args.head_dim)
                self.layers.append({"k": torch.zeros(shape, dtype=dtype, device=device),
                                    "v": torch.zeros(shape, dtype=dtype, device=device)})
            else:
                shape = (*rows, args.kv_lora_rank + args.qk_rope_head_dim)
                self.layers.append({"kv": torch.zeros(shape, dtype=dtype, device=device)})
        self.indexer_k: dict[int, torch.Tensor] = {}
        self.indexer_k_scale: dict[int, torch.Tensor] = {}
        self.ensure_pattern(pattern)

    def ensure_pattern(self, pattern: str) -> None:
        """Indexer keys for every F layer of `pattern` (allocated on a switch that turns a layer F)."""
        for layer, kind in enumerate(pattern):
            if kind == "F" and layer not in self.indexer_k:
                k_dtype = torch.float8_e4m3fn if self.indexer_fp8 else self.dtype
                self.indexer_k[layer] = torch.zeros(*self._rows, self.args.index_head_dim,
                                                    dtype=k_dtype, device=self.device)
                if self.indexer_fp8:
                    self.indexer_k_scale[layer] = torch.ones(*self._rows, device=self.device)

    def release_indexer_layers(self, patterns: set[str]) -> list[int]:
        """Free the indexer keys of layers that are F in none of `patterns` (after a pattern switch once no
        request runs the old pattern). Returns the layers freed."""
        keep = {layer for p in patterns for layer, kind in enumerate(p) if kind == "F"}
        gone = [layer for layer in self.indexer_k if layer not in keep]
        for layer in gone:
            del self.indexer_k[layer]
            self.indexer_k_scale.pop(layer, None)
        return gone

    def nbytes(self) -> int:
        tensors = ([t for layer in self.layers for t in layer.values()] + list(self.indexer_k.values())
                   + list(self.indexer_k_scale.values()))
        return sum(t.numel() * t.element_size() for t in tensors)
