"""Sparse attention over the indexer's selected keys, in Triton (GQA and absorbed MLA).

    out[b,t,h] = softmax_j(scale * q[b,t,h] . key[b, idx_j]) @ value[b, idx_j],  idx = indices[b,t] >= 0

Each program owns one query token and a block of heads that read the same KV rows (a GQA group, or
all MLA heads, which share the one latent head), gathers BLOCK_K selected rows at a time straight
from the cache (no gathered copy in memory), and runs an online softmax (running max m, running sum
l) with fp32 accumulators. A query with no valid index writes zeros. The heads form the M side of the
tensor-core products, padded to 16. bf16 operands are exact with fp32 accumulation; fp32 operands
multiply in fp32 (input_precision "ieee", not TF32). Prefill: one program per (query, head block). Decode (too few queries to fill the
GPU): the selected keys are split across programs and the partial softmaxes merged (split-K).
The MLA kernel also reads an FP8 latent cache (e4m3 rows with one fp32 scale per key, RoPE key in
bf16): 644 bytes gathered per selected key instead of 1152.

References: `reference.ref_sparse_attention_gqa` / `ref_sparse_attention_mla` / `ref_sparse_attention_mla_fp8`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .indexer import _check_device
from .reference import (  # noqa: F401 (the twins these kernels are tested against)
    _fail,
    check_mla_fp8_inputs,
    check_sparse_inputs,
    quantize_latent_fp8,
    ref_sparse_attention_gqa,
    ref_sparse_attention_mla,
    ref_sparse_attention_mla_fp8,
)


# Prefill layout of the bf16-cache MLA kernel: "heads_m" or "keys_m" (see sparse_attention_mla), and each
# layout's tiles when the caller names none.
MLA_PREFILL_LAYOUT = os.environ.get("INDEXCACHE_MLA_PREFILL", "heads_m")
MLA_PREFILL_TILES = {"heads_m": dict(block_k=32, num_warps=4, num_stages=2),
                     "keys_m": dict(block_k=64, num_warps=8, num_stages=2)}


def _precision(q: torch.Tensor) -> str:
    """fp32 operands multiply in fp32 ("ieee"): a model run in float32 on request gets float32 attention,
    not TF32's 10-bit mantissa (which moved a tiny fp32 model's logits by ~5 % on the H200). bf16 and FP8
    operands are exact on the tensor cores either way."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _sparse_attention_gqa_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, scale, K_sel, S,
    sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, si_b, si_t, so_b, so_t, so_h,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, DH: tl.constexpr, DH_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr = "tf32",
):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    kvh = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, DH_PAD)
    g_ok = offs_g < GROUP
    d_ok = offs_d < DH
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * sq_b + t * sq_t + heads[:, None] * sq_h + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)               # (G_PAD, DH_PAD)
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, DH_PAD), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, K_sel, BLOCK_K):
        j = start + offs_k
        idx = tl.load(idx_ptr + b * si_b + t * si_t + j, mask=j < K_sel, other=-1)
        ok = (idx >= 0) & (idx < S)
        row = tl.where(ok, idx, 0).to(tl.int64)
        kt = tl.load(k_ptr + b * sk_b + row[None, :] * sk_s + kvh * sk_h + offs_d[:, None],
                     mask=ok[None, :] & d_ok[:, None], other=0.0)            # (DH_PAD, BLOCK_K)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale                                            # (G_PAD, BLOCK_K)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                # no key seen yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * sv_b + row[:, None] * sv_s + kvh * sv_h + offs_d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0)             # (BLOCK_K, DH_PAD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + b * so_b + t * so_t + heads[:, None] * so_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _sparse_attention_mla_kernel(
    q_ptr, lat_ptr, rope_ptr, lsc_ptr, idx_ptr, out_ptr, part_acc_ptr, part_ml_ptr, scale, K_sel, S, H, T,
    k_per_split, sq_b, sq_t, sq_h, sl_b, sl_s, sr_b, sr_s, ssc_b, si_b, si_t, so_b, so_t, so_h,
    DC: tl.constexpr, DC_PAD: tl.constexpr, DR: tl.constexpr, DR_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, N_SPLIT: tl.constexpr, FP8_KV: tl.constexpr,
    PRECISION: tl.constexpr = "tf32",
):
    """q = [q_latent (DC) | q_rope (DR)], key = [latent (DC) | k_rope (DR)], value = latent.
    bf16 cache: lat_ptr and rope_ptr point into one (B, S, DC + DR) row. FP8_KV: latent rows are e4m3
    with one fp32 scale per key (lsc_ptr), converted exactly to q's dtype; the scale multiplies the
    latent part of each score and each p before the PV product (it factors out of both dots).
    With N_SPLIT > 1 (decode: too few queries to fill the GPU) each program takes one slice of
    the selected keys and writes its unnormalised (acc, m, l) for `_combine_splits`."""
    pid0 = tl.program_id(0)
    t = (pid0 // N_SPLIT).to(tl.int64)
    split = pid0 % N_SPLIT
    b = tl.program_id(1).to(tl.int64)
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    offs_c = tl.arange(0, DC_PAD)
    offs_r = tl.arange(0, DR_PAD)
    c_ok = offs_c < DC
    r_ok = offs_r < DR
    q_row = q_ptr + b * sq_b + t * sq_t + heads[:, None] * sq_h
    qc = tl.load(q_row + offs_c[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)   # (BLOCK_H, DC_PAD)
    qr = tl.load(q_row + DC + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, DC_PAD), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(K_sel, k_lo + k_per_split)
    for start in range(k_lo, k_hi, BLOCK_K):
        j = start + offs_k
        idx = tl.load(idx_ptr + b * si_b + t * si_t + j, mask=j < k_hi, other=-1)
        ok = (idx >= 0) & (idx < S)
        row = tl.where(ok, idx, 0).to(tl.int64)                              # (BLOCK_K,)
        latent = tl.load(lat_ptr + b * sl_b + row[:, None] * sl_s + offs_c[None, :],
                         mask=ok[:, None] & c_ok[None, :], other=0.0)        # (BLOCK_K, DC_PAD)
        rope = tl.load(rope_ptr + b * sr_b + row[:, None] * sr_s + offs_r[None, :],
                       mask=ok[:, None] & r_ok[None, :], other=0.0)          # (BLOCK_K, DR_PAD)
        if FP8_KV:
            latent = latent.to(qc.dtype)                                     # e4m3 -> bf16: exact
            ksc = tl.load(lsc_ptr + b * ssc_b + row, mask=ok, other=0.0)     # (BLOCK_K,) fp32
            s = (tl.dot(qc, tl.trans(latent), input_precision=PRECISION) * ksc[None, :]
                 + tl.dot(qr, tl.trans(rope), input_precision=PRECISION))
        else:
            s = (tl.dot(qc, tl.trans(latent), input_precision=PRECISION)
                 + tl.dot(qr, tl.trans(rope), input_precision=PRECISION))    # (BLOCK_H, BLOCK_K)
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        if FP8_KV:
            pv = (p * ksc[None, :]).to(latent.dtype)                         # the value's scale, per key
        else:
            pv = p.to(latent.dtype)
        acc = acc * alpha[:, None] + tl.dot(pv, latent, input_precision=PRECISION)
        m = m_new
    if N_SPLIT > 1:
        part = ((b * T + t) * N_SPLIT + split) * H + heads                   # (BLOCK_H,)
        tl.store(part_acc_ptr + part[:, None] * DC + offs_c[None, :], acc, mask=h_ok[:, None] & c_ok[None, :])
        tl.store(part_ml_ptr + part * 2, m, mask=h_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l, mask=h_ok)
    else:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + b * so_b + t * so_t + heads[:, None] * so_h + offs_c[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])


@triton.jit
def _sparse_mla_prefill_keys_m_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr, scale, K_sel, S, H,
    sq_b, sq_t, sq_h, skv_b, skv_s, si_b, si_t, so_b, so_t, so_h,
    DC: tl.constexpr, DR: tl.constexpr, H_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr = "tf32",
):
    """Prefill layout of absorbed MLA with the gathered keys on the M side of both products and the
    heads on N (the transpose of `_sparse_attention_mla_kernel`'s): per block of BLOCK_K (>= 64) keys,
    s^T (BLOCK_K, H_PAD) = latent (BLOCK_K, DC) @ q_lat^T + rope (BLOCK_K, DR) @ q_rope^T, and
    acc^T (DC, H_PAD) += latent^T (DC, BLOCK_K) @ p^T (BLOCK_K, H_PAD). Both M sides are multiples of 64,
    which Hopper's warpgroup MMA needs; 20 heads pad to 32 on N instead of to 32 on M. bf16 cache only
    (one (B, S, DC + DR) row per key); softmax per head = per column, in base 2."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    h_ok = offs_h < H
    offs_c = tl.arange(0, DC)
    offs_r = tl.arange(0, DR)
    q_row = q_ptr + b * sq_b + t * sq_t + offs_h[None, :] * sq_h
    qcT = tl.load(q_row + offs_c[:, None], mask=h_ok[None, :], other=0.0)            # (DC, H_PAD)
    qrT = tl.load(q_row + DC + offs_r[:, None], mask=h_ok[None, :], other=0.0)       # (DR, H_PAD)
    qk_scale = scale * 1.4426950408889634                                           # exp(x) = exp2(x log2 e)
    m = tl.full((H_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((H_PAD,), tl.float32)
    accT = tl.zeros((DC, H_PAD), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, K_sel, BLOCK_K):
        j = start + offs_k
        idx = tl.load(idx_ptr + b * si_b + t * si_t + j, mask=j < K_sel, other=-1)
        ok = (idx >= 0) & (idx < S)
        row = kv_ptr + b * skv_b + tl.where(ok, idx, 0).to(tl.int64)[:, None] * skv_s   # (BLOCK_K, 1)
        latent = tl.load(row + offs_c[None, :], mask=ok[:, None], other=0.0)          # (BLOCK_K, DC)
        rope = tl.load(row + DC + offs_r[None, :], mask=ok[:, None], other=0.0)       # (BLOCK_K, DR)
        sT = (tl.dot(latent, qcT, input_precision=PRECISION)
              + tl.dot(rope, qrT, input_precision=PRECISION))                         # (BLOCK_K, H_PAD)
        sT = tl.where(ok[:, None], sT * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(sT, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                         # no key seen yet
        pT = tl.exp2(sT - m_safe[None, :])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(pT, 0)
        accT = accT * alpha[None, :] + tl.dot(tl.trans(latent), pT.to(latent.dtype),
                                              input_precision=PRECISION)             # (DC, H_PAD)
        m = m_new
    outT = accT / tl.where(l > 0, l, 1.0)[None, :]
    tl.store(out_ptr + b * so_b + t * so_t + offs_h[None, :] * so_h + offs_c[:, None],
             outT.to(out_ptr.dtype.element_ty), mask=h_ok[None, :])


def _combine_splits(acc, ml, out):
    """Merge per-slice softmax partials: acc (B, T, N, H, D) fp32, ml (B, T, N, H, 2) -> out."""
    m, l = ml[..., 0], ml[..., 1]
    m_max = m.amax(dim=2, keepdim=True)
    m_max = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.exp(m - m_max)                                                  # 0 for empty slices
    total = (w * l).sum(dim=2)                                                # (B, T, H)
    merged = (w[..., None] * acc).sum(dim=2) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    out.copy_(merged.to(out.dtype))
    return out


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def sparse_attention_gqa(q, k, v, indices, scale: float, block_k: int = 64, out=None):
    """Triton twin of `ref_sparse_attention_gqa`. Indices outside 0..S-1 count as none."""
    check_sparse_inputs(q, indices, k.shape[0], "k")
    _check_device(q, k, v, indices)
    B, T, Hq, Dh = q.shape
    if k.dim() != 4 or v.shape != k.shape or k.shape[3] != Dh:
        raise _fail("k", f"expected k, v as (B, S, Hkv, {Dh}), got {tuple(k.shape)} / {tuple(v.shape)}",
                    "pass the KV cache as (batch, slots, kv_heads, head_dim)")
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise _fail("q", f"{Hq} query heads are not a multiple of {Hkv} KV heads", "check num_key_value_heads")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if k.stride(3) != 1 or v.stride(3) != 1:
        k, v = k.contiguous(), v.contiguous()
    q = q.contiguous()
    indices = indices.to(torch.int32).contiguous()
    out = torch.empty_like(q) if out is None else out
    group = Hq // Hkv
    _sparse_attention_gqa_kernel[(T, B, Hkv)](
        q, k, v, indices, out, scale, indices.shape[2], k.shape[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, G_PAD=_pad(group), DH=Dh, DH_PAD=_pad(Dh), BLOCK_K=block_k, PRECISION=_precision(q),
        num_warps=4)
    return out


def sparse_attention_mla(q, kv, indices, scale: float, v_dim: int, block_h: int | None = None,
                         block_k: int | None = None, out=None, num_warps: int | None = None,
                         num_stages: int | None = None, n_split: int | None = None, layout: str | None = None):
    """Triton twin of `ref_sparse_attention_mla`: (B, T, H, v_dim) in q's dtype.

    layout (prefill only, i.e. when the queries alone fill the GPU): "heads_m" (the heads on the M side of
    the products, `_sparse_attention_mla_kernel`) or "keys_m" (the gathered keys on M,
    `_sparse_mla_prefill_keys_m_kernel`; needs power-of-two latent and RoPE widths); None takes
    INDEXCACHE_MLA_PREFILL (default heads_m). Tiles left None take the layout's MLA_PREFILL_TILES."""
    check_sparse_inputs(q, indices, kv.shape[0], "kv")
    _check_device(q, kv, indices)
    Dq = q.shape[3]
    if kv.dim() != 3 or kv.shape[2] != Dq:
        raise _fail("kv", f"expected (B, S, {Dq}), got {tuple(kv.shape)}",
                    "pass the latent cache (normalised latent then RoPE key) with q's last dim")
    if not 0 < v_dim < Dq:
        raise _fail("v_dim", f"must be in 1..{Dq - 1} (the rope part follows it), got {v_dim}",
                    "pass kv_lora_rank")
    q = q.contiguous()
    if kv.dtype != q.dtype:
        kv = kv.to(q.dtype)
    if kv.stride(2) != 1:
        kv = kv.contiguous()
    chosen = layout or MLA_PREFILL_LAYOUT
    if chosen not in MLA_PREFILL_TILES:
        raise _fail("layout", f"must be 'heads_m' or 'keys_m', got {chosen!r}",
                    "set INDEXCACHE_MLA_PREFILL to one of them")
    B, T, H, _ = q.shape
    prefill = layout is not None or T * B * triton.cdiv(H, block_h or min(64, _pad(H))) >= 132   # asked, or fills the GPU
    if (chosen == "keys_m" and prefill and n_split in (None, 1) and _is_pow2(v_dim) and _is_pow2(Dq - v_dim)
            and H <= 64):
        tiles = MLA_PREFILL_TILES["keys_m"]
        return _launch_mla_keys_m(q, kv, indices, scale, v_dim, out, block_k=max(64, block_k or tiles["block_k"]),
                                  num_warps=num_warps or tiles["num_warps"],
                                  num_stages=num_stages or tiles["num_stages"])
    tiles = MLA_PREFILL_TILES["heads_m"]   # also decode's, whatever the prefill layout
    # latent and rope are the two halves of one cache row; the scale pointer is unused
    return _launch_mla(q, kv, kv[..., v_dim:], kv, indices, scale, v_dim, False, block_h,
                       block_k or tiles["block_k"], out, num_warps or tiles["num_warps"],
                       num_stages or tiles["num_stages"], n_split)


