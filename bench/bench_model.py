"""End-to-end benchmark of the 30B-class DSA shape on one GPU, random weights, per IndexCache pattern.

    PYTHONPATH=serving python3 bench/bench_model.py --out model.json [--contexts 16384,...]

Shape (the IndexCache paper's 30B DSA model): 47 layers (layer 0 dense, 46 MoE), hidden 2048,
MLA with 20 heads, q/kv latent ranks 768/512, head dims 192 nope + 64 rope / 256 value, 64 routed
experts top-4 + 1 shared of width 1536 (dense layer width 10240), indexer 32 x 128, top-k 2048.

Prefill runs the whole context through every layer in chunks of --chunk tokens, with the real
caches (latent KV for every layer, indexer K only for F layers) and the Triton kernels; an S layer
runs no indexer and reuses the top-k indices of the nearest F layer before it. Decode times one
token per request (batch 1) at the given context over caches filled with random values, replayed
as a CUDA graph so that launch overhead does not hide the kernels.
Time per phase comes from CUDA events around each phase (no extra synchronisation):
indexer (projections + fused scores), topk, attention (MLA projections + sparse attention),
ffn (dense FFN / MoE incl. router), rest (norms, RoPE, residuals, embedding-free input).
Weights are random and shared by all layers of one kind (one dense FFN, one MoE, one attention,
one indexer): timing is the same as with distinct weights (each layer's matrices are far larger
than L2) and it keeps 60 GB of weights off the card.

Decode MoE (--decode-moe): "grouped" sorts the token-expert pairs and runs torch._grouped_mm over the
64 experts; "gather" (Triton GEMVs that read only the selected experts' weights, for at most
SMALL_MOE_PAIRS pairs) is what "auto" picks at batch 1. Decode is timed with both in the same run
(decode_tokens_per_s_gather_moe / _grouped_moe; decode_tokens_per_s is the chosen one).
--fp8-kv stores the latent cache as e4m3 rows with one fp32 scale per token (RoPE key kept bf16) and
runs the FP8-latent sparse MLA kernel. --profile-decode adds, at the largest context, a torch.profiler
table of the decode kernels per token (CUDA-graph replays) and kernel time per phase (one eager step).

CPU smoke test (no timing meaning; the Triton kernels run in the interpreter, fp32 instead of bf16):
    BENCH_DEVICE=cpu TRITON_INTERPRET=1 python3 bench/bench_model.py --tiny --contexts 48 --chunk 32 \
        --warmup-tokens 32 --patterns all-F,1/4 --profile-decode [--fp8-kv] --out /tmp/smoke.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from indexcache.kernels.interpreter import patch_for_numpy2  # noqa: E402

patch_for_numpy2()   # the CPU smoke test under TRITON_INTERPRET=1

from indexcache.kernels import quantize_indexer_fp8, quantize_latent_fp8  # noqa: E402
from indexcache.kernels.indexer import indexer_scores_into, topk_rows_into  # noqa: E402
from indexcache.kernels.sparse_attention import sparse_attention_mla, sparse_attention_mla_fp8  # noqa: E402

PATTERNS = {
    "all-F": "F" * 47,
    "1/2": "FSFSFSSSSFSFFFFSFFSSFFSFFFSSFFSSFSSSSFSFFFSFSSF",
    "1/4": "FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS",
    "uniform-1/4": "".join("F" if (l < 2 or (l - 1) % 4 == 0) else "S" for l in range(47)),
}
PHASES = ("indexer", "topk", "attention", "ffn", "rest")
# BENCH_DEVICE=cpu with TRITON_INTERPRET=1 and --tiny is a smoke test of this script, no timing
DEV = os.environ.get("BENCH_DEVICE", "cuda")
# the interpreter has no bf16 tensor-core product (NumPy has no bf16): fp32 on the CPU
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
# token-expert pairs at or below which "auto" runs the gather MoE (decode: batch 1 has 4 pairs)
SMALL_MOE_PAIRS = 64
DECODE_MOE_PATHS = ("auto", "grouped", "gather")


class Cfg:
    layers = 47
    hidden = 2048
    heads = 20
    q_rank, kv_rank = 768, 512
    nope, rope, v_dim = 192, 64, 256
    experts, topk_experts, expert_width = 64, 4, 1536
    dense_width = 10240
    idx_heads, idx_dim, idx_topk = 32, 128, 2048


class TinyCfg(Cfg):
    """--tiny: the same structure at toy sizes, for the CPU smoke test."""
    layers = 4
    hidden = 64
    heads = 2
    q_rank, kv_rank = 32, 32
    nope, rope, v_dim = 16, 16, 16
    experts, topk_experts, expert_width = 8, 2, 32
    dense_width = 64
    idx_heads, idx_dim, idx_topk = 2, 16, 8


def _event():
    if DEV == "cuda":
        return torch.cuda.Event(enable_timing=True)
    return _CpuEvent()


class _CpuEvent:
    """torch.cuda.Event's record / elapsed_time (ms) on the host clock, for the CPU smoke test."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def rand(*shape, scale=None):
    w = torch.randn(*shape, device=DEV, dtype=DTYPE)
    return w * (scale if scale is not None else shape[-2] ** -0.5 if len(shape) >= 2 else 1.0)


