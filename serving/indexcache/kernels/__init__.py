"""DSA kernels behind one switch: Triton on CUDA, plain-PyTorch references elsewhere.

    from indexcache import kernels
    idx = kernels.indexer_topk(q, k, weights, topk, q_start, kv_len)   # (B, T, topk) int32
    out = kernels.sparse_attention_mla(q, kv, idx, scale, v_dim)
    y = kernels.fp8_block_linear(x, w8, w_scale_inv)                     # (..., N) bf16, FP8 checkpoints
    out = kernels.moe_routed(x, top_w, top_e, w_gate_up, w_down)         # (N, D) fp32 routed experts

The backend is chosen per call from the switch and the tensors' device:
  - INDEXCACHE_KERNELS=torch   always the references (kernels/reference.py);
  - INDEXCACHE_KERNELS=triton  always the Triton kernels (fails clearly if Triton is missing);
  - INDEXCACHE_KERNELS=auto    (default) Triton for CUDA tensors when Triton imports; on a CPU the
                               masked dense sparse attention (kernels/masked.py); else references;
  - INDEXCACHE_KERNELS=masked  the masked dense sparse attention on every device and the reference
                               indexer: exact and fastest for short contexts (<= 8K) such as SmolLM2's.
Routed experts (`moe_routed`) have no Triton-free reference fast enough for a model: the "torch" backend
runs `kernels.moe.moe_grouped` (plain PyTorch: sorted pairs, torch._grouped_mm); `ref_moe_routed`, one pair
at a time, is the twin the tests compare against.
`use_triton(True/False)` overrides the environment at run time; `use_triton(None)` returns to it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .masked import masked_sparse_attention_gqa, masked_sparse_attention_mla
from .reference import (
    FP8_BLOCK,
    FP8_E4M3_MAX,
    dequantize_act_fp8_blocks,
    dequantize_experts_fp8,
    dequantize_latent_fp8,
    dequantize_weight_fp8_blocks,
    quantize_experts_fp8,
    quantize_latent_fp8,
    quantize_weight_fp8_blocks,
    ref_fp8_block_linear,
    quantize_indexer_fp8 as ref_quantize_indexer_fp8,
    ref_indexer_scores,
    ref_indexer_topk,
    ref_quantize_act_fp8_blocks,
    ref_quantize_rows_fp8,
    ref_rms_norm,
    ref_rope,
    ref_sparse_attention_gqa,
    ref_sparse_attention_mla,
)

__all__ = [
    "use_triton", "backend", "triton_available",
    "indexer_topk", "indexer_scores", "sparse_attention_gqa", "sparse_attention_mla",
    "quantize_indexer_fp8", "quantize_latent_fp8", "dequantize_latent_fp8", "FP8_E4M3_MAX",
    "fp8_block_linear", "quantize_act_fp8_blocks", "dequantize_act_fp8_blocks", "quantize_weight_fp8_blocks",
    "dequantize_weight_fp8_blocks", "FP8_BLOCK", "moe_routed", "quantize_experts_fp8", "dequantize_experts_fp8",
    "rope", "rms_norm", "quantize_rows_fp8",
]

_MODES = ("torch", "triton", "auto", "masked")
_override: str | None = None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(enabled: bool | None) -> None:
    """Force the Triton kernels on (True) or off (False); None goes back to INDEXCACHE_KERNELS."""
    global _override
    _override = None if enabled is None else ("triton" if enabled else "torch")


def _mode() -> str:
    if _override is not None:
        return _override
    mode = os.environ.get("INDEXCACHE_KERNELS", "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"INDEXCACHE_KERNELS: unknown value {mode!r}; use one of {', '.join(_MODES)}")
    return mode


def backend(device: torch.device | str | None = None) -> str:
    """'triton' or 'torch': what a call on tensors of this device would run."""
    mode = _mode()
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("INDEXCACHE_KERNELS=triton but Triton is not installed; "
                               "install triton or set INDEXCACHE_KERNELS=torch")
        return "triton"
    if mode in ("torch", "masked"):
        return "torch"
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return "triton" if on_cuda and triton_available() else "torch"


def _fused(*tensors) -> bool:
    """The fused glue kernels (kernels/fused.py) run where the Triton backend does and no autograd graph is
    being recorded through them (training on the GPU keeps the differentiable twins).
    INDEXCACHE_FUSED=0 turns them off (the twins everywhere), for A/B measurements in one run."""
    if backend(tensors[0].device) != "triton" or os.environ.get("INDEXCACHE_FUSED", "1") == "0":
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def rope(x, cos, sin, interleaved: bool, offset: int = 0, rope_dim: int | None = None):
    """x (B, T, H, D) with dims [offset, offset + rope_dim) rotated by cos/sin (B, T, rope_dim/2) fp32;
    a new tensor in x's dtype. One Triton kernel on CUDA, `ref_rope` elsewhere."""
    if _fused(x):
        from .fused import rope as fast
        return fast(x, cos, sin, interleaved, offset, rope_dim)
    return ref_rope(x, cos, sin, interleaved, offset, rope_dim)


def rms_norm(x, weight, eps: float):
    """RMSNorm of the last dim, then times weight: one Triton kernel on CUDA, `ref_rms_norm` elsewhere."""
    if _fused(x, weight) and x.dtype == weight.dtype:
        from .fused import rms_norm as fast
        return fast(x, weight, eps)
    return ref_rms_norm(x, weight, eps)


def quantize_rows_fp8(x):
    """x (..., N) -> (e4m3 (..., N), fp32 scale (...)), one scale per row (amax / 448)."""
    if _fused(x):
        from .fused import quantize_rows_fp8 as fast
        return fast(x)
    return ref_quantize_rows_fp8(x)


