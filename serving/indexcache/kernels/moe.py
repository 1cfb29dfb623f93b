"""Routed experts (MoE) with no Python loop over experts and no host sync (CUDA-graph capturable).

    out[n] = sum_j top_w[n, j] * W_down[e] (silu(W_gate[e] x_n) * W_up[e] x_n),   e = top_e[n, j]

x (N, D); top_w (N, k) fp32 and top_e (N, k) int64 from the router; experts stacked per layer and stored
out x in like the HF checkpoints: w_gate_up (E, 2I, D) = each expert's gate_proj.weight rows then its
up_proj.weight rows, w_down (E, D, I) = down_proj.weight. FP8 experts (DeepSeek-V3.2, GLM-5) are e4m3 with
one fp32 scale per 128 x 128 block: gate_up_scale_inv (E, 2I/128, D/128), down_scale_inv (E, D/128, I/128)
(ragged sizes: ceil, the up half starting a new row block; reference.py). The gather kernels need I % 128 == 0.
The result is (N, D) fp32; the caller adds the shared expert and casts.

Two paths, one answer (the twin is `reference.ref_moe_routed`, one pair at a time in fp32):
  - `moe_grouped` (prefill, and every CPU call): the N*k token-expert pairs are sorted by expert
    (argsort; counts by scatter_add, never bincount / .tolist() / .item(), which read on the host), then
      * torch._grouped_mm, one grouped GEMM for the gate|up rows and one for down, where it runs without
        a sync: CUDA bf16 on sm90 / sm100 (CUTLASS), and the CPU (any float dtype; the CPU torch 2.13 has
        it). On other CUDA devices or dtypes torch's own fallback copies the offsets to the host, so:
      * else a gathered batched product: each pair's expert weights are gathered (chunks of pairs, at most
        _GATHER_ELEMENTS weight elements at a time) and multiplied with torch.bmm. It reads every pair's
        weights (P x 3ID instead of E x 3ID): right for few pairs, slow but sync-free for many.
    FP8 experts on the _grouped_mm path are dequantised to x's dtype per call, all E experts, in chunks
    of experts: a transient of E x 3ID elements (1.2 GB in bf16 for the 30B shape's 64 x 3 x 1536 x 2048;
    22.5 GB for DeepSeek-V3.2's 256 x 3 x 2048 x 7168) and one read + write of it per layer per call.
    The gathered path dequantises only the gathered chunk.
  - `moe_gather` (decode, few pairs, CUDA): two Triton GEMV kernels that read only the selected experts'
    rows: `_moe_gate_up_kernel` (gate and up rows of one expert, SwiGLU fused, fp32 activation) and
    `_moe_down_kernel` (down rows, the routing weight fused). FP8 tiles are dequantised as they are read.
  - `moe_routed(path="auto")`: gather when N * k <= GATHER_MAX_PAIRS on CUDA, grouped otherwise.

Precision: the gather path multiplies in fp32 (bf16/e4m3 weights are exact in fp32) and keeps the SwiGLU
activation in fp32: it agrees with the twin to fp32 rounding. The grouped path rounds the gate|up product
and the activation to the weights' dtype (bf16: 2^-9 relative) between the two GEMMs.
Block sizes of the gather kernels (block_n=16, block_k=128) are not tuned on the H200 yet: the bench's
(64, 32) were for the (D, 2I) layout; time block_n in 16, 32, 64 and block_k in 64, 128 at decode.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .reference import (  # noqa: F401 (ref_moe_routed: the twin)
    FP8_BLOCK, FP8_DTYPES, check_moe_inputs, dequantize_experts_fp8, ref_moe_routed)

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:        # CPU installs without the gpu extra: moe_grouped still runs (plain PyTorch)
    triton = tl = None

    def _jit(fn):
        return fn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# "auto" takes the gather path up to this many token-expert pairs (decode at small batch). H200, 30B shape
# (E=64, top-4, D=2048, I=1536, bf16), `bench_kernels.py --only-served` at 0a227a9, gather / grouped ms:
# 4 pairs 0.14 / 0.37, 32 pairs 0.22 / 0.42, 64 pairs 0.36 / 0.55, 128 pairs 0.56 / 0.64, 256 pairs 0.90 / 0.66.
# In the model, batch-32 decode at 4K (128 pairs) was slower with gather (538 tok/s at 533931b) than with the
# grouped GEMM (601 at ff0d04a): the limit is 64 pairs.
# (It was cut to 8 after an H200 test run at ff0d04a that looked like a gather bug at 8 tokens; the cause was
# the test, whose CUDA-graph check rewrote the routing before the gather path was compared.)
GATHER_MAX_PAIRS = 64
MOE_PATHS = ("auto", "grouped", "gather")
# Weight elements gathered (or dequantised) at a time by the plain-PyTorch fallbacks: 256 Mi (512 MiB bf16).
_GATHER_ELEMENTS = 1 << 28


@_jit
def _moe_gate_up_kernel(x_ptr, e_ptr, w_ptr, ws_ptr, act_ptr, D, I,
                        sx_n, sw_e, sw_r, sws_e, sws_r, sa_p,
                        TOPK: tl.constexpr, FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act[p, i] = silu(w[e, i] . x[n]) * (w[e, I + i] . x[n]) for BLOCK_N rows i, p = n * TOPK + j the
    token-expert pair, e = experts[p]: a GEMV over the selected expert's gate and up rows, nothing else read.
    Rows are out x in, so the K reduction walks each row's contiguous elements: (BLOCK_N, BLOCK_K) tiles."""
    p = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = offs_i < I
    e = tl.load(e_ptr + p).to(tl.int64)
    x_row = x_ptr + (p // TOPK) * sx_n
    gate_rows = w_ptr + e * sw_e + offs_i.to(tl.int64)[:, None] * sw_r               # (BLOCK_N, 1)
    up_rows = gate_rows + I * sw_r
    # elementwise partial products in registers, one reduction over K after the loop
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        x = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)                # (BLOCK_K,)
        mask = i_ok[:, None] & k_ok[None, :]
        g = tl.load(gate_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)   # (BLOCK_N, BLOCK_K)
        u = tl.load(up_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        if FP8:   # one scale per 128 x 128 block: BLOCK_K divides 128, so one scale column per step
            s_col = ws_ptr + e * sws_e + k0 // SCALE_BLOCK
            g = g * tl.load(s_col + (offs_i // SCALE_BLOCK) * sws_r, mask=i_ok, other=0.0)[:, None]
            u = u * tl.load(s_col + ((offs_i + I) // SCALE_BLOCK) * sws_r, mask=i_ok, other=0.0)[:, None]
        acc_g += g * x[None, :]
        acc_u += u * x[None, :]
    gate = tl.sum(acc_g, 1)                                                             # (BLOCK_N,)
    up = tl.sum(acc_u, 1)
    tl.store(act_ptr + p * sa_p + offs_i, gate * tl.sigmoid(gate) * up, mask=i_ok)


@_jit
def _moe_down_kernel(act_ptr, e_ptr, tw_ptr, w_ptr, ws_ptr, y_ptr, I, D,
                     sa_p, sw_e, sw_r, sws_e, sws_r, sy_p,
                     FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[p, d] = top_w[p] * (w[e, d] . act[p]) for BLOCK_N rows d, e = experts[p] (fp32)."""
    p = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    e = tl.load(e_ptr + p).to(tl.int64)
    rows = w_ptr + e * sw_e + offs_d.to(tl.int64)[:, None] * sw_r                      # (BLOCK_N, 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(act_ptr + p * sa_p + offs_k, mask=k_ok, other=0.0)                  # (BLOCK_K,) fp32
        w = tl.load(rows + offs_k[None, :], mask=d_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if FP8:
            s = tl.load(ws_ptr + e * sws_e + (offs_d // SCALE_BLOCK) * sws_r + k0 // SCALE_BLOCK,
                        mask=d_ok, other=0.0)
            w = w * s[:, None]
        acc += w * a[None, :]
    tl.store(y_ptr + p * sy_p + offs_d, tl.load(tw_ptr + p) * tl.sum(acc, 1), mask=d_ok)


def _is_fp8(w: torch.Tensor) -> bool:
    return w.dtype in FP8_DTYPES


def moe_gather(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv=None, down_scale_inv=None,
               block_n: int = 16, block_k: int = 128, num_warps: int = 4) -> torch.Tensor:
    """Triton twin of `ref_moe_routed` for few token-expert pairs (decode): reads only the selected experts'
    rows, no host sync. Returns (N, D) fp32."""
    check_moe_inputs(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv)
    if triton is None:
        raise RuntimeError("moe_gather needs Triton; use moe_grouped (INDEXCACHE_KERNELS=torch) without it")
    for t in (x, top_w, top_e, w_gate_up, w_down):
        if t.device.type != "cuda" and not INTERPRET:
            raise ValueError(f"moe_gather needs CUDA tensors, got {t.device}; use moe_grouped on the CPU")
    fp8 = _is_fp8(w_gate_up)
    if fp8 and FP8_BLOCK % block_k:
        raise ValueError(f"block_k={block_k}: FP8 experts need a block_k dividing {FP8_BLOCK}")
    if fp8 and w_down.shape[2] % FP8_BLOCK:   # the kernel finds up_proj's scale rows at (I + i) // 128
        raise ValueError(f"moe_gather: FP8 experts with moe_inter_dim {w_down.shape[2]} (not a multiple of "
                         f"{FP8_BLOCK}): use moe_grouped")
    N, D = x.shape
    k = top_e.shape[1]
    I = w_down.shape[2]
    P = N * k                                                         # token-expert pairs
    if P == 0:
        return torch.zeros(N, D, dtype=torch.float32, device=x.device)
    if w_gate_up.stride(2) != 1 or w_down.stride(2) != 1:
        raise ValueError("w_gate_up / w_down: expected unit stride on the in_features dim; pass contiguous experts")
    x = x.contiguous()
    experts = top_e.reshape(-1).to(torch.int32).contiguous()          # (P,), pair p = n * k + j
    weights = top_w.reshape(-1).float().contiguous()                  # (P,)
    gu_s = gate_up_scale_inv.contiguous() if fp8 else w_gate_up       # dummy pointer when unused
    dn_s = down_scale_inv.contiguous() if fp8 else w_down
    act = torch.empty(P, I, dtype=torch.float32, device=x.device)     # (P, I) silu(gate) * up
    _moe_gate_up_kernel[(P, triton.cdiv(I, block_n))](
        x, experts, w_gate_up, gu_s, act, D, I,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), gu_s.stride(0), gu_s.stride(1), act.stride(0),
        TOPK=k, FP8=fp8, SCALE_BLOCK=FP8_BLOCK, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    y = torch.empty(P, D, dtype=torch.float32, device=x.device)       # (P, D) top_w * expert output
    _moe_down_kernel[(P, triton.cdiv(D, block_n))](
        act, experts, weights, w_down, dn_s, y, I, D,
        act.stride(0), w_down.stride(0), w_down.stride(1), dn_s.stride(0), dn_s.stride(1), y.stride(0),
        FP8=fp8, SCALE_BLOCK=FP8_BLOCK, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return y.view(N, k, D).sum(1)                                     # (N, D), a fixed summation order


def sort_pairs(top_e: torch.Tensor, n_experts: int):
    """Token-expert pairs grouped by expert, without a host sync. top_e (N, k) -> order (P,) int64 (pair ids
    p = n * k + j, expert by expert, stable) and offs (E,) int32 (the end of each expert's rows)."""
    flat = top_e.reshape(-1).long()                                   # (P,)
    order = flat.argsort(stable=True)
    # scatter_add, not bincount: bincount reads its max on the host, which breaks graph capture
    counts = torch.zeros(n_experts, dtype=torch.int64, device=top_e.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts.cumsum(0).to(torch.int32)


def grouped_mm_runs(device, dtype) -> bool:
    """Whether torch._grouped_mm computes this without a host sync: its CPU kernel (a loop over the groups
    on the host, which has nothing to wait for) and its CUDA CUTLASS kernel for bf16 on sm90 / sm100. For
    other CUDA dtypes or devices torch falls back to a loop over offs copied to the host."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)
    return False


def _dequantize_experts(w8, scale_inv, dtype, gate_up: bool = False) -> torch.Tensor:
    """(E, R, C) e4m3 and their block scales (reference.dequantize_experts_fp8; gate_up: the gate|up
    stack) -> (E, R, C) dtype, a few experts at a time so that the fp32 intermediate stays under
    _GATHER_ELEMENTS elements (a Python loop over chunks of a known size: no sync)."""
    E, R, C = w8.shape
    out = torch.empty(E, R, C, dtype=dtype, device=w8.device)
    step = max(1, _GATHER_ELEMENTS // (R * C))
    for e0 in range(0, E, step):
        out[e0:e0 + step] = dequantize_experts_fp8(w8[e0:e0 + step], scale_inv[e0:e0 + step], dtype, gate_up)
    return out


def _grouped_gemms(x, top_e, w_gate_up, w_down, dtype):
    """(P, D) expert outputs in pair order, by sorting the pairs and two torch._grouped_mm calls."""
    k = top_e.shape[1]
    E, I = w_down.shape[0], w_down.shape[2]
    order, offs = sort_pairs(top_e, E)
    xs = x.to(dtype)[order // k]                                                        # (P, D) by expert
    gu = torch._grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs)                  # (P, 2I)
    act = (F.silu(gu[:, :I].float()) * gu[:, I:].float()).to(dtype)                     # (P, I)
    ys = torch._grouped_mm(act, w_down.transpose(-2, -1), offs=offs)                    # (P, D) by expert
    return torch.empty_like(ys).index_copy_(0, order, ys)                               # (P, D) by pair


def _gathered_products(x, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv, dtype):
    """(P, D) expert outputs in pair order, each pair with its own gathered expert weights (torch.bmm)."""
    N, D = x.shape
    k = top_e.shape[1]
    I = w_down.shape[2]
    P = N * k
    experts = top_e.reshape(-1)                                                         # (P,)
    xp = x.to(dtype)[:, None, :].expand(N, k, D).reshape(P, D, 1)                      # (P, D, 1)
    y = torch.empty(P, D, dtype=dtype, device=x.device)
    step = max(1, _GATHER_ELEMENTS // (3 * I * D))
    for p0 in range(0, P, step):
        e = experts[p0:p0 + step]
        gu, dn = w_gate_up[e], w_down[e]                                                # (c, 2I, D), (c, D, I)
        if gate_up_scale_inv is not None:
            gu = _dequantize_experts(gu, gate_up_scale_inv[e], dtype, gate_up=True)
            dn = _dequantize_experts(dn, down_scale_inv[e], dtype)
        h = torch.bmm(gu, xp[p0:p0 + step]).squeeze(-1)                                 # (c, 2I)
        act = (F.silu(h[:, :I].float()) * h[:, I:].float()).to(dtype)                   # (c, I)
        y[p0:p0 + step] = torch.bmm(dn, act[:, :, None]).squeeze(-1)                    # (c, D)
    return y


def moe_grouped(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv=None, down_scale_inv=None) -> torch.Tensor:
    """Plain-PyTorch routed experts for many pairs (prefill) and the CPU: pairs sorted by expert and
    torch._grouped_mm where it runs sync-free, else gathered batched products (module docstring).
    Computes in the experts' dtype (x's dtype for FP8 experts). Returns (N, D) fp32."""
    check_moe_inputs(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv)
    N, D = x.shape
    k = top_e.shape[1]
    if N == 0:
        return torch.zeros(N, D, dtype=torch.float32, device=x.device)
    fp8 = _is_fp8(w_gate_up)
    dtype = (x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32) if fp8 else w_gate_up.dtype
    if grouped_mm_runs(x.device, dtype):
        if fp8:
            w_gate_up = _dequantize_experts(w_gate_up, gate_up_scale_inv, dtype, gate_up=True)
            w_down = _dequantize_experts(w_down, down_scale_inv, dtype)
        y = _grouped_gemms(x, top_e, w_gate_up, w_down, dtype)
    else:
        y = _gathered_products(x, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv, dtype)
    return (y.float().view(N, k, D) * top_w.float()[..., None]).sum(1)                 # (N, D)


def resolved_moe_path(path: str, device, pairs: int) -> str:
    """"gather" or "grouped": what moe_routed runs for this many token-expert pairs (a shape, no sync)."""
    if path not in MOE_PATHS:
        raise ValueError(f"path={path!r}: use one of {', '.join(MOE_PATHS)}")
    if path != "auto":
        return path
    on_cuda = torch.device(device).type == "cuda"
    return "gather" if on_cuda and triton is not None and pairs <= GATHER_MAX_PAIRS else "grouped"


def moe_routed(x, top_w, top_e, w_gate_up, w_down, path: str = "auto", *,
               gate_up_scale_inv=None, down_scale_inv=None) -> torch.Tensor:
    """Routed experts, (N, D) fp32. path: "auto" (gather for at most GATHER_MAX_PAIRS pairs on CUDA, else
    grouped), "grouped" or "gather"."""
    chosen = resolved_moe_path(path, x.device, top_e.numel())
    fast = moe_gather if chosen == "gather" else moe_grouped
    return fast(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv)