class Weights:
    def __init__(self, c: Cfg):
        h = c.hidden
        self.wq_a = rand(h, c.q_rank)
        self.wq_b = rand(c.q_rank, c.heads * (c.nope + c.rope))
        self.wkv_a = rand(h, c.kv_rank + c.rope)
        self.w_uk = rand(c.heads, c.nope, c.kv_rank)          # absorbed into q: q_nope @ w_uk
        self.w_uv = rand(c.heads, c.kv_rank, c.v_dim)
        self.wo = rand(c.heads * c.v_dim, h)
        self.wi_q = rand(c.q_rank, c.idx_heads * c.idx_dim)
        self.wi_k = rand(h, c.idx_dim)
        self.wi_w = rand(h, c.idx_heads)
        self.dense_gu = rand(h, 2 * c.dense_width)
        self.dense_d = rand(c.dense_width, h)
        self.router = rand(h, c.experts, scale=0.02)
        self.exp_gu = rand(c.experts, h, 2 * c.expert_width)
        self.exp_d = rand(c.experts, c.expert_width, h)
        self.shared_gu = rand(h, 2 * c.expert_width)
        self.shared_d = rand(c.expert_width, h)


def rms(x):
    """RMSNorm without weight, in fp32 (one fused kernel where torch has it, as a serving engine would)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)


def rope_table(pos, d=64):
    """cos, sin (T, d/2) fp32 at absolute positions pos (T,): computed once per forward and shared by
    every layer's RoPE (query, key and indexer key), as serving engines cache them."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * inv[None]                          # (T, d/2)
    return ang.cos(), ang.sin()


def rope(x, table):
    """Rotate-half RoPE on the last dim of x (..., T, [heads,] 64) with table = rope_table(positions)."""
    d = x.shape[-1]
    cos, sin = table
    if x.dim() == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


def swiglu(h, gu, d):
    a, b = (h @ gu).chunk(2, dim=-1)
    return (F.silu(a) * b) @ d


def route(h, w: Weights, c: Cfg):
    """Router: softmax over the experts, top-k. Returns weights (T, k) fp32 and experts (T, k) int64."""
    logits = (h @ w.router).float()                                          # (T, E)
    return logits.softmax(-1).topk(c.topk_experts, dim=-1)


def resolved_moe_path(path: str, c: Cfg, tokens: int) -> str:
    """"grouped" or "gather": what moe() runs for this many tokens with path auto / grouped / gather."""
    small = tokens * c.topk_experts <= SMALL_MOE_PAIRS
    return "gather" if path == "gather" or (path == "auto" and small) else "grouped"


def moe(h, w: Weights, c: Cfg, grouped: dict, path: str = "auto"):
    """Routed top-4 of 64 experts + 1 shared. path "grouped": tokens sorted by expert, one grouped GEMM
    (torch._grouped_mm) when available, else one matmul per expert; "gather": Triton GEMVs that read
    only the selected experts' weights; "auto": gather for at most SMALL_MOE_PAIRS token-expert pairs."""
    top_w, top_e = route(h, w, c)                                            # (T, k), (T, k)
    if resolved_moe_path(path, c, h.shape[0]) == "gather":
        routed = moe_routed_gather(h, top_w, top_e, w.exp_gu, w.exp_d)       # (T, hidden) fp32
    else:
        routed = moe_routed_grouped(h, top_w, top_e, w, c, grouped)
    return (routed + swiglu(h, w.shared_gu, w.shared_d).float()).to(h.dtype)


def moe_routed_grouped(h, top_w, top_e, w: Weights, c: Cfg, grouped: dict):
    """Sum over the selected experts of top_w * expert(h), (T, hidden) fp32, as a grouped GEMM."""
    flat_e = top_e.reshape(-1)                                               # (T*k,)
    order = flat_e.argsort()
    tok = order // c.topk_experts
    xs = h[tok]                                                              # (T*k, hidden)
    # scatter_add, not bincount: bincount reads its max on the host, which breaks graph capture
    counts = torch.zeros(c.experts, dtype=torch.int64, device=h.device).scatter_add_(
        0, flat_e, torch.ones_like(flat_e))
    ys = None
    if grouped.get("ok", True):
        try:
            offs = counts.cumsum(0).to(torch.int32)
            gu = torch._grouped_mm(xs, w.exp_gu, offs=offs, out_dtype=torch.bfloat16)
            a, b = gu.chunk(2, dim=-1)
            ys = torch._grouped_mm((F.silu(a) * b).contiguous(), w.exp_d, offs=offs, out_dtype=torch.bfloat16)
            grouped["ok"] = True
        except Exception as e:  # older torch / unsupported: fall back, and say so in the results
            grouped["ok"] = False
            grouped["error"] = repr(e)[:300]
    if ys is None:
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                ys[start:start + n] = swiglu(xs[start:start + n], w.exp_gu[e], w.exp_d[e])
            start += n
    out = torch.zeros_like(h, dtype=torch.float32)
    out.index_add_(0, tok, ys.float() * top_w.reshape(-1)[order, None])
    return out