def quantize_indexer_fp8(q, k, weights):
    """Scaled e4m3 copies of the indexer's q (one scale per token and head, folded into the head weights)
    and k (one scale per key): (q8, k8, weights * q_scale, k_scale); see `reference.quantize_indexer_fp8`."""
    if _fused(q, k, weights):
        q8, q_scale = quantize_rows_fp8(q)
        k8, k_scale = quantize_rows_fp8(k)
        return q8, k8, weights.float() * q_scale, k_scale
    return ref_quantize_indexer_fp8(q, k, weights)


def indexer_topk(q, k, weights, topk: int, q_start, kv_len, k_scale=None, k_slots=None, k_rows=None):
    """(B, T, topk) int32 indices of the top-k keys of the lightning indexer; -1 pads.
    k_slots (B,): k / k_scale hold every cache slot and query row b reads slot k_slots[b] (in place on
    the GPU; the reference gathers the rows first).
    k_rows (B, S): paged cache; k (n_rows, D) / k_scale (n_rows,) are the pool and key s of query row b is
    pool row k_rows[b, s] (read through the table on the GPU; the reference gathers first)."""
    if backend(q.device) == "triton":
        from .indexer import indexer_topk as fast
        return fast(q, k, weights, topk, q_start, kv_len, k_scale=k_scale, k_slots=k_slots, k_rows=k_rows)
    if k_rows is not None:
        k = k[k_rows]
        k_scale = None if k_scale is None else k_scale[k_rows]
    if k_slots is not None:
        k = k[k_slots]
        k_scale = None if k_scale is None else k_scale[k_slots]
    return ref_indexer_topk(q, k, weights, topk, q_start, kv_len, k_scale=k_scale)


def indexer_scores(q, k, weights, q_start, kv_len, k_scale=None):
    """(B, T, S) fp32 index scores, -inf where invalid (reference only: training and tests)."""
    return ref_indexer_scores(q, k, weights, q_start, kv_len, k_scale=k_scale)


def _cpu_fast_path(device) -> bool:
    """The masked dense path (kernels/masked.py) instead of the gathering reference: auto mode on a CPU,
    masked mode everywhere."""
    mode = _mode()
    return mode == "masked" or (mode == "auto" and torch.device(device).type == "cpu")


def sparse_attention_gqa(q, k, v, indices, scale: float):
    if backend(q.device) == "triton":
        from .sparse_attention import sparse_attention_gqa as fast
        return fast(q, k, v, indices, scale)
    if _cpu_fast_path(q.device):
        return masked_sparse_attention_gqa(q, k, v, indices, scale)
    return ref_sparse_attention_gqa(q, k, v, indices, scale)


def sparse_attention_mla(q, kv, indices, scale: float, v_dim: int):
    if backend(q.device) == "triton":
        from .sparse_attention import sparse_attention_mla as fast
        return fast(q, kv, indices, scale, v_dim)
    if _cpu_fast_path(q.device):
        return masked_sparse_attention_mla(q, kv, indices, scale, v_dim)
    return ref_sparse_attention_mla(q, kv, indices, scale, v_dim)


def quantize_act_fp8_blocks(x):
    """x (M, K) -> (x8 (M, K) e4m3, scale (M, ceil(K/128)) fp32): one scale per token per 128 of K."""
    if backend(x.device) == "triton":
        from .fp8_gemm import quantize_act_fp8_blocks as fast
        return fast(x)
    return ref_quantize_act_fp8_blocks(x)


def fp8_block_linear(x, w, w_scale_inv, out_dtype=torch.bfloat16):
    """y (..., N) = x (..., K) @ w_real^T for an FP8 checkpoint weight w (N, K) e4m3 with its
    weight_scale_inv (ceil(N/128), ceil(K/128)). On CUDA: torch._scaled_mm with block scales, or the
    Triton kernel where _scaled_mm refuses (kernels/fp8_gemm.py); elsewhere the fp32 reference."""
    if backend(x.device) == "triton":
        from .fp8_gemm import fp8_block_linear as fast
        return fast(x, w, w_scale_inv, out_dtype)
    return ref_fp8_block_linear(x, w, w_scale_inv, out_dtype)


def moe_routed(x, top_w, top_e, w_gate_up, w_down, *, gate_up_scale_inv=None, down_scale_inv=None):
    """Routed experts, (N, D) fp32: sum_j top_w[n, j] * expert top_e[n, j] (SwiGLU) of x[n]. x (N, D),
    w_gate_up (E, 2I, D), w_down (E, D, I), bf16/fp32 or e4m3 with their block scales (kernels/moe.py).
    Triton backend: the gather GEMVs for at most GATHER_MAX_PAIRS pairs, else the grouped path (for
    e4m3 experts the FP8 grouped GEMM of kernels/moe_fp8.py); torch backend: the grouped path
    (torch._grouped_mm on the CPU, e4m3 experts dequantised per call)."""
    from . import moe
    if backend(x.device) == "triton":
        path = moe.resolved_moe_path("auto", x.device, top_e.numel())
        # FP8 experts: the gather kernels for one decode token (they need moe_inter_dim a multiple of 128,
        # as every real checkpoint has), else the grouped GEMM that reads e4m3 tiles (kernels/moe_fp8.py)
        if gate_up_scale_inv is not None and (path == "grouped" or w_down.shape[2] % FP8_BLOCK):
            from .moe_fp8 import moe_fp8_grouped
            return moe_fp8_grouped(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv)
        return moe.moe_routed(x, top_w, top_e, w_gate_up, w_down, path,
                              gate_up_scale_inv=gate_up_scale_inv, down_scale_inv=down_scale_inv)
    return moe.moe_grouped(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv)
