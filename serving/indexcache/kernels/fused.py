"""Small fused Triton kernels for the per-token glue of a layer: RoPE, RMSNorm, per-row FP8 quantisation.

In a decode step each of these is a chain of 4 to 12 tiny PyTorch kernels (casts, slices, multiplies, a
stack, a cat), and at batch 1 a layer's glue costs more than its GEMMs: on the 30B shape at 200K context
(commit 774d58c) elementwise kernels and copies were 9.0 of the 19.6 ms of device time per token, about 85
kernels per layer. Each kernel here does one chain in one pass over its rows:

    rope(x, cos, sin, interleaved, offset, rope_dim)   # dims [offset, offset + rope_dim) rotated, rest copied
    rms_norm(x, weight, eps)                           # x * rsqrt(mean(x^2) + eps), then * weight
    quantize_rows_fp8(x)                               # e4m3 rows and one fp32 scale per row (amax / 448)

The twins they are tested against (tests/kernels/test_fused.py) are `reference.ref_rope`,
`reference.ref_rms_norm` and `reference.ref_quantize_rows_fp8`, the readable PyTorch the model runs on the
CPU. Rounding is the twins': fp32 math, one rounding to the output dtype (RMSNorm rounds the normalised
row before the weight multiply, as the twin does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import FP8_E4M3_MAX


@triton.jit
def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, H, D,
                 sx_b, sx_t, sx_h, sx_d, so_b, so_t, so_h, sc_b, sc_t,
                 T, OFFSET, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0)                      # one (b, t) per program, BLOCK_H heads at a time
    hb = tl.program_id(1)
    b = tok // T
    t = tok % T
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)                               # (BLOCK_H,)
    dims = tl.arange(0, BLOCK_D)                                               # (BLOCK_D,)
    hmask = heads < H
    dmask = dims < D
    mask = hmask[:, None] & dmask[None, :]
    base = x_ptr + b * sx_b + t * sx_t + heads[:, None] * sx_h
    x = tl.load(base + dims[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    r = dims - OFFSET                                                          # position inside the rope part
    in_rope = (r >= 0) & (r < ROPE)
    if INTERLEAVED:                             # pairs (2i, 2i+1) rotate by angle i
        freq = r // 2
        partner = r ^ 1
        sign = tl.where(r % 2 == 0, -1.0, 1.0)
    else:                                       # rotate-half: (i, i + ROPE/2) rotate by angle i
        freq = r % (ROPE // 2)
        partner = tl.where(r < ROPE // 2, r + ROPE // 2, r - ROPE // 2)
        sign = tl.where(r < ROPE // 2, -1.0, 1.0)
    freq = tl.where(in_rope, freq, 0)
    partner = tl.where(in_rope, partner, 0)
    rmask = mask & in_rope[None, :]
    xp = tl.load(base + (OFFSET + partner)[None, :] * sx_d, mask=rmask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + b * sc_b + t * sc_t + freq, mask=dmask & in_rope, other=1.0)   # (BLOCK_D,)
    s = tl.load(sin_ptr + b * sc_b + t * sc_t + freq, mask=dmask & in_rope, other=0.0)
    rotated = x * c[None, :] + sign[None, :] * xp * s[None, :]
    out = tl.where(in_rope[None, :], rotated, x)
    tl.store(out_ptr + b * so_b + t * so_t + heads[:, None] * so_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, offset: int = 0,
         rope_dim: int | None = None) -> torch.Tensor:
    """x (B, T, H, D) any strides -> a new contiguous (B, T, H, D) in x's dtype with dims
    [offset, offset + rope_dim) rotated by the fp32 angles' cos/sin (B, T, rope_dim/2), the others copied."""
    B, T, H, D = x.shape
    rope_dim = D - offset if rope_dim is None else rope_dim
    if rope_dim % 2 or offset < 0 or offset + rope_dim > D or cos.shape[-1] * 2 != rope_dim:
        raise ValueError(f"rope: rope_dim {rope_dim} at offset {offset} must be even, inside D={D}, "
                         f"and match cos/sin's last dim ({cos.shape[-1]} = rope_dim/2)")
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    cos, sin = cos.expand(B, T, -1).float(), sin.expand(B, T, -1).float()
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_H = max(1, min(triton.next_power_of_2(H), 4096 // BLOCK_D))
    grid = (B * T, triton.cdiv(H, BLOCK_H))
    _rope_kernel[grid](x, out, cos, sin, H, D, *x.stride(), *out.stride()[:3], cos.stride(0), cos.stride(1),
                       T, offset, ROPE=rope_dim, INTERLEAVED=interleaved, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D)
    return out


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, sx_row, so_row, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * sx_row + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)   # the twin rounds here, then weights
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so_row + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N) -> (..., N) in the dtype of x * weight: one program per row."""
    N = x.shape[-1]
    rows = x.reshape(-1, N)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, N, rows.stride(0), out.stride(0), eps,
                                           BLOCK=triton.next_power_of_2(N))
    return out.view(x.shape)


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, N, sx_row, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * sx_row + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), FP8_MAX)   # IEEE division, as torch
    tl.store(out_ptr + row * N + cols, tl.math.div_rn(x, scale).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., N) -> (x8 (..., N) e4m3, scale (...) fp32) with scale = max(amax(|row|), 1e-12) / 448."""
    N = x.shape[-1]
    rows = x.reshape(-1, N)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        _quantize_rows_kernel[(rows.shape[0],)](rows, out, scale, N, rows.stride(0), FP8_MAX=FP8_E4M3_MAX,
                                                BLOCK=triton.next_power_of_2(N))
    return out.view(x.shape), scale.view(x.shape[:-1])
