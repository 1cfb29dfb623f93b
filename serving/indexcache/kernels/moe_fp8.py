"""Routed experts with FP8 weights read as FP8: a grouped GEMM over the token-expert pairs sorted by expert,
in Triton, for prefill and batched decode (one decode token takes moe.moe_gather, which also reads e4m3).

    out[n] = sum_j top_w[n, j] * W_down[e] (silu(W_gate[e] x_n) * W_up[e] x_n),   e = top_e[n, j]

Experts are e4m3 with the checkpoint's 128 x 128 block scales (layout in reference.py: gate_up_scale_inv
(E, 2 ceil(I/128), ceil(D/128)), gate_proj's rows then up_proj's; down_scale_inv (E, ceil(D/128),
ceil(I/128))). What `moe.moe_grouped` does with them, dequantising all E experts to x's dtype on every
call (E x 3ID elements written and read per layer per call: 22.5 GB of bf16 for DeepSeek-V3.2), this does
inside the GEMM: each (BLOCK_K = 128) x BLOCK_N weight tile is loaded as e4m3 (1 byte per element),
converted exactly to x's dtype, multiplied on the tensor cores in fp32, and the tile's one block scale is
applied to the fp32 partial product. Activations are not quantised (the precision of moe_grouped).

The pairs, sorted by expert (moe.sort_pairs), are cut into blocks of BLOCK_M rows that never straddle two
experts, the way vLLM's fused MoE aligns them, without a host sync: a static upper bound of
ceil(P / BLOCK_M) + E blocks is launched, and each block finds its expert, its first sorted row and how many
rows it holds (0 for the unused ones, which skip their K loop). Two kernels:
  - `_fp8_gate_up_kernel`: (block, BLOCK_N of I) -> act = silu(x W_gate^T) * (x W_up^T), rows in sorted order,
    stored in x's dtype (moe_grouped rounds the activation to its GEMM dtype too);
  - `_fp8_down_kernel`: (block, BLOCK_N of D) -> top_w * act W_down^T, written to each pair's own row (fp32).
The (N, k, D) rows are then summed in a fixed order. CUDA-graph capturable (no host reads).

Twin: `reference.ref_moe_routed` (one pair at a time, fp32). Tolerance: < 1e-5 in fp32 under the interpreter;
< 2e-2 in bf16 on the GPU (x and the activation rounded to bf16, as in moe_grouped). Tile sizes are not
tuned on the H200 yet (BLOCK_N 64, BLOCK_M 16 below 1024 pairs else 64, 4 warps, 3 stages).
"""
from __future__ import annotations

import os

import torch

from .moe import sort_pairs
from .reference import FP8_BLOCK, check_moe_inputs, ref_moe_routed  # noqa: F401 (the twin)

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:        # CPU installs without the gpu extra: nothing here runs there
    triton = tl = None

    def _jit(fn):
        return fn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@_jit