def sparse_attention_mla_fp8(q, latent8, latent_scale, k_rope, indices, scale: float,
                             block_h: int | None = None, block_k: int = 32, out=None, num_warps: int = 4,
                             num_stages: int = 2, n_split: int | None = None):
    """Triton twin of `ref_sparse_attention_mla_fp8`: absorbed MLA over an FP8 latent cache.

    latent8 (B, S, Dc) e4m3 and latent_scale (B, S) fp32 from `quantize_latent_fp8`, k_rope (B, S, Dr)
    unquantised, q (B, T, H, Dc + Dr) bf16. A selected key costs Dc + 2 Dr + 4 bytes of gather
    (644 at 512 + 64) instead of 2 (Dc + Dr) (1152). Returns (B, T, H, Dc) in q's dtype."""
    check_mla_fp8_inputs(q, latent8, latent_scale, k_rope, indices)
    _check_device(q, latent8, latent_scale, k_rope, indices)
    q = q.contiguous()
    if k_rope.dtype != q.dtype:
        k_rope = k_rope.to(q.dtype)
    if latent8.stride(2) != 1:
        latent8 = latent8.contiguous()
    if k_rope.stride(2) != 1:
        k_rope = k_rope.contiguous()
    if latent_scale.stride(1) != 1:
        latent_scale = latent_scale.contiguous()
    return _launch_mla(q, latent8, k_rope, latent_scale, indices, scale, latent8.shape[2], True, block_h,
                       block_k, out, num_warps, num_stages, n_split)


