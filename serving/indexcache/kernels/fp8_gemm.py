"""Block-scaled FP8 linear for DeepSeek-V3 / V3.2 / GLM-5 FP8 checkpoints, on the GPU.

    x8, x_scale = quantize_act_fp8_blocks(x)        x (M, K) -> e4m3 (M, K), fp32 (M, ceil(K/128))
    y[m, n] = sum_kb x_scale[m, kb] * w_scale_inv[n // 128, kb] * sum_{k in block kb} x8[m, k] * w8[n, k]

Activations get one scale per token per 128-wide block of K (amax / 448), weights one per 128 x 128 block
(the checkpoint's `weight_scale_inv`). Each K block's product is exact in e4m3 x e4m3 -> fp32 and is
scaled into an fp32 accumulator, so precision is promoted every 128 elements of K (Hopper's FP8 tensor
cores keep fewer mantissa bits inside one block: ~1e-4 relative).

`fp8_block_linear` runs one of two GEMMs on the quantised operands:
  - "scaled_mm": torch._scaled_mm with the 1x128 / 128x128 block scales (seen on the H200's torch 2.11):
    a = x8 (M, K), scale_a (M, K/128) stored outer-dim-major, b = w8.t(), scale_b = w_scale_inv.t()
    (K/128, N/128) with stride (1, K/128). 1,251 TFLOP/s at M=4096, K=7168, N=2048 on the H200.
  - "triton": `_fp8_block_gemm_kernel` below, where _scaled_mm refuses a shape, a layout or this torch.
`select_fp8_gemm` picks _scaled_mm and remembers, per (device, N, K, out dtype), when it refused (logged once).

K or N not a multiple of 128 is handled by both: the ragged last block has its own scale (the checkpoint
stores ceil(N/128) x ceil(K/128) scales) and the Triton kernel masks it. M = 1 (decode) and leading batch
dims work; M = 0 gives an empty result.

What to time (the lead's GPU bench), per shape (M in 1, 16, 4096; K 7168; N 2048, 2112, 576):
    x8, xs = quantize_act_fp8_blocks(x)                                     # the quantisation alone
    scaled_mm_block_gemm(x8, xs, w8, s, torch.bfloat16)                     # _scaled_mm alone
    fp8_block_gemm(x8, xs, w8, s, torch.bfloat16)                           # Triton alone
    fp8_block_linear(x, w8, s, impl="scaled_mm") / impl="triton"            # end to end
against a bf16 `x @ w.t()` of the same shape; FLOPs = 2 M N K.

The twins are `reference.ref_quantize_act_fp8_blocks` and `reference.ref_fp8_block_linear`.
Under TRITON_INTERPRET=1 both kernels run on CPU tensors (the interpreter multiplies e4m3 exactly).
"""
from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from .reference import (  # noqa: F401 (the twins)
    FP8_BLOCK,
    FP8_E4M3_MAX,
    check_fp8_linear_inputs,
    ref_fp8_block_linear,
    ref_quantize_act_fp8_blocks,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FP8_GEMM_IMPLS = ("auto", "scaled_mm", "triton")
log = logging.getLogger(__name__)


@triton.jit
def _round_to_e4m3_grid(q):
    """fp32 in [-448, 448] -> the nearest e4m3 value (ties to even), still fp32. The cast to e4m3 is then
    exact: Triton's interpreter mis-rounds values that carry into the next power of two (127.9 -> 64)."""
    bits = q.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    ulp_exp = tl.maximum(exponent, -6) - 3                  # 3 mantissa bits; subnormals below 2^-6
    ulp = ((ulp_exp + 127) << 23).to(tl.float32, bitcast=True)
    r = q / ulp                                             # exact (power of two), |r| < 16
    r = (r + 12582912.0) - 12582912.0                       # round to nearest even (1.5 * 2^23 trick)
    return r * ulp


@triton.jit
def _quantize_act_kernel(x_ptr, q_ptr, s_ptr, K, sx_m, sq_m, ss_m, ss_k,
                         BLOCKS: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr):
    """BLOCKS groups of GROUP (=128) elements of one row per program: scale = amax / 448, q = x / scale."""
    m = tl.program_id(0).to(tl.int64)
    offs_b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)          # K-block index
    cols = offs_b[:, None] * GROUP + tl.arange(0, GROUP)[None, :]       # (BLOCKS, GROUP)
    ok = cols < K
    x = tl.load(x_ptr + m * sx_m + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / FP8_MAX     # (BLOCKS,)
    q = tl.minimum(tl.maximum(x / scale[:, None], -FP8_MAX), FP8_MAX)
    q = _round_to_e4m3_grid(q)
    tl.store(q_ptr + m * sq_m + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + m * ss_m + offs_b * ss_k, scale, mask=offs_b * GROUP < K)


@triton.jit
def _fp8_block_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                           sa_m, sas_m, sas_k, sb_n, sbs_n, sbs_k, sc_m,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    """c (M, N) = a (M, K) e4m3 . b (N, K) e4m3 ^T with per-(row, K block) scales of a and per-(128 x 128)
    scales of b, applied to each K block's fp32 product. BLOCK_K is the 128 of the scale blocks."""
    pid = tl.program_id(0)
    # grouped launch order: GROUP_M row tiles share each weight tile while it is in L2
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * sa_m + offs_k[None, :]           # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_n[None, :] * sb_n + offs_k[:, None]           # (BLOCK_K, BLOCK_N): w^T, K-major
    as_ptrs = as_ptr + offs_m * sas_m                                   # (BLOCK_M,)
    bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * sbs_n                      # (BLOCK_N,) scale row of each column
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        sa = tl.load(as_ptrs + kb * sas_k, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptrs + kb * sbs_k, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None] * sc_m + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check_device(*tensors) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET:
            raise ValueError(f"the FP8 GEMM kernels need CUDA tensors, got {t.device}; "
                             "use ref_fp8_block_linear (INDEXCACHE_KERNELS=torch) on the CPU")


def quantize_act_fp8_blocks(x: torch.Tensor, blocks_per_program: int = 8):
    """Triton twin of `ref_quantize_act_fp8_blocks`: x (M, K) -> (x8 (M, K) e4m3, scale (M, ceil(K/128))
    fp32). The scale comes out outer-dim-major (stride (1, M)), the layout _scaled_mm takes as scale_a."""
    if x.dim() != 2:
        raise ValueError(f"x: expected (M, K), got shape {tuple(x.shape)}; flatten the leading dims first")
    _check_device(x)
    M, K = x.shape
    kb = triton.cdiv(K, FP8_BLOCK)
    x = x.contiguous()
    x8 = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(kb, M, dtype=torch.float32, device=x.device).t()          # (M, kb), stride (1, M)
    if M:
        _quantize_act_kernel[(M, triton.cdiv(kb, blocks_per_program))](
            x, x8, scale, K, x.stride(0), x8.stride(0), scale.stride(0), scale.stride(1),
            BLOCKS=blocks_per_program, GROUP=FP8_BLOCK, FP8_MAX=FP8_E4M3_MAX)
    return x8, scale


def fp8_block_gemm(x8, x_scale, w, w_scale_inv, out_dtype=torch.bfloat16, block_m: int | None = None,
                   block_n: int | None = None, group_m: int = 8, num_warps: int | None = None,
                   num_stages: int = 3) -> torch.Tensor:
    """The Triton GEMM on quantised operands: x8 (M, K) e4m3, x_scale (M, ceil(K/128)) fp32 (any strides),
    w (N, K) e4m3, w_scale_inv (ceil(N/128), ceil(K/128)) fp32 -> (M, N) out_dtype."""
    _check_device(x8, x_scale, w, w_scale_inv)
    M, K = x8.shape
    N = w.shape[0]
    x8, w = x8.contiguous(), w.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=x8.device)
    if M == 0:
        return out
    small = M <= 16                          # decode: thin row tiles, more column tiles in flight
    bm = block_m or (16 if small else 128)
    bn = block_n or (64 if small else 128)
    warps = num_warps or (4 if small else 8)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fp8_block_gemm_kernel[grid](
        x8, x_scale, w, w_scale_inv, out, M, N, K,
        x8.stride(0), x_scale.stride(0), x_scale.stride(1), w.stride(0), w_scale_inv.stride(0),
        w_scale_inv.stride(1), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=FP8_BLOCK, GROUP_M=group_m, num_warps=warps, num_stages=num_stages)
    return out