def _fp8_gate_up_kernel(x_ptr, order_ptr, blk_e_ptr, blk_start_ptr, blk_rows_ptr, w_ptr, ws_ptr, act_ptr,
                        D, I, UP_BLOCK0, sx_n, sw_e, sw_r, sws_e, sws_r, sa_p,
                        TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act[r, i] = silu(x[n_r] . gate[e, i]) * (x[n_r] . up[e, i]) for the BLOCK_M sorted rows r of one
    expert e and BLOCK_N columns i; n_r = token of the pair at sorted row r. BLOCK_N divides 128, so the
    tile sits in one scale row (gate: i // 128, up: UP_BLOCK0 + i // 128); BLOCK_K = 128: one scale column."""
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = tl.load(blk_rows_ptr + b)
    e = tl.load(blk_e_ptr + b).to(tl.int64)
    start = tl.load(blk_start_ptr + b).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < rows
    pair = tl.load(order_ptr + start + offs_m, mask=m_ok, other=0)
    x_rows = x_ptr + (pair // TOPK)[:, None] * sx_n                                   # (BLOCK_M, 1)
    offs_i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = offs_i < I
    offs_k = tl.arange(0, BLOCK_K)
    gate_cols = w_ptr + e * sw_e + offs_i.to(tl.int64)[None, :] * sw_r                 # (1, BLOCK_N): w^T tiles
    up_cols = gate_cols + I * sw_r
    s_gate = ws_ptr + e * sws_e + ((pid_n * BLOCK_N) // BLOCK_K) * sws_r
    s_up = ws_ptr + e * sws_e + (UP_BLOCK0 + (pid_n * BLOCK_N) // BLOCK_K) * sws_r
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_k = tl.where(rows > 0, tl.cdiv(D, BLOCK_K), 0)                                   # unused blocks: no loop
    for kb in range(0, n_k):
        k = kb * BLOCK_K + offs_k
        k_ok = k < D
        xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)      # (BLOCK_M, BLOCK_K)
        w_mask = k_ok[:, None] & i_ok[None, :]
        g = tl.load(gate_cols + k[:, None], mask=w_mask, other=0.0).to(xt.dtype)              # (BLOCK_K, BLOCK_N)
        u = tl.load(up_cols + k[:, None], mask=w_mask, other=0.0).to(xt.dtype)
        acc_g += tl.dot(xt, g) * tl.load(s_gate + kb)
        acc_u += tl.dot(xt, u) * tl.load(s_up + kb)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    a_ptrs = act_ptr + (start + offs_m)[:, None] * sa_p + offs_i[None, :]
    tl.store(a_ptrs, act.to(act_ptr.dtype.element_ty), mask=m_ok[:, None] & i_ok[None, :])


@_jit
def _fp8_down_kernel(act_ptr, order_ptr, tw_ptr, blk_e_ptr, blk_start_ptr, blk_rows_ptr, w_ptr, ws_ptr, y_ptr,
                     I, D, sa_p, sw_e, sw_r, sws_e, sws_r, sy_p,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[p_r, d] = top_w[p_r] * (act[r] . down[e, d]) for the BLOCK_M sorted rows r of expert e, written to
    the row of their pair p_r (fp32)."""
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = tl.load(blk_rows_ptr + b)
    e = tl.load(blk_e_ptr + b).to(tl.int64)
    start = tl.load(blk_start_ptr + b).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < rows
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = act_ptr + (start + offs_m)[:, None] * sa_p                               # (BLOCK_M, 1)
    w_cols = w_ptr + e * sw_e + offs_d.to(tl.int64)[None, :] * sw_r                    # (1, BLOCK_N)
    s_row = ws_ptr + e * sws_e + ((pid_n * BLOCK_N) // BLOCK_K) * sws_r
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_k = tl.where(rows > 0, tl.cdiv(I, BLOCK_K), 0)
    for kb in range(0, n_k):
        k = kb * BLOCK_K + offs_k
        k_ok = k < I
        a = tl.load(a_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)        # (BLOCK_M, BLOCK_K)
        w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(a.dtype)
        acc += tl.dot(a, w) * tl.load(s_row + kb)
    pair = tl.load(order_ptr + start + offs_m, mask=m_ok, other=0)
    tw = tl.load(tw_ptr + pair, mask=m_ok, other=0.0)
    tl.store(y_ptr + pair[:, None] * sy_p + offs_d[None, :], acc * tw[:, None], mask=m_ok[:, None] & d_ok[None, :])


def expert_blocks(top_e: torch.Tensor, n_experts: int, block_m: int):
    """The sorted pairs cut into blocks of at most block_m rows of one expert, without a host sync.
    Returns (order (P,) pair ids sorted by expert, blk_e, blk_start, blk_rows), each (ceil(P/block_m) + E,)
    int32: block b holds the blk_rows[b] sorted rows from blk_start[b] on, all of expert blk_e[b]; blocks
    past the last used one hold 0 rows."""
    P = top_e.numel()
    order, ends = sort_pairs(top_e, n_experts)                     # ends (E,): cumulative rows per expert
    ends = ends.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))           # (E,)
    n_blk = (counts + block_m - 1) // block_m
    blk_end = n_blk.cumsum(0)                                      # (E,) block index past each expert's last
    b = torch.arange(-(-P // block_m) + n_experts, device=top_e.device)
    e_b = torch.searchsorted(blk_end, b, right=True)               # (n_max,) E for unused blocks
    e_c = e_b.clamp(max=n_experts - 1)
    local = b - (blk_end[e_c] - n_blk[e_c])                        # block index within its expert
    start = ends[e_c] - counts[e_c] + local * block_m
    rows = torch.where(e_b < n_experts, (counts[e_c] - local * block_m).clamp(0, block_m), 0)
    return order, e_c.to(torch.int32), start.to(torch.int32), rows.to(torch.int32)


def moe_fp8_grouped(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv,
                    block_m: int | None = None, block_n: int = 64, num_warps: int = 4,
                    num_stages: int = 3) -> torch.Tensor:
    """Triton twin of `ref_moe_routed` for e4m3 experts and many pairs (module docstring). x (N, D) bf16 /
    fp32, top_w / top_e (N, k). Returns (N, D) fp32."""
    check_moe_inputs(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv)
    if triton is None:
        raise RuntimeError("moe_fp8_grouped needs Triton; use moe.moe_grouped (INDEXCACHE_KERNELS=torch) without it")
    if gate_up_scale_inv is None:
        raise ValueError("w_gate_up: moe_fp8_grouped takes float8_e4m3fn experts with their scales; "
                         "use moe.moe_grouped for bf16 / fp32 experts")
    for t in (x, top_w, top_e, w_gate_up, w_down):
        if t.device.type != "cuda" and not INTERPRET:
            raise ValueError(f"moe_fp8_grouped needs CUDA tensors, got {t.device}; use moe.moe_grouped on the CPU")
    if FP8_BLOCK % block_n:
        raise ValueError(f"block_n={block_n}: must divide {FP8_BLOCK} (one scale row per tile)")
    N, D = x.shape
    k = top_e.shape[1]
    E, I = w_down.shape[0], w_down.shape[2]
    P = N * k
    if P == 0:
        return torch.zeros(N, D, dtype=torch.float32, device=x.device)
    if w_gate_up.stride(2) != 1 or w_down.stride(2) != 1:
        raise ValueError("w_gate_up / w_down: expected unit stride on the in_features dim; pass contiguous experts")
    block_m = block_m or (16 if P < 1024 else 64)
    x = x.contiguous() if x.dtype in (torch.bfloat16, torch.float32) else x.float().contiguous()
    order, blk_e, blk_start, blk_rows = expert_blocks(top_e, E, block_m)
    gu_s, dn_s = gate_up_scale_inv.contiguous(), down_scale_inv.contiguous()
    act = torch.empty(P, I, dtype=x.dtype, device=x.device)                    # (P, I) in sorted order
    grid = (blk_e.numel(), triton.cdiv(I, block_n))
    _fp8_gate_up_kernel[grid](
        x, order, blk_e, blk_start, blk_rows, w_gate_up, gu_s, act, D, I, triton.cdiv(I, FP8_BLOCK),
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), gu_s.stride(0), gu_s.stride(1), act.stride(0),
        TOPK=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK, num_warps=num_warps, num_stages=num_stages)
    y = torch.empty(P, D, dtype=torch.float32, device=x.device)                # (P, D) in pair order
    grid = (blk_e.numel(), triton.cdiv(D, block_n))
    _fp8_down_kernel[grid](
        act, order, top_w.reshape(-1).float().contiguous(), blk_e, blk_start, blk_rows, w_down, dn_s, y, I, D,
        act.stride(0), w_down.stride(0), w_down.stride(1), dn_s.stride(0), dn_s.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK, num_warps=num_warps, num_stages=num_stages)
    return y.view(N, k, D).sum(1)                                              # (N, D), a fixed order