def _is_pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _launch_mla_keys_m(q, kv, indices, scale, v_dim, out, block_k, num_warps, num_stages):
    """q (B, T, H, Dc+Dr) contiguous, kv (B, S, Dc+Dr) with unit last stride: one program per query."""
    B, T, H, Dq = q.shape
    indices = indices.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty(B, T, H, v_dim, dtype=q.dtype, device=q.device)
    _sparse_mla_prefill_keys_m_kernel[(T, B)](
        q, kv, indices, out, scale, indices.shape[2], kv.shape[1], H,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        DC=v_dim, DR=Dq - v_dim, H_PAD=_pad(H), BLOCK_K=block_k, PRECISION=_precision(q),
        num_warps=num_warps, num_stages=num_stages)
    return out


def _launch_mla(q, latent, rope, latent_scale, indices, scale, v_dim, fp8_kv, block_h, block_k, out,
                num_warps, num_stages, n_split):
    """q (B, T, H, Dc+Dr) contiguous; latent (B, S, >=Dc) and rope (B, S, >=Dr) with unit last stride."""
    B, T, H, Dq = q.shape
    indices = indices.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty(B, T, H, v_dim, dtype=q.dtype, device=q.device)
    dr = Dq - v_dim
    block_h = block_h or min(64, _pad(H))
    K_sel = indices.shape[2]
    programs = T * B * triton.cdiv(H, block_h)
    if n_split is None:     # split the selected keys only when the queries alone leave SMs idle
        n_split = 1 if programs >= 132 else max(1, min(16, 264 // programs, triton.cdiv(K_sel, 4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K_sel, n_split), block_k) * block_k
    if n_split > 1:
        part_acc = torch.empty(B, T, n_split, H, v_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(B, T, n_split, H, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out      # unused
    _sparse_attention_mla_kernel[(T * n_split, B, triton.cdiv(H, block_h))](
        q, latent, rope, latent_scale, indices, out, part_acc, part_ml, scale, K_sel, latent.shape[1], H, T,
        k_per_split, q.stride(0), q.stride(1), q.stride(2), latent.stride(0), latent.stride(1),
        rope.stride(0), rope.stride(1), latent_scale.stride(0) if fp8_kv else 0,
        indices.stride(0), indices.stride(1), out.stride(0), out.stride(1), out.stride(2),
        DC=v_dim, DC_PAD=_pad(v_dim), DR=dr, DR_PAD=_pad(dr), BLOCK_H=block_h, BLOCK_K=block_k,
        N_SPLIT=n_split, FP8_KV=fp8_kv, PRECISION=_precision(q), num_warps=num_warps, num_stages=num_stages)
    if n_split > 1:
        _combine_splits(part_acc, part_ml, out)
    return out
