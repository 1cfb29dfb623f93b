"""CPU fast path for sparse attention: a boolean mask built from the top-k indices, then one dense,
BLAS-friendly attention over the visible cache.

The references (reference.py) gather every selected key per query: obviously right, but on a CPU the
gathers dominate (copies of (T, K, H, D) per layer). For the context lengths a CPU serves (<= 8K), masking
the dense T x S score matrix costs more FLOPs and far less time. Same contract and results as the
references (tests/kernels/test_masked.py compares them on fresh random inputs, fp32, atol 1e-5):
attention over exactly the selected keys, -1 = no key, a row with no key returns zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import check_sparse_inputs


def selection_mask(indices: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(B, T, K) int indices, -1 = none -> (B, T, S) bool, True where the key is selected."""
    B, T, _ = indices.shape
    idx = indices.long()
    idx = torch.where(idx >= 0, idx, n_keys)                             # -1 -> a spare column
    mask = torch.zeros(B, T, n_keys + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(2, idx, True)
    return mask[..., :n_keys]


def masked_sparse_attention_gqa(q, k, v, indices, scale: float) -> torch.Tensor:
    """q (B, T, Hq, D); k, v (B, S, Hkv, D); indices (B, T, K) -> (B, T, Hq, D) in q's dtype."""
    check_sparse_inputs(q, indices, k.shape[0], "k")
    B, T, Hq, _ = q.shape
    group = Hq // k.shape[2]
    mask = selection_mask(indices, k.shape[1])                           # (B, T, S)
    kh = k.float().repeat_interleave(group, dim=2).transpose(1, 2)      # (B, Hq, S, D)
    vh = v.float().repeat_interleave(group, dim=2).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), kh, vh, attn_mask=mask[:, None],
                                         scale=scale)                    # (B, Hq, T, D)
    out = out.transpose(1, 2).nan_to_num(0.0)                            # rows with no key -> 0
    return torch.where(mask.any(-1)[..., None, None], out, 0.0).to(q.dtype)


def masked_sparse_attention_mla(q, kv, indices, scale: float, v_dim: int) -> torch.Tensor:
    """Absorbed MLA: q (B, T, H, Dc+Dr), kv (B, S, Dc+Dr) -> (B, T, H, v_dim) in q's dtype."""
    check_sparse_inputs(q, indices, kv.shape[0], "kv")
    mask = selection_mask(indices, kv.shape[1])                          # (B, T, S)
    kvf = kv.float()
    logits = torch.einsum("bthd,bsd->bhts", q.float(), kvf) * scale      # (B, H, T, S)
    probs = logits.masked_fill(~mask[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    out = torch.einsum("bhts,bsc->bthc", probs, kvf[..., :v_dim])        # (B, T, H, v_dim)
    return out.to(q.dtype)
