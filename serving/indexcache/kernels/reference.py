"""Plain-PyTorch references for the DSA kernels: the lightning indexer and sparse attention.

These are the CPU implementations the model uses and the twins every Triton kernel is tested
against. They compute in fp32 whatever the input dtype, and work on chunks of queries so that
an 8K-token context fits in a few hundred MB on a CPU (the full [T, H, S] indexer tensor at 8K
with 32 heads would be 8 GiB).

Shapes (B batch, T queries, S keys/cache slots, H heads, D head dim, K selected keys):
  indexer:   q (B, T, H, D), k (B, S, D), weights (B, T, H) fp32, q_start / kv_len (B,) int64
  gqa:       q (B, T, Hq, Dh), k / v (B, S, Hkv, Dh), indices (B, T, K) int32
  mla:       q (B, T, H, Dc + Dr), kv (B, S, Dc + Dr), indices (B, T, K) int32
  mla fp8:   q (B, T, H, Dc + Dr), latent8 (B, S, Dc) e4m3, latent_scale (B, S) fp32, k_rope (B, S, Dr)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest fp32 intermediate per chunk, in elements (64 Mi elements = 256 MiB).
_CHUNK_ELEMENTS = 1 << 26

FP8_DTYPES = (torch.float8_e4m3fn,)
# Largest finite e4m3 value: the per-row scale maps each row's absolute maximum here.
FP8_E4M3_MAX = 448.0


def _fail(field: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{field}: {problem}; {fix}")


def check_indexer_inputs(q, k, weights, q_start, kv_len, k_scale=None, topk=None) -> None:
    """Shape/dtype checks shared by the reference and the Triton wrappers (clear errors, no sync)."""
    if q.dim() != 4:
        raise _fail("q", f"expected 4 dims (B, T, H, D), got shape {tuple(q.shape)}",
                    "pass the indexer query as (batch, tokens, heads, head_dim)")
    B, T, H, D = q.shape
    if k.dim() != 3 or k.shape[0] != B or k.shape[2] != D:
        raise _fail("k", f"expected (B={B}, S, D={D}), got shape {tuple(k.shape)}",
                    "pass the indexer K cache as (batch, slots, head_dim) with q's batch and head_dim")
    if tuple(weights.shape) != (B, T, H):
        raise _fail("weights", f"expected (B, T, H) = {(B, T, H)}, got {tuple(weights.shape)}",
                    "pass one weight per query token and indexer head")
    for name, t in (("q_start", q_start), ("kv_len", kv_len)):
        if tuple(t.shape) != (B,) or t.dtype not in (torch.int64, torch.int32):
            raise _fail(name, f"expected an int64 tensor of shape ({B},), got {t.dtype} {tuple(t.shape)}",
                        "pass one integer position per sequence")
    fp8 = q.dtype in FP8_DTYPES
    if fp8 != (k.dtype in FP8_DTYPES):
        raise _fail("k", f"q is {q.dtype} but k is {k.dtype}",
                    "quantize both q and k with quantize_indexer_fp8, or neither")
    if fp8 and (k_scale is None or tuple(k_scale.shape) != (B, k.shape[1])):
        raise _fail("k_scale", "the FP8 indexer needs one fp32 scale per key, shape (B, S)",
                    "use the k_scale returned by quantize_indexer_fp8")
    if topk is not None and topk <= 0:
        raise _fail("topk", f"must be positive, got {topk}", "pass the model's index_topk (e.g. 2048)")


def check_sparse_inputs(q, indices, kv_batch: int, name_kv: str) -> None:
    if q.dim() != 4:
        raise _fail("q", f"expected 4 dims (B, T, H, D), got shape {tuple(q.shape)}",
                    "pass queries as (batch, tokens, heads, head_dim)")
    B, T = q.shape[:2]
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (B, T):
        raise _fail("indices", f"expected (B={B}, T={T}, K), got {tuple(indices.shape)}",
                    "pass the indexer's top-k output for these queries")
    if indices.dtype not in (torch.int32, torch.int64):
        raise _fail("indices", f"expected int32, got {indices.dtype}", "use indexer_topk's output")
    if kv_batch != B:
        raise _fail(name_kv, f"batch {kv_batch} differs from q's batch {B}", "pass the cache of the same sequences")


# ---------------------------------------------------------------------------------------------
# FP8 (e4m3) quantisation of the indexer inputs
# ---------------------------------------------------------------------------------------------

def quantize_indexer_fp8(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor):
    """Scaled e4m3 copies of q and k for the FP8 indexer.

    q gets one scale per (token, head) and k one per key. Both scales are positive, so they come
    out of the ReLU: relu(sq*q8 . sk*k8) = sq*sk*relu(q8 . k8). sq is folded into the head weights
    and sk is returned to multiply each key's score.
    Returns (q8 (B,T,H,D), k8 (B,S,D), weights * sq (B,T,H) fp32, k_scale (B,S) fp32).
    """
    qf, kf = q.float(), k.float()
    q_scale = qf.abs().amax(dim=-1).clamp_min(1e-12) / FP8_E4M3_MAX  # (B, T, H)
    k_scale = kf.abs().amax(dim=-1).clamp_min(1e-12) / FP8_E4M3_MAX  # (B, S)
    q8 = (qf / q_scale[..., None]).to(torch.float8_e4m3fn)
    k8 = (kf / k_scale[..., None]).to(torch.float8_e4m3fn)
    return q8, k8, weights.float() * q_scale, k_scale.float()


def ref_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, offset: int = 0,
             rope_dim: int | None = None) -> torch.Tensor:
    """Rotary embedding of dims [offset, offset + rope_dim) of x (B, T, H, D); the other dims are copied.
    cos, sin (B, T, rope_dim/2) fp32. Interleaved pairs (2i, 2i+1) (DeepSeek) or rotate-half
    (i, i + rope_dim/2) (Llama/HF), computed in fp32 and rounded once to x's dtype."""
    rope_dim = x.shape[-1] - offset if rope_dim is None else rope_dim
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]                     # (B, T, 1, rope_dim/2)
    xf = x[..., offset: offset + rope_dim].float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    if offset == 0 and rope_dim == x.shape[-1]:
        return rotated.to(x.dtype)
    return torch.cat([x[..., :offset], rotated.to(x.dtype), x[..., offset + rope_dim:]], dim=-1)


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) in fp32 (one fused kernel), rounded to x's dtype, then times the weight."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def ref_quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., N) -> (x8 (..., N) e4m3, scale (...) fp32): one scale per row, amax / 448 (floored at 1e-12 / 448)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-12) / FP8_E4M3_MAX
    return (xf / scale[..., None]).to(torch.float8_e4m3fn), scale