def scaled_mm_block_gemm(x8, x_scale, w, w_scale_inv, out_dtype=torch.bfloat16) -> torch.Tensor:
    """torch._scaled_mm with 1x128 activation and 128x128 weight scales (raises where this torch or
    device refuses). x_scale must be outer-dim-major, as `quantize_act_fp8_blocks` returns it."""
    return torch._scaled_mm(x8, w.t(), scale_a=x_scale, scale_b=w_scale_inv.contiguous().t(), out_dtype=out_dtype)


# (device, N, K, out_dtype) -> "scaled_mm" or "triton": what ran last for this weight shape
_chosen: dict[tuple, str] = {}


def _key(device: torch.device, N: int, K: int, out_dtype) -> tuple:
    return (device.type, device.index, N, K, out_dtype)


def select_fp8_gemm(device, N: int, K: int, out_dtype=torch.bfloat16) -> str:
    """"scaled_mm" unless torch._scaled_mm already refused this (device, N, K, out dtype), else "triton".
    Only CUDA devices try _scaled_mm (the interpreter runs Triton)."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return "triton"
    return _chosen.get(_key(device, N, K, out_dtype), "scaled_mm")


def _refused(device, N: int, K: int, out_dtype, error: Exception) -> None:
    key = _key(torch.device(device), N, K, out_dtype)
    if key not in _chosen:
        log.warning("torch._scaled_mm refused the block-scaled FP8 GEMM for N=%d K=%d out=%s on %s (%s); "
                    "using the Triton kernel for this shape", N, K, out_dtype, device, str(error).splitlines()[0])
    _chosen[key] = "triton"


def fp8_block_linear(x, w, w_scale_inv, out_dtype=torch.bfloat16, impl: str = "auto") -> torch.Tensor:
    """y = x @ w_real^T for a block-scaled FP8 weight: x (..., K) bf16/fp32, w (N, K) e4m3, w_scale_inv
    (ceil(N/128), ceil(K/128)) fp32 -> (..., N) out_dtype. x is quantised per 1x128 block first.
    impl: "auto" (select_fp8_gemm), "scaled_mm" (fails if _scaled_mm refuses) or "triton"."""
    if impl not in FP8_GEMM_IMPLS:
        raise ValueError(f"impl={impl!r}: use one of {', '.join(FP8_GEMM_IMPLS)}")
    check_fp8_linear_inputs(x, w, w_scale_inv)
    N, K = w.shape
    lead = x.shape[:-1]
    x8, x_scale = quantize_act_fp8_blocks(x.reshape(-1, K))                         # (M, K), (M, K/128)
    choice = select_fp8_gemm(x.device, N, K, out_dtype) if impl == "auto" else impl
    y = None
    if choice == "scaled_mm" and x8.shape[0]:
        try:
            y = scaled_mm_block_gemm(x8, x_scale, w, w_scale_inv, out_dtype)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            if impl == "scaled_mm":
                raise
            _refused(x.device, N, K, out_dtype, e)
        else:
            _chosen.setdefault(_key(x.device, N, K, out_dtype), "scaled_mm")
    if y is None:
        y = fp8_block_gemm(x8, x_scale, w, w_scale_inv, out_dtype)
    return y.view(*lead, N)