@triton.jit
def _moe_gate_up_kernel(x_ptr, e_ptr, w_ptr, act_ptr, K, N, sx_t, sw_e, sw_k, sa_p,
                        TOPK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """act[p, n] = silu(x[t] . w[e, :, n]) * (x[t] . w[e, :, N + n]), p = t * TOPK + j the token-expert
    pair, e = experts[p]: a GEMV over the selected expert's (K, 2N) gate|up matrix, nothing else read."""
    p = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    e = tl.load(e_ptr + p).to(tl.int64)
    x_row = x_ptr + (p // TOPK) * sx_t
    # elementwise partial products in registers, one reduction over K after the loop
    acc_a = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    acc_b = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)               # (BLOCK_K,)
        w_rows = w_ptr + e * sw_e + offs_k[:, None].to(tl.int64) * sw_k + offs_n[None, :]
        mask = k_ok[:, None] & n_ok[None, :]
        wa = tl.load(w_rows, mask=mask, other=0.0).to(tl.float32)                       # (BLOCK_K, BLOCK_N)
        wb = tl.load(w_rows + N, mask=mask, other=0.0).to(tl.float32)
        acc_a += x[:, None] * wa
        acc_b += x[:, None] * wb
    a = tl.sum(acc_a, 0)                                                                # (BLOCK_N,)
    b = tl.sum(acc_b, 0)
    act = a * tl.sigmoid(a) * b
    tl.store(act_ptr + p * sa_p + offs_n, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _moe_down_kernel(act_ptr, e_ptr, w_ptr, y_ptr, K, N, sa_p, sw_e, sw_k, sy_p,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[p, n] = act[p] . w[e, :, n] (fp32), e = experts[p]: a GEMV over the selected expert's (K, N)
    down matrix."""
    p = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    e = tl.load(e_ptr + p).to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(act_ptr + p * sa_p + offs_k, mask=k_ok, other=0.0).to(tl.float32)   # (BLOCK_K,)
        wd = tl.load(w_ptr + e * sw_e + offs_k[:, None].to(tl.int64) * sw_k + offs_n[None, :],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)      # (BLOCK_K, BLOCK_N)
        acc += a[:, None] * wd
    tl.store(y_ptr + p * sy_p + offs_n, tl.sum(acc, 0), mask=n_ok)


def moe_routed_gather(h, top_w, top_e, exp_gu, exp_d, block_k: int = 64, block_n: int = 32, num_warps: int = 4):
    """Triton twin of `moe_routed_loop`: sum_j top_w[t, j] * swiglu expert top_e[t, j] of h[t],
    (T, hidden) fp32. Reads only the selected experts' weight rows; no host sync (graph capturable).
    h (T, hidden); exp_gu (E, hidden, 2W) gate|up; exp_d (E, W, hidden)."""
    T, hidden = h.shape
    k = top_e.shape[1]
    width = exp_d.shape[1]
    if exp_gu.stride(2) != 1 or exp_d.stride(2) != 1:
        raise ValueError("exp_gu / exp_d: expected unit stride on the output dim; pass contiguous expert weights")
    h = h.contiguous()
    experts = top_e.reshape(-1).to(torch.int32).contiguous()                 # (P,) P = T*k pairs
    P = experts.shape[0]
    act = torch.empty(P, width, dtype=h.dtype, device=h.device)              # (P, W) silu(gate) * up
    _moe_gate_up_kernel[(P, triton.cdiv(width, block_n))](
        h, experts, exp_gu, act, hidden, width, h.stride(0), exp_gu.stride(0), exp_gu.stride(1),
        act.stride(0), TOPK=k, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps)
    y = torch.empty(P, hidden, dtype=torch.float32, device=h.device)         # (P, hidden) per pair
    _moe_down_kernel[(P, triton.cdiv(hidden, block_n))](
        act, experts, exp_d, y, width, hidden, act.stride(0), exp_d.stride(0), exp_d.stride(1),
        y.stride(0), BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps)
    return (y.view(T, k, hidden) * top_w.float()[..., None]).sum(1)           # (T, hidden)


def moe_routed_loop(h, top_w, top_e, exp_gu, exp_d):
    """The slow, obviously right twin of the routed experts: one token-expert pair at a time, fp32."""
    T, hidden = h.shape
    out = torch.zeros(T, hidden, dtype=torch.float32, device=h.device)
    for t in range(T):
        for j in range(top_e.shape[1]):
            e = int(top_e[t, j])
            out[t] += float(top_w[t, j]) * swiglu(h[t:t + 1].float(), exp_gu[e].float(), exp_d[e].float())[0]
    return out


class PhaseTimer:
    """Records CUDA events at phase boundaries; sums per phase after one synchronisation."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.marks = []

    def mark(self, phase):
        if self.enabled:
            ev = _event()
            ev.record()
            self.marks.append((phase, ev))

    def totals(self):
        _sync()
        out = {p: 0.0 for p in PHASES}
        for (phase, a), (_, b) in zip(self.marks, self.marks[1:]):
            if phase in out:
                out[phase] += a.elapsed_time(b) / 1e3
        return out


class ProfileMarks:
    """A PhaseTimer for torch.profiler: each mark closes the previous phase's range and opens the next
    ("phase:<name>"), so the profiler can sum the device time of the kernels launched inside each."""

    def __init__(self):
        self.current = None

    def mark(self, phase):
        if self.current is not None:
            self.current.__exit__(None, None, None)
            self.current = None
        if phase in PHASES:
            self.current = torch.profiler.record_function(f"phase:{phase}")
            self.current.__enter__()


class Model:
    def __init__(self, c: Cfg, w: Weights, max_len: int, pattern: str, fp8_indexer: bool, grouped: dict,
                 mla_cfg: dict, fp8_kv: bool = False):
        pattern = pattern[: c.layers]
        self.c, self.w, self.pattern, self.fp8 = c, w, pattern, fp8_indexer
        self.grouped, self.mla_cfg, self.fp8_kv = grouped, mla_cfg, fp8_kv
        self.moe_path = "auto"
        L = c.layers
        if fp8_kv:      # e4m3 latent + one fp32 scale per token; the RoPE key stays bf16
            self.latent8 = [torch.empty(1, max_len, c.kv_rank, device=DEV, dtype=torch.float8_e4m3fn)
                            for _ in range(L)]
            self.latent_scale = [torch.ones(1, max_len, device=DEV) for _ in range(L)]
            self.k_rope = [torch.empty(1, max_len, c.rope, device=DEV, dtype=DTYPE) for _ in range(L)]
        else:
            self.latent = [torch.empty(1, max_len, c.kv_rank + c.rope, device=DEV, dtype=DTYPE)
                           for _ in range(L)]
        # an S layer writes no indexer K cache and allocates none
        kdt = torch.float8_e4m3fn if fp8_indexer else DTYPE
        self.idx_k = [torch.empty(1, max_len, c.idx_dim, device=DEV, dtype=kdt) if p == "F" else None
                      for p in pattern]
        self.idx_ks = [torch.ones(1, max_len, device=DEV) if (p == "F" and fp8_indexer) else None
                       for p in pattern]

    def fill_random(self, n: int):
        """Caches of positions 0..n-1 hold random values (decode at context n without a prefill)."""
        c = self.c
        for l in range(c.layers):
            if self.fp8_kv:
                lat8, sc = quantize_latent_fp8(torch.randn(n, c.kv_rank, device=DEV))    # (n, 512), (n,)
                self.latent8[l][0, :n] = lat8
                self.latent_scale[l][0, :n] = sc
                self.k_rope[l][0, :n].normal_()
            else:
                self.latent[l][0, :n].normal_()
            if self.idx_k[l] is not None:
                self.idx_k[l][0, :n] = torch.randn(n, c.idx_dim, device=DEV).to(self.idx_k[l].dtype)

    def layer(self, l, x, rot, p0, idx_prev, timer, scores_buf):
        c, w = self.c, self.w
        T = x.shape[0]
        timer.mark("rest")
        h = rms(x)
        timer.mark("attention")
        q_lat = rms(h @ w.wq_a)                                               # (T, 768)
        q = (q_lat @ w.wq_b).view(T, c.heads, c.nope + c.rope)
        kv = h @ w.wkv_a                                                      # (T, 512 + 64)
        timer.mark("rest")
        q_rope = rope(q[..., c.nope:], rot)
        k_rope = rope(kv[:, c.kv_rank:], rot)
        if self.fp8_kv:
            lat8, lat_scale = quantize_latent_fp8(rms(kv[:, : c.kv_rank]))    # (T, 512) e4m3, (T,) fp32
            self.latent8[l][0, p0:p0 + T] = lat8
            self.latent_scale[l][0, p0:p0 + T] = lat_scale
            self.k_rope[l][0, p0:p0 + T] = k_rope
        else:
            self.latent[l][0, p0:p0 + T] = torch.cat([rms(kv[:, : c.kv_rank]), k_rope], -1)
        timer.mark("attention")
        q_abs = torch.einsum("thn,hnc->thc", q[..., : c.nope], w.w_uk)       # (T, 20, 512)
        q_full = torch.cat([q_abs, q_rope], -1)[None]                         # (1, T, 20, 576)
        qs = torch.full((1,), p0, dtype=torch.int64, device=DEV)
        kl = torch.full((1,), p0 + T, dtype=torch.int64, device=DEV)
        if self.pattern[l] == "F":
            timer.mark("indexer")
            iq = (q_lat @ w.wi_q).view(1, T, c.idx_heads, c.idx_dim)
            ik = F.layer_norm((h @ w.wi_k).float(), (c.idx_dim,)).to(DTYPE)
            ik = torch.cat([rope(ik[:, : c.rope], rot), ik[:, c.rope:]], -1)
            iw = (h @ w.wi_w).float()[None] * (c.idx_heads ** -0.5 * c.idx_dim ** -0.5)
            ks = None
            if self.fp8:
                iq, ik8, iw, ks_new = quantize_indexer_fp8(iq, ik[None], iw)
                self.idx_k[l][0, p0:p0 + T] = ik8[0]
                self.idx_ks[l][0, p0:p0 + T] = ks_new[0]
                ks = self.idx_ks[l][:, : p0 + T]
            else:
                self.idx_k[l][0, p0:p0 + T] = ik
            kcache = self.idx_k[l][:, : p0 + T]
            buf = scores_buf[:, :T, : p0 + T]
            indexer_scores_into(iq, kcache, iw.contiguous(), qs, kl, ks, 0, T, buf, write_all=T <= 16)
            timer.mark("topk")
            idx = torch.empty(1, T, c.idx_topk, dtype=torch.int32, device=DEV)
            if T <= 16:      # decode: too few rows for the per-row radix kernel
                v, i = buf.topk(min(c.idx_topk, p0 + T), dim=-1)
                idx[..., : i.shape[-1]] = i.to(torch.int32).masked_fill_(v == float("-inf"), -1)
                idx[..., i.shape[-1]:] = -1
            else:
                topk_rows_into(buf, idx, qs, kl, 0, c.idx_topk)
            idx_prev = idx
        timer.mark("attention")
        scale = (c.nope + c.rope) ** -0.5
        if self.fp8_kv:
            o = sparse_attention_mla_fp8(q_full, self.latent8[l][:, : p0 + T], self.latent_scale[l][:, : p0 + T],
                                         self.k_rope[l][:, : p0 + T], idx_prev, scale, **self.mla_cfg)
        else:
            o = sparse_attention_mla(q_full, self.latent[l][:, : p0 + T], idx_prev, scale, c.kv_rank,
                                     **self.mla_cfg)
        o = torch.einsum("thc,hcv->thv", o[0], w.w_uv).reshape(T, c.heads * c.v_dim) @ w.wo
        timer.mark("rest")
        x = x + o
        h = rms(x)
        timer.mark("ffn")
        f = swiglu(h, w.dense_gu, w.dense_d) if l == 0 else moe(h, w, c, self.grouped, self.moe_path)
        timer.mark("rest")
        return x + f, idx_prev

    def forward(self, x, p0, timer, scores_buf):
        rot = rope_table(torch.arange(p0, p0 + x.shape[0], device=DEV), self.c.rope)   # shared by all layers
        idx = None
        for l in range(self.c.layers):
            x, idx = self.layer(l, x, rot, p0, idx, timer, scores_buf)
        timer.mark("end")
        return x


def prefill(model: Model, n: int, chunk: int):
    c = model.c
    model.moe_path = "auto"
    scores_buf = torch.empty(1, chunk, n, device=DEV)
    timer = PhaseTimer()
    _sync()
    t0 = time.perf_counter()
    start, end = _event(), _event()
    start.record()
    for p0 in range(0, n, chunk):
        T = min(chunk, n - p0)
        x = torch.randn(T, c.hidden, device=DEV, dtype=DTYPE)
        model.forward(x, p0, timer, scores_buf)
    end.record()
    _sync()
    wall = time.perf_counter() - t0
    phases = timer.totals()
    return {"prefill_s": start.elapsed_time(end) / 1e3, "prefill_wall_s": wall, "phases": phases}


def _capture(model: Model, x, n, scores_buf):
    """One decode step as a CUDA graph (after a warm-up on a side stream), or None on the CPU."""
    if DEV != "cuda":
        return None
    off = PhaseTimer(enabled=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model.forward(x, n, off, scores_buf)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.forward(x, n, off, scores_buf)
    graph.replay()
    torch.cuda.synchronize()
    return graph


def _time_steps(step, steps):
    _sync()
    a, b = _event(), _event()
    a.record()
    for _ in range(steps):
        step()
    b.record()
    _sync()
    return a.elapsed_time(b) / 1e3 / steps


def decode(model: Model, n: int, steps: int = 20, decode_moe: str = "auto", profile: bool = False):
    """Per-token latency at context n (batch 1), caches holding random values, with each MoE path
    (the chosen one first); per-phase split from one eager step with events (launch gaps included)."""
    c = model.c
    model.fill_random(n)
    scores_buf = torch.empty(1, 1, n + 1, device=DEV)
    x = torch.randn(1, c.hidden, device=DEV, dtype=DTYPE)
    off = PhaseTimer(enabled=False)
    chosen = resolved_moe_path(decode_moe, c, tokens=1)
    result = {"decode_moe": chosen}
    model.moe_path = chosen
    model.forward(x, n, off, scores_buf)
    timer = PhaseTimer()
    model.forward(x, n, timer, scores_buf)
    result["decode_phases_eager"] = timer.totals()
    for path in (chosen, "grouped" if chosen == "gather" else "gather"):
        model.moe_path = path
        graph, err = None, None
        try:
            graph = _capture(model, x, n, scores_buf)
            err = None if graph is not None else "no CUDA graphs on the CPU"
        except Exception as e:  # MoE fallback path syncs and cannot be captured: time eager instead
            err = repr(e)[:300]
            _sync()
        if graph is not None:
            per_token = _time_steps(graph.replay, steps)
        else:
            per_token = _time_steps(lambda: model.forward(x, n, off, scores_buf), steps)
        result[f"decode_s_per_token_{path}_moe"] = per_token
        result[f"decode_tokens_per_s_{path}_moe"] = 1.0 / per_token
        result[f"decode_graph_{path}_moe"] = graph is not None
        if err:
            result[f"decode_graph_error_{path}_moe"] = err
        if path == chosen:
            result["decode_graph"] = graph is not None
            if err:
                result["decode_graph_error"] = err
            result["decode_s_per_token"] = per_token
            result["decode_tokens_per_s"] = 1.0 / per_token
        if profile:
            result[f"decode_profile_{path}_moe"] = profile_replays(graph, model, x, n, scores_buf, per_token)
        del graph
    if profile:
        model.moe_path = chosen
        result["decode_profile_phases"] = profile_phases(model, x, n, scores_buf)
    model.moe_path = "auto"
    return result


PROFILE_REPLAYS = 5
PROFILE_TOP = 25


def _activities():
    acts = [torch.profiler.ProfilerActivity.CPU]
    if DEV == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def _device_events(prof):
    """(name, microseconds) of every device-side event (kernels, memcpy, memset); the host ops' own time
    on the CPU smoke test. Profiler ranges mirrored on the GPU ("phase:...", "ProfilerStep") are left out."""
    from torch.autograd import DeviceType
    events = prof.events()
    dev = [(e.name, e.time_range.elapsed_us()) for e in events
           if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
           and not e.name.startswith(("phase:", "ProfilerStep"))]
    if dev or DEV == "cuda":
        return dev
    return [(e.name, e.self_cpu_time_total) for e in events
            if e.device_type == DeviceType.CPU and not e.name.startswith("phase:")]


def _kernel_table(events, steps):
    totals, counts = {}, {}
    for name, us in events:
        totals[name] = totals.get(name, 0.0) + us
        counts[name] = counts.get(name, 0) + 1
    rows = sorted(totals, key=totals.get, reverse=True)
    return [{"kernel": name[:160], "ms_per_token": totals[name] / steps / 1e3,
             "calls_per_token": counts[name] / steps} for name in rows[:PROFILE_TOP]], sum(totals.values()) / steps / 1e3


def profile_replays(graph, model, x, n, scores_buf, per_token):
    """Top kernels by device time per decode token over PROFILE_REPLAYS graph replays (eager steps
    where the graph could not be captured or its kernels do not show)."""
    off = PhaseTimer(enabled=False)
    step = graph.replay if graph is not None else (lambda: model.forward(x, n, off, scores_buf))
    _sync()
    try:
        with torch.profiler.profile(activities=_activities()) as prof:
            for _ in range(PROFILE_REPLAYS):
                step()
            _sync()
        events = _device_events(prof)
        source = "graph" if graph is not None else "eager"
        if not events and graph is not None:            # graph kernels not traced: profile eager steps
            with torch.profiler.profile(activities=_activities()) as prof:
                for _ in range(PROFILE_REPLAYS):
                    model.forward(x, n, off, scores_buf)
                _sync()
            events, source = _device_events(prof), "eager (graph kernels not traced)"
        top, total_ms = _kernel_table(events, PROFILE_REPLAYS)
    except Exception as e:  # the profile is a diagnostic: never lose the run for it
        return {"error": repr(e)[:300]}
    return {"source": source, "steps": PROFILE_REPLAYS, "kernel_ms_per_token": total_ms,
            "step_ms_per_token": per_token * 1e3, "top": top}


def _kernel_us(e):
    """Device time of the kernels launched under host event e and its children (not the GPU copy of a
    profiler range, which the profiler may list among the kernels)."""
    own = sum(k.duration for k in e.kernels if not k.name.startswith("phase:"))
    return own + sum(_kernel_us(ch) for ch in e.cpu_children)


def profile_phases(model, x, n, scores_buf):
    """Kernel time per phase of one eager decode step (device time of the kernels launched inside each
    phase's profiler range; launch gaps excluded, unlike decode_phases_eager)."""
    marks = ProfileMarks()
    try:
        _sync()
        with torch.profiler.profile(activities=_activities()) as prof:
            model.forward(x, n, marks, scores_buf)
            _sync()
        out = {p: 0.0 for p in PHASES}
        for e in prof.events():
            if e.name.startswith("phase:") and e.device_type == torch.autograd.DeviceType.CPU:
                us = _kernel_us(e) if DEV == "cuda" else e.cpu_time_total
                out[e.name[len("phase:"):]] += us / 1e3
        out = {f"{p}_ms": v for p, v in out.items()}
        out["total_ms"] = sum(out.values())
        return out
    except Exception as e:
        return {"error": repr(e)[:300]}


def phase_rates(row, c: Cfg, peaks: dict):
    """Achieved rates of the prefill phases from their summed times (useful work only):
    indexer FLOPs over indexer + top-k time (the fused indexer's whole cost) and over the score
    stage alone; sparse MLA FLOPs and gathered bytes over attention time; MoE/FFN FLOPs."""
    n, ph = row["context"], row["phases"]
    f_layers = row["full_layers"]
    idx_flops = f_layers * (n * (n + 1) / 2) * c.idx_heads * c.idx_dim * 2
    attn_flops = c.layers * n * c.heads * min(c.idx_topk, n) * (2 * c.kv_rank + c.rope) * 2
    # bytes gathered per selected key: bf16 latent + rope, or e4m3 latent + bf16 rope + fp32 scale
    key_bytes = c.kv_rank + 2 * c.rope + 4 if row.get("fp8_kv") else (c.kv_rank + c.rope) * 2
    attn_bytes = c.layers * n * min(c.idx_topk, n) * key_bytes
    expert = 3 * c.hidden * c.expert_width * 2
    ffn_flops = n * ((c.layers - 1) * (c.topk_experts + 1) * expert + 3 * c.hidden * c.dense_width * 2)
    out = {
        "indexer_scores_tflops": idx_flops / ph["indexer"] / 1e12,
        "indexer_with_topk_tflops": idx_flops / (ph["indexer"] + ph["topk"]) / 1e12,
        "attention_tflops": attn_flops / ph["attention"] / 1e12,
        "attention_gather_tbps": attn_bytes / ph["attention"] / 1e12,
        "ffn_tflops": ffn_flops / ph["ffn"] / 1e12,
    }
    if peaks:
        ipk = peaks["fp8_tflops"] if row.get("fp8_indexer", True) else peaks["bf16_tflops"]
        out["indexer_with_topk_frac_peak"] = out["indexer_with_topk_tflops"] / ipk
        out["attention_gather_frac_copy_bw"] = out["attention_gather_tbps"] / peaks["copy_tbps"]
        out["ffn_frac_peak"] = out["ffn_tflops"] / peaks["bf16_tflops"]
    return out


def report(path, peaks_path):
    """Re-print a saved run with the per-phase rates (peaks from a bench_kernels.json)."""
    res = json.load(open(path))
    peaks = json.load(open(peaks_path))["peaks"] if peaks_path else {}
    print_table(res)
    print(f"\nrates (peaks: {peaks})")
    for r in res["runs"]:
        if "phases" in r:
            r["fp8_indexer"] = res["fp8_indexer"]
            r["fp8_kv"] = res.get("fp8_kv", False)
            rates = phase_rates(r, TinyCfg() if res.get("tiny") else Cfg(), peaks)
            print(f"{r['pattern']:>12} {r['context']:>7}: " + "  ".join(f"{k} {v:.2f}" for k, v in rates.items()))


def best_mla_config(path):
    if not path or not os.path.exists(path):
        return {}
    rows = [r for r in json.load(open(path)).get("mla", []) if r.get("queries", 0) > 1 and "error" not in r]
    if not rows:
        return {}
    best = min(rows, key=lambda r: r["s"])
    return {k: best[k] for k in ("block_k", "num_warps", "num_stages") if k in best}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_model.json")
    ap.add_argument("--contexts", default="16384,65536,131072,200000")
    ap.add_argument("--patterns", default="all-F,1/2,1/4,uniform-1/4")
    ap.add_argument("--prefill-patterns-max-context", type=int, default=10 ** 9,
                    help="above this context, prefill only all-F and 1/4 (saves device time)")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--fp8-indexer", action="store_true")
    ap.add_argument("--time-budget", type=float, default=400.0, help="seconds; later runs are skipped")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--warmup-tokens", type=int, default=8192)
    ap.add_argument("--mla-config-from", default="", help="bench_kernels.json: use its fastest MLA tile sweep entry")
    ap.add_argument("--report", default="", help="only re-print this saved bench_model.json, with rates")
    ap.add_argument("--peaks-from", default="", help="bench_kernels.json whose measured peaks --report uses")
    ap.add_argument("--decode-moe", choices=DECODE_MOE_PATHS, default="auto",
                    help="MoE path of the reported decode_tokens_per_s (auto: gather at batch 1); both paths "
                         "are timed either way (decode_tokens_per_s_gather_moe / _grouped_moe)")
    ap.add_argument("--fp8-kv", action="store_true",
                    help="latent KV cache as e4m3 + one fp32 scale per token (RoPE key bf16), FP8-latent MLA kernel")
    ap.add_argument("--profile-decode", action="store_true",
                    help="at the largest context (all-F pattern): torch.profiler kernel table per decode token "
                         "(profiled after that run's timed replays)")
    ap.add_argument("--prefill-max-context", type=int, default=10 ** 9,
                    help="above this context, no prefill (decode only; saves device time)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (TinyCfg): the CPU smoke test")
    args = ap.parse_args()
    if args.report:
        return report(args.report, args.peaks_from)
    torch.backends.cuda.matmul.allow_tf32 = True
    c = TinyCfg() if args.tiny else Cfg()
    contexts = [int(x) for x in args.contexts.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__,
           "commit": commit or os.environ.get("BENCH_COMMIT", "?"), "chunk": args.chunk,
           "fp8_indexer": args.fp8_indexer, "fp8_kv": args.fp8_kv, "decode_moe": args.decode_moe,
           "small_moe_pairs": SMALL_MOE_PAIRS, "tiny": args.tiny, "runs": [], "skipped": []}
    t_start = time.time()
    w = Weights(c)
    grouped = {}
    mla_cfg = best_mla_config(args.mla_config_from)
    res["mla_config"] = mla_cfg
    # warm-up: compile the kernels and the grouped GEMM path on a short prefill
    wt = args.warmup_tokens
    prefill(Model(c, w, wt, "F" * (c.layers - 1) + "S", args.fp8_indexer, grouped, mla_cfg, args.fp8_kv), wt, wt // 2)
    names = args.patterns.split(",")
    profile_name = "all-F" if "all-F" in names else names[0]     # --profile-decode: this pattern at the largest context
    for n in contexts:                      # contexts outer: a time-budget cut keeps whole comparisons
        for name in names:
            pattern = PATTERNS[name][: c.layers]
            if time.time() - t_start > args.time_budget:
                res["skipped"].append({"pattern": name, "context": n})
                continue
            row = {"pattern": name, "full_layers": pattern.count("F"), "context": n}
            try:
                model = Model(c, w, n + 1, pattern, args.fp8_indexer, grouped, mla_cfg, args.fp8_kv)
                if n <= args.prefill_max_context and (n <= args.prefill_patterns_max_context
                                                      or name in ("all-F", "1/4")):
                    row.update(prefill(model, n, args.chunk))
                if not args.no_decode:
                    profile = args.profile_decode and n == max(contexts) and name == profile_name
                    row.update(decode(model, n, decode_moe=args.decode_moe, profile=profile))
                    if profile:      # the profile goes beside the runs, not into their rows
                        res["decode_profile"] = {"pattern": name, "context": n, **{
                            k: row.pop(k) for k in [k for k in row if k.startswith("decode_profile")]}}
                del model
            except Exception as e:
                row["error"] = repr(e)[:500]
            row["moe_grouped_gemm"] = grouped.get("ok")
            res["runs"].append(row)
            print("run", json.dumps(row), flush=True)
            if DEV == "cuda":
                torch.cuda.empty_cache()
    res["moe_grouped_error"] = grouped.get("error")
    res["wall_s"] = time.time() - t_start
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print_table(res)


def print_table(res):
    print(f"\n{res['gpu']} torch {res['torch']} commit {res['commit']} chunk {res['chunk']} "
          f"fp8 indexer {res['fp8_indexer']} fp8 KV {res.get('fp8_kv', False)} decode MoE {res.get('decode_moe', 'grouped')}")
    print(f"{'pattern':>12} {'F':>3} {'ctx':>7} {'prefill s':>9} | {'indexer':>7} {'topk':>6} {'attn':>6} "
          f"{'ffn':>6} {'rest':>6} | {'tok/s':>6} {'gather':>6} {'grouped':>7}")
    base = {}
    for r in res["runs"]:
        if "error" in r:
            print(f"{r['pattern']:>12} {r['full_layers']:>3} {r['context']:>7} ERROR {r['error'][:90]}")
            continue
        ph = r.get("phases", {})
        pre = r.get("prefill_s", float("nan"))
        if r["pattern"] == "all-F":
            base[r["context"]] = r
        print(f"{r['pattern']:>12} {r['full_layers']:>3} {r['context']:>7} {pre:9.2f} | "
              + " ".join(f"{ph.get(p, float('nan')):6.2f}" for p in PHASES)
              + f" | {r.get('decode_tokens_per_s', float('nan')):6.1f}"
              + f" {r.get('decode_tokens_per_s_gather_moe', float('nan')):6.1f}"
              + f" {r.get('decode_tokens_per_s_grouped_moe', float('nan')):7.1f}")
    nan = float("nan")
    for r in res["runs"]:
        b = base.get(r["context"])
        if b and r["pattern"] != "all-F" and "error" not in r:
            sp = b.get("prefill_s", nan) / r.get("prefill_s", nan)
            sd = r.get("decode_tokens_per_s", nan) / b.get("decode_tokens_per_s", nan)
            sdg = r.get("decode_tokens_per_s_grouped_moe", nan) / b.get("decode_tokens_per_s_grouped_moe", nan)
            print(f"speedup {r['pattern']:>12} @ {r['context']:>7}: prefill {sp:.2f}x  decode {sd:.2f}x "
                  f"(grouped MoE {sdg:.2f}x)")
    for r in res["runs"]:
        if "decode_tokens_per_s_gather_moe" in r and "decode_tokens_per_s_grouped_moe" in r:
            print(f"decode MoE gather / grouped {r['pattern']:>12} @ {r['context']:>7}: "
                  f"{r['decode_tokens_per_s_gather_moe'] / r['decode_tokens_per_s_grouped_moe']:.2f}x")
    if "decode_profile" in res:
        print_decode_profile(res["decode_profile"])
    if res["skipped"]:
        print("skipped (time budget):", res["skipped"])


def print_decode_profile(prof):
    title = f"decode profile {prof['pattern']} @ {prof['context']}"
    if "error" in prof:
        print(f"\n{title}: ERROR {prof['error']}")
    for key in sorted(k for k in prof if k.startswith("decode_profile")):
        print_profile(f"{title}: {key[len('decode_profile_'):]}", prof[key])
    sys.stdout.flush()


def print_profile(title, prof):
    if "error" in prof:
        print(f"\n{title}: ERROR {prof['error']}")
        return
    if "top" not in prof:       # kernel time per phase
        print(f"\n{title} (kernel ms per token): " + "  ".join(f"{k} {v:.3f}" for k, v in prof.items()))
        return
    print(f"\n{title}: {prof['source']}, kernels {prof['kernel_ms_per_token']:.3f} ms of "
          f"{prof['step_ms_per_token']:.3f} ms per token")
    for row in prof["top"]:
        print(f"  {row['ms_per_token']:8.3f} ms {row['calls_per_token']:6.1f} x  {row['kernel'][:110]}")


if __name__ == "__main__":
    main()