def quantize_latent_fp8(latent: torch.Tensor):
    """FP8 latent KV cache rows: (..., S, Dc) -> (latent8 (..., S, Dc) e4m3, scale (..., S) fp32).

    One scale per token row, amax / 448, so latent8 * scale[..., None] is the latent to e4m3's
    precision (3 mantissa bits: within 1/16 of each element, relative). The scale factors out of both
    attention products (q . (s k8) = s (q . k8); sum_j p_j s_j k8_j = (p * s) @ k8), so a kernel reads
    the 1-byte rows and one fp32 per key instead of 2-byte rows (DeepSeek-V3.2's FP8 KV cache).
    """
    lf = latent.float()
    scale = lf.abs().amax(dim=-1).clamp_min(1e-12) / FP8_E4M3_MAX     # (..., S)
    return (lf / scale[..., None]).to(torch.float8_e4m3fn), scale


def dequantize_latent_fp8(latent8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(..., S, Dc) e4m3 and (..., S) fp32 -> (..., S, Dc) fp32."""
    return latent8.float() * scale.float()[..., None]


# ---------------------------------------------------------------------------------------------
# Lightning indexer
# ---------------------------------------------------------------------------------------------

def _score_chunk(qb, kb, wb, ksb, t0, t1, q_start_b, kv_len_b):
    """Scores of queries t0..t1 of one sequence: (t1-t0, S) fp32, -inf where invalid."""
    S = kb.shape[0]
    q = qb[t0:t1].float()                                        # (t, H, D)
    logits = torch.einsum("thd,sd->ths", q, kb)                  # (t, H, S)
    scores = torch.einsum("ths,th->ts", logits.relu_(), wb[t0:t1].float())  # (t, S)
    if ksb is not None:
        scores = scores * ksb[None, :]
    pos = torch.arange(S, device=qb.device)
    limit = q_start_b + torch.arange(t0, t1, device=qb.device)   # last visible key per query
    valid = (pos[None, :] <= limit[:, None]) & (pos[None, :] < kv_len_b)
    return scores.masked_fill_(~valid, float("-inf"))


def _query_chunks(T: int, H: int, S: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, H * S))
    for t0 in range(0, T, step):
        yield t0, min(T, t0 + step)


def ref_indexer_scores(q, k, weights, q_start, kv_len, k_scale=None) -> torch.Tensor:
    """score[b,t,s] = sum_h weights[b,t,h] * relu(q[b,t,h] . k[b,s]) (* k_scale[b,s] for FP8);
    -inf unless s <= q_start[b] + t and s < kv_len[b]. Returns (B, T, S) fp32."""
    check_indexer_inputs(q, k, weights, q_start, kv_len, k_scale)
    B, T, H, _ = q.shape
    S = k.shape[1]
    out = torch.empty(B, T, S, dtype=torch.float32, device=q.device)
    for b in range(B):
        kb = k[b].float()
        ksb = None if k_scale is None else k_scale[b].float()
        qs, kl = int(q_start[b]), int(kv_len[b])
        for t0, t1 in _query_chunks(T, H, S):
            out[b, t0:t1] = _score_chunk(q[b], kb, weights[b], ksb, t0, t1, qs, kl)
    return out


def ref_indexer_topk(q, k, weights, topk: int, q_start, kv_len, k_scale=None) -> torch.Tensor:
    """(B, T, topk) int32 indices of the top-k valid keys per query (any order); -1 pads rows
    that see fewer than topk valid keys."""
    check_indexer_inputs(q, k, weights, q_start, kv_len, k_scale, topk)
    B, T, H, _ = q.shape
    S = k.shape[1]
    out = torch.full((B, T, topk), -1, dtype=torch.int32, device=q.device)
    kk = min(topk, S)
    if kk == 0:
        return out
    for b in range(B):
        kb = k[b].float()
        ksb = None if k_scale is None else k_scale[b].float()
        qs, kl = int(q_start[b]), int(kv_len[b])
        for t0, t1 in _query_chunks(T, H, S):
            scores = _score_chunk(q[b], kb, weights[b], ksb, t0, t1, qs, kl)
            values, idx = scores.topk(kk, dim=-1)
            idx = idx.to(torch.int32).masked_fill_(values == float("-inf"), -1)
            out[b, t0:t1, :kk] = idx
    return out


# ---------------------------------------------------------------------------------------------
# Sparse attention over selected keys
# ---------------------------------------------------------------------------------------------

def _sparse_attend(q, keys, values, idx, scale, group):
    """q (t, Hq, Dk) fp32; keys (S, Hkv, Dk); values (S, Hkv, Dv); idx (t, K) with -1 = none.
    Returns (t, Hq, Dv) fp32; rows with no valid index are zeros. Query head h reads KV head
    h // group, so q is viewed as (t, Hkv, group, Dk) instead of copying the KV heads."""
    t, Hq, Dk = q.shape
    Hkv = keys.shape[1]
    valid = idx >= 0                                             # (t, K)
    safe = idx.clamp_min(0).long()
    kg = keys[safe].float()                                      # (t, K, Hkv, Dk)
    vg = values[safe].float()                                    # (t, K, Hkv, Dv)
    qg = q.reshape(t, Hkv, group, Dk)
    logits = torch.einsum("tngd,tknd->tngk", qg, kg) * scale     # (t, Hkv, g, K)
    logits = logits.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)      # all -inf row -> zeros
    out = torch.einsum("tngk,tknd->tngd", probs, vg)             # (t, Hkv, g, Dv)
    return out.reshape(t, Hq, vg.shape[-1])


def _check_index_range(indices, S: int) -> None:
    if indices.numel() and int(indices.max()) >= S:
        raise _fail("indices", f"index {int(indices.max())} is past the cache length {S}",
                    "select only cache slots below the cache length (use -1 for none)")


def ref_sparse_attention_gqa(q, k, v, indices, scale: float) -> torch.Tensor:
    """out[b,t,h] = softmax_j(scale * q[b,t,h] . k[b,idx_j,h//g]) @ v[b,idx_j,h//g], g = Hq // Hkv,
    over the valid (>= 0) indices idx = indices[b,t]. (B, T, Hq, Dh) in q's dtype."""
    check_sparse_inputs(q, indices, k.shape[0], "k")
    B, T, Hq, Dh = q.shape
    if k.dim() != 4 or k.shape != v.shape[:3] + (k.shape[3],) or k.shape[3] != Dh:
        raise _fail("k", f"expected k, v as (B, S, Hkv, {Dh}), got {tuple(k.shape)} / {tuple(v.shape)}",
                    "pass the KV cache as (batch, slots, kv_heads, head_dim)")
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise _fail("q", f"{Hq} query heads are not a multiple of {Hkv} KV heads", "check num_key_value_heads")
    _check_index_range(indices, k.shape[1])
    out = torch.empty(B, T, Hq, v.shape[3], dtype=q.dtype, device=q.device)
    K = indices.shape[2]
    for b in range(B):
        for t0, t1 in _query_chunks(T, Hq + k.shape[2] * 2, K * Dh):
            out[b, t0:t1] = _sparse_attend(q[b, t0:t1].float(), k[b], v[b], indices[b, t0:t1],
                                           scale, Hq // Hkv).to(q.dtype)
    return out


def ref_sparse_attention_mla(q, kv, indices, scale: float, v_dim: int) -> torch.Tensor:
    """Absorbed MLA: out[b,t,h] = softmax_j(scale * q[b,t,h] . kv[b,idx_j]) @ kv[b,idx_j,:v_dim].
    q (B, T, H, Dc+Dr), kv (B, S, Dc+Dr). Returns (B, T, H, v_dim) in q's dtype."""
    check_sparse_inputs(q, indices, kv.shape[0], "kv")
    B, T, H, Dq = q.shape
    if kv.dim() != 3 or kv.shape[2] != Dq:
        raise _fail("kv", f"expected (B, S, {Dq}), got {tuple(kv.shape)}",
                    "pass the latent cache (normalised latent then RoPE key) with q's last dim")
    if not 0 < v_dim <= Dq:
        raise _fail("v_dim", f"must be in 1..{Dq}, got {v_dim}", "pass kv_lora_rank")
    _check_index_range(indices, kv.shape[1])
    out = torch.empty(B, T, H, v_dim, dtype=q.dtype, device=q.device)
    K = indices.shape[2]
    for b in range(B):
        keys = kv[b][:, None, :]                                 # (S, 1, Dc+Dr): one shared head
        for t0, t1 in _query_chunks(T, H + 2, K * Dq):
            out[b, t0:t1] = _sparse_attend(q[b, t0:t1].float(), keys, keys[..., :v_dim],
                                           indices[b, t0:t1], scale, H).to(q.dtype)
    return out


def check_mla_fp8_inputs(q, latent8, latent_scale, k_rope, indices) -> None:
    """Shape/dtype checks of the FP8-latent MLA cache, shared by the reference and the Triton wrapper."""
    check_sparse_inputs(q, indices, latent8.shape[0], "latent8")
    B, Dq = q.shape[0], q.shape[3]
    if latent8.dim() != 3 or latent8.dtype not in FP8_DTYPES or not 0 < latent8.shape[2] < Dq:
        raise _fail("latent8", f"expected (B, S, Dc < {Dq}) float8_e4m3fn, got {latent8.dtype} {tuple(latent8.shape)}",
                    "quantize the normalised latent with quantize_latent_fp8")
    S, Dc = latent8.shape[1], latent8.shape[2]
    if tuple(latent_scale.shape) != (B, S) or latent_scale.dtype != torch.float32:
        raise _fail("latent_scale", f"expected ({B}, {S}) float32, got {latent_scale.dtype} {tuple(latent_scale.shape)}",
                    "pass the per-token scale returned by quantize_latent_fp8")
    if tuple(k_rope.shape) != (B, S, Dq - Dc) or k_rope.dtype in FP8_DTYPES:
        raise _fail("k_rope", f"expected ({B}, {S}, {Dq - Dc}) in bf16/fp32, got {k_rope.dtype} {tuple(k_rope.shape)}",
                    "keep the RoPE key unquantised, one row per cache slot, q's rope width")


def ref_sparse_attention_mla_fp8(q, latent8, latent_scale, k_rope, indices, scale: float) -> torch.Tensor:
    """Absorbed MLA over an FP8 latent cache: dequantise (latent8 * latent_scale, then k_rope) and run
    `ref_sparse_attention_mla`. Returns (B, T, H, Dc) in q's dtype."""
    check_mla_fp8_inputs(q, latent8, latent_scale, k_rope, indices)
    kv = torch.cat([dequantize_latent_fp8(latent8, latent_scale), k_rope.float()], dim=-1)  # (B, S, Dc+Dr)
    return ref_sparse_attention_mla(q, kv, indices, scale, latent8.shape[2])


# ---------------------------------------------------------------------------------------------
# Block-scaled FP8 linear (DeepSeek-V3 / V3.2 / GLM-5 FP8 checkpoints)
# ---------------------------------------------------------------------------------------------
# Weights: w (N, K) e4m3 with weight_scale_inv (ceil(N/128), ceil(K/128)) fp32, one scale per 128 x 128
# block: w_real[n, k] = w[n, k] * scale_inv[n // 128, k // 128]. Activations: one scale per token per
# 128-wide block of K (1 x 128), amax / 448, made at run time.

FP8_BLOCK = 128


def _blocks(n: int) -> int:
    return -(-n // FP8_BLOCK)


def _to_e4m3(t: torch.Tensor) -> torch.Tensor:
    """fp32 already divided by its scale -> e4m3, round to nearest even; the clamp keeps a quotient that
    lands a hair above 448 (amax / (amax / 448)) on 448 instead of NaN."""
    return t.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_weight_fp8_blocks(w: torch.Tensor):
    """(..., N, K) float -> (w8 (..., N, K) e4m3, scale_inv (..., ceil(N/128), ceil(K/128)) fp32), the
    checkpoint layout; leading dims (experts) are kept, one matrix at a time (the fp32 temporaries of a
    whole expert stack would be several times its size). Ragged edge blocks take the amax of what they hold."""
    *lead, N, K = w.shape
    nb, kb = _blocks(N), _blocks(K)
    if lead:
        w8 = torch.empty(*lead, N, K, dtype=torch.float8_e4m3fn, device=w.device)
        scale = torch.empty(*lead, nb, kb, dtype=torch.float32, device=w.device)
        for i, matrix in enumerate(w.reshape(-1, N, K)):
            w8.view(-1, N, K)[i], scale.view(-1, nb, kb)[i] = quantize_weight_fp8_blocks(matrix)
        return w8, scale
    wp = torch.nn.functional.pad(w.float(), (0, kb * FP8_BLOCK - K, 0, nb * FP8_BLOCK - N))  # zeros: amax unchanged
    blocks = wp.view(nb, FP8_BLOCK, kb, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_E4M3_MAX                # (nb, kb)
    w8 = _to_e4m3(blocks / scale[:, None, :, None]).view(nb * FP8_BLOCK, kb * FP8_BLOCK)
    return w8[:N, :K].contiguous(), scale


def dequantize_weight_fp8_blocks(w8: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(..., N, K) e4m3 and (..., ceil(N/128), ceil(K/128)) -> (..., N, K) in dtype: w8 * scale of its block."""
    N, K = w8.shape[-2:]
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, dim=-2)[..., :N, :]
    s = s.repeat_interleave(FP8_BLOCK, dim=-1)[..., :K]                                  # (..., N, K)
    return (w8.float() * s).to(dtype)


def ref_quantize_act_fp8_blocks(x: torch.Tensor):
    """(..., K) -> (x8 (..., K) e4m3, scale (..., ceil(K/128)) fp32): per token, per 128-wide block of K,
    scale = amax / 448 and x8 = round_to_e4m3(x / scale); the last block may be ragged."""
    K = x.shape[-1]
    kb = _blocks(K)
    xp = torch.nn.functional.pad(x.float(), (0, kb * FP8_BLOCK - K))
    blocks = xp.reshape(*x.shape[:-1], kb, FP8_BLOCK)                                  # (..., kb, 128)
    scale = blocks.abs().amax(dim=-1).clamp_min(1e-12) / FP8_E4M3_MAX                  # (..., kb)
    x8 = _to_e4m3(blocks / scale[..., None]).reshape(*x.shape[:-1], kb * FP8_BLOCK)[..., :K]
    return x8.contiguous(), scale


def dequantize_act_fp8_blocks(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(..., K) e4m3 and (..., ceil(K/128)) -> (..., K) fp32."""
    K = x8.shape[-1]
    return x8.float() * scale.float().repeat_interleave(FP8_BLOCK, dim=-1)[..., :K]


def check_fp8_linear_inputs(x, w, w_scale_inv) -> None:
    """Shape/dtype checks of a block-scaled FP8 linear, shared by the reference and the fast paths."""
    if w.dim() != 2 or w.dtype not in FP8_DTYPES:
        raise _fail("w", f"expected an (N, K) float8_e4m3fn weight, got {w.dtype} {tuple(w.shape)}",
                    "pass the checkpoint's FP8 weight (or quantize with quantize_weight_fp8_blocks)")
    N, K = w.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise _fail("x", f"last dim {x.shape[-1] if x.dim() else None} differs from the weight's in_features {K} "
                    f"(w is {tuple(w.shape)})", "pass activations of shape (..., in_features)")
    if x.dtype in FP8_DTYPES or not x.dtype.is_floating_point:
        raise _fail("x", f"expected bf16/fp16/fp32 activations, got {x.dtype}",
                    "pass unquantised activations: they are quantised per 1x128 block here")
    want = (_blocks(N), _blocks(K))
    if tuple(w_scale_inv.shape) != want or w_scale_inv.dtype != torch.float32:
        raise _fail("w_scale_inv", f"expected {want} float32 (one scale per 128x128 block of the {N}x{K} "
                    f"weight), got {w_scale_inv.dtype} {tuple(w_scale_inv.shape)}",
                    "pass the checkpoint's weight_scale_inv for this weight")


def ref_fp8_block_linear(x, w, w_scale_inv, out_dtype=torch.bfloat16) -> torch.Tensor:
    """y = x8_real @ w_real^T: x quantised per 1x128 block (as the fast paths do), both sides dequantised
    to fp32, one fp32 matmul. x (..., K), w (N, K) e4m3, w_scale_inv (ceil(N/128), ceil(K/128)) fp32.
    Returns (..., N) in out_dtype."""
    check_fp8_linear_inputs(x, w, w_scale_inv)
    x8, x_scale = ref_quantize_act_fp8_blocks(x)
    return (dequantize_act_fp8_blocks(x8, x_scale) @ dequantize_weight_fp8_blocks(w, w_scale_inv).t()).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Routed experts (MoE)
# ---------------------------------------------------------------------------------------------
# x (N, D); top_w (N, k) fp32 and top_e (N, k) int64 from the router; experts stacked per layer,
# stored out x in as in HF checkpoints: w_gate_up (E, 2I, D) (gate rows, then up rows), w_down (E, D, I).
# FP8 experts: e4m3 with the checkpoint matrices' own block scales, stacked: gate_up_scale_inv
# (E, 2 ceil(I/128), ceil(D/128)) = gate_proj's scale rows then up_proj's, down_scale_inv
# (E, ceil(D/128), ceil(I/128)). Where I is a multiple of 128 (every real checkpoint) this is simply the
# 128 x 128 blocks of the stacked (2I, D) matrix; otherwise the up half starts a new row block.


def quantize_experts_fp8(w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """Float experts (E, 2I, D) / (E, D, I) -> (g8, gate_up_scale_inv, d8, down_scale_inv) in the layout
    above: the gate and up halves quantised as the separate matrices a checkpoint holds."""
    E, R, D = w_gate_up.shape
    g8, gs = quantize_weight_fp8_blocks(w_gate_up.reshape(E * 2, R // 2, D))          # (2E, I, D) halves
    d8, ds = quantize_weight_fp8_blocks(w_down)
    return g8.view(E, R, D), gs.reshape(E, -1, gs.shape[-1]), d8, ds


def dequantize_experts_fp8(w8: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32,
                           gate_up: bool = False) -> torch.Tensor:
    """Stacked e4m3 experts (E, R, C) and their block scales -> (E, R, C) in dtype, each block's scale
    broadcast over its (up to) 128 x 128 elements. gate_up: w8 is the (E, 2I, D) gate|up stack, whose
    halves have their own row blocks (the layout above)."""
    E, R, C = w8.shape
    if gate_up:
        halves = dequantize_experts_fp8(w8.reshape(E * 2, R // 2, C),
                                        scale_inv.reshape(E * 2, -1, scale_inv.shape[-1]), dtype)
        return halves.reshape(E, R, C)
    if R % FP8_BLOCK or C % FP8_BLOCK:   # ragged edge blocks (tiny models): expand the scales, pad nothing
        s = scale_inv.float().repeat_interleave(FP8_BLOCK, 1)[:, :R].repeat_interleave(FP8_BLOCK, 2)[:, :, :C]
        return (w8.float() * s).to(dtype)
    blocks = w8.float().view(E, R // FP8_BLOCK, FP8_BLOCK, C // FP8_BLOCK, FP8_BLOCK)
    return (blocks * scale_inv.float()[:, :, None, :, None]).view(E, R, C).to(dtype)

def check_moe_inputs(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv=None, down_scale_inv=None) -> None:
    """Shape/dtype checks of the routed experts (no host sync: expert ids are not range-checked)."""
    if x.dim() != 2:
        raise _fail("x", f"expected (N, D) tokens, got shape {tuple(x.shape)}", "flatten batch and time first")
    N, D = x.shape
    if top_e.dim() != 2 or top_e.shape[0] != N or top_e.dtype not in (torch.int64, torch.int32):
        raise _fail("top_e", f"expected ({N}, k) int64 expert ids, got {top_e.dtype} {tuple(top_e.shape)}",
                    "pass the router's top-k expert indices for these tokens")
    if tuple(top_w.shape) != tuple(top_e.shape) or not top_w.dtype.is_floating_point:
        raise _fail("top_w", f"expected {tuple(top_e.shape)} float weights like top_e, got {top_w.dtype} "
                    f"{tuple(top_w.shape)}", "pass the router's top-k weights")
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != D or w_gate_up.shape[1] % 2:
        raise _fail("w_gate_up", f"expected (E, 2I, D={D}), got {tuple(w_gate_up.shape)}",
                    "stack each expert's gate_proj.weight and up_proj.weight rows: (E, 2I, D)")
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (E, D, I):
        raise _fail("w_down", f"expected (E, D, I) = {(E, D, I)}, got {tuple(w_down.shape)}",
                    "stack each expert's down_proj.weight: (E, D, I)")
    fp8 = w_gate_up.dtype in FP8_DTYPES
    if fp8 != (w_down.dtype in FP8_DTYPES):
        raise _fail("w_down", f"w_gate_up is {w_gate_up.dtype} but w_down is {w_down.dtype}",
                    "quantise both expert matrices or neither")
    scales = (("gate_up_scale_inv", gate_up_scale_inv, w_gate_up), ("down_scale_inv", down_scale_inv, w_down))
    if not fp8:
        for name, s, _ in scales:
            if s is not None:
                raise _fail(name, "given for unquantised experts", "pass scales only with float8_e4m3fn experts")
        return
    wants = {"gate_up_scale_inv": (E, 2 * _blocks(I), _blocks(D)), "down_scale_inv": (E, _blocks(D), _blocks(I))}
    for name, s, _ in scales:
        want = wants[name]
        if s is None or tuple(s.shape) != want or s.dtype != torch.float32:
            got = None if s is None else f"{s.dtype} {tuple(s.shape)}"
            raise _fail(name, f"expected {want} float32 (one scale per 128x128 block per expert matrix), got {got}",
                        "pass the stacked weight_scale_inv of the experts (gate_proj's rows then up_proj's)")


def ref_moe_routed(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv=None, down_scale_inv=None) -> torch.Tensor:
    """out[n] = sum_j top_w[n, j] * W_down[e] (silu(W_gate[e] x_n) * W_up[e] x_n), e = top_e[n, j]: one
    token-expert pair at a time in fp32 (FP8 experts dequantised first, one expert at a time). (N, D) fp32."""
    check_moe_inputs(x, top_w, top_e, w_gate_up, w_down, gate_up_scale_inv, down_scale_inv)
    N, D = x.shape
    I = w_down.shape[2]
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    for n in range(N):
        for j in range(top_e.shape[1]):
            e = int(top_e[n, j])
            if gate_up_scale_inv is None:
                gu, dn = w_gate_up[e].float(), w_down[e].float()
            else:   # gate and up: two checkpoint matrices, each with its own block scales
                nb = gate_up_scale_inv.shape[1] // 2
                gu = torch.cat([dequantize_weight_fp8_blocks(w_gate_up[e, :I], gate_up_scale_inv[e, :nb]),
                                dequantize_weight_fp8_blocks(w_gate_up[e, I:], gate_up_scale_inv[e, nb:])])  # (2I, D)
                dn = dequantize_weight_fp8_blocks(w_down[e], down_scale_inv[e])              # (D, I)
            h = gu @ x[n].float()                                                            # (2I,)
            act = torch.nn.functional.silu(h[:I]) * h[I:]                                    # (I,)
            out[n] += float(top_w[n, j]) * (dn @ act)
    return out
