"""Fused lightning indexer in Triton: scores without the [T, H, S] tensor, then an exact top-k.

    score[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s])   (* k_scale[b,s] for FP8)
    valid iff s <= q_start[b] + t and s < kv_len[b];  keep the top-k valid s per (b, t).

Two stages per chunk of queries:
  1. `_indexer_scores_kernel` (prefill) / `_indexer_decode_kernel` (few queries): each program owns
     a (queries x keys) tile, loops over the indexer heads with one tensor-core product per head and
     folds ReLU and the head weight into an fp32 accumulator, so only the head-summed (T, S) scores
     reach memory. Tiles wholly above the causal diagonal are skipped (the top-k never reads them).
  2. `_topk_rows_kernel`: exact radix select per row over an order-preserving uint32 image of the
     fp32 scores: up to four 8-bit histogram passes find the k-th largest key, a last pass writes
     every index above it and the first few equal to it. No sort, at most 5 reads of the row.
     method="sampled" first estimates a threshold from every 64th key, keeps the ~4K keys above it (2 x K, K=2048) in
     a scratch (one read of the row) and radix-selects there, falling back to the whole row when the
     estimate fails: the same result from ~1.3 reads of the row.
Rows too few to fill the GPU (decode) use torch.topk on fully written scores instead.

Precision: bf16 and e4m3 operands are multiplied exactly with fp32 accumulation (Hopper's FP8
tensor cores accumulate with fewer mantissa bits: ~1e-4 relative); fp32 operands run as TF32.
The reference each kernel is tested against is `reference.ref_indexer_topk` / `ref_indexer_scores`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import check_indexer_inputs, ref_indexer_scores, ref_indexer_topk  # noqa: F401 (the twins)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# fp32 scores buffer per chunk of queries: at most this many elements (1 Gi elements = 4 GiB).
_SCORE_BUFFER_ELEMENTS = 1 << 30
# Below this many rows per chunk the one-program-per-row top-k leaves most SMs idle...
_MIN_ROWS_FOR_RADIX = 256
# ...unless the rows are long: from this many keys on, a decode row (fewer rows than the above) also takes
# the one-program-per-row kernel instead of torch.topk (a multi-kernel radix pipeline, ~83 us per row of
# 200K keys on the H200). Measured by `bench_kernels.py --only-decode-topk`; INDEXCACHE_DECODE_TOPK_MIN_S
# overrides it.
DECODE_ROWS_MIN_KEYS = int(os.environ.get("INDEXCACHE_DECODE_TOPK_MIN_S", str(1 << 62)))


@triton.jit
def _indexer_scores_kernel(
    q_ptr, k_ptr, w_ptr, ks_ptr, out_ptr, qstart_ptr, kvlen_ptr, kslot_ptr,
    t0, T_chunk, S,
    sq_b, sq_t, sq_h, sk_b, sk_s, sw_b, sw_t, sks_b, so_b, so_t, sr_b,
    H: tl.constexpr, D: tl.constexpr, HAS_KSCALE: tl.constexpr, HAS_KSLOT: tl.constexpr, HAS_KROW: tl.constexpr,
    WRITE_ALL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_s = tl.program_id(0)   # key blocks vary fastest: programs sharing a q tile run together (L2)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)   # 64-bit offsets: a (16K x 200K) fp32 score chunk passes 2^31
    q_start = tl.load(qstart_ptr + b)
    kv_len = tl.load(kvlen_ptr + b)
    kb = b                                                      # the K cache row of query row b
    if HAS_KSLOT:
        kb = tl.load(kslot_ptr + b).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)           # query index within the chunk
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    t_ok = offs_t < T_chunk
    pos_t = q_start + t0 + offs_t                               # absolute position of each query
    last_visible = tl.minimum(q_start + t0 + pid_t * BLOCK_T + BLOCK_T - 1, kv_len - 1)
    out_ptrs = out_ptr + b * so_b + offs_t.to(tl.int64)[:, None] * so_t + offs_s[None, :]
    store_mask = t_ok[:, None] & (offs_s[None, :] < S)
    if pid_s * BLOCK_S > last_visible:
        if WRITE_ALL:
            tl.store(out_ptrs, tl.full((BLOCK_T, BLOCK_S), float("-inf"), tl.float32), mask=store_mask)
        return
    offs_d = tl.arange(0, D)
    if HAS_KROW:   # paged cache: key s of row b lives at pool row rows[b, s] (kslot_ptr holds the rows)
        key = tl.load(kslot_ptr + b * sr_b + offs_s, mask=offs_s < S, other=0).to(tl.int64)
    else:
        key = offs_s
    k_tile = tl.load(k_ptr + kb * sk_b + key[None, :] * sk_s + offs_d[:, None],
                     mask=offs_s[None, :] < S, other=0.0)       # (D, BLOCK_S)
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    q_base = q_ptr + b * sq_b + (t0 + offs_t.to(tl.int64)[:, None]) * sq_t + offs_d[None, :]
    w_base = w_ptr + b * sw_b + (t0 + offs_t) * sw_t
    for h in range(H):
        q_tile = tl.load(q_base + h * sq_h, mask=t_ok[:, None], other=0.0)   # (BLOCK_T, D)
        w_h = tl.load(w_base + h, mask=t_ok, other=0.0)                      # (BLOCK_T,)
        logits = tl.dot(q_tile, k_tile)                                      # (BLOCK_T, BLOCK_S) fp32
        acc += tl.maximum(logits, 0.0) * w_h[:, None]
    if HAS_KSCALE:
        ks = tl.load(ks_ptr + kb * sks_b + key, mask=offs_s < S, other=0.0)
        acc = acc * ks[None, :]
    valid = (offs_s[None, :] <= pos_t[:, None]) & (offs_s[None, :] < kv_len)
    acc = tl.where(valid, acc, float("-inf"))
    tl.store(out_ptrs, acc, mask=store_mask)


@triton.jit
def _indexer_decode_kernel(
    q_ptr, k_ptr, w_ptr, ks_ptr, out_ptr, qstart_ptr, kvlen_ptr, kslot_ptr,
    t0, S,
    sq_b, sq_t, sq_h, sk_b, sk_s, sw_b, sw_t, sks_b, so_b, so_t, sr_b,
    H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, HAS_KSCALE: tl.constexpr, HAS_KSLOT: tl.constexpr,
    HAS_KROW: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One query per program row: the heads are the product's M side, (H, D) x (D, BLOCK_S)."""
    pid_s = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start = tl.load(qstart_ptr + b)
    kv_len = tl.load(kvlen_ptr + b)
    kb = b                                                      # the K cache row of query row b
    if HAS_KSLOT:
        kb = tl.load(kslot_ptr + b).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    if HAS_KROW:   # paged cache: key s of row b lives at pool row rows[b, s] (kslot_ptr holds the rows)
        key = tl.load(kslot_ptr + b * sr_b + offs_s, mask=offs_s < S, other=0).to(tl.int64)
    else:
        key = offs_s
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D)
    h_ok = offs_h < H
    q_tile = tl.load(q_ptr + b * sq_b + (t0 + t) * sq_t + offs_h[:, None] * sq_h + offs_d[None, :],
                     mask=h_ok[:, None], other=0.0)                          # (H_PAD, D)
    w = tl.load(w_ptr + b * sw_b + (t0 + t) * sw_t + offs_h, mask=h_ok, other=0.0)
    k_tile = tl.load(k_ptr + kb * sk_b + key[None, :] * sk_s + offs_d[:, None],
                     mask=offs_s[None, :] < S, other=0.0)                    # (D, BLOCK_S)
    logits = tl.dot(q_tile, k_tile)                                          # (H_PAD, BLOCK_S)
    score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)             # (BLOCK_S,)
    if HAS_KSCALE:
        score = score * tl.load(ks_ptr + kb * sks_b + key, mask=offs_s < S, other=0.0)
    valid = (offs_s <= q_start + t0 + t) & (offs_s < kv_len)
    score = tl.where(valid, score, float("-inf"))
    tl.store(out_ptr + b * so_b + t * so_t + offs_s, score, mask=offs_s < S)


@triton.jit
def _orderable_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (flip all bits of negatives,
    only the sign bit of positives)."""
    bits = x.to(tl.uint32, bitcast=True)
    negative = (bits >> 31) != 0
    return tl.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _radix_digit(src, n, prefix, k_left, SHIFT: tl.constexpr, NBINS: tl.constexpr, HIGH: tl.constexpr,
                 BLOCK: tl.constexpr, STRIDE: tl.constexpr = 1):
    """One radix-select step over src[0], src[STRIDE], ... (n keys): among keys whose top HIGH bits
    equal prefix's, histogram the digit at SHIFT and pick the digit holding the k_left-th largest.
    Returns (prefix with that digit set, rank still to find inside it, keys in that digit)."""
    offs = tl.arange(0, BLOCK)
    hist = tl.zeros((NBINS,), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        o = start + offs
        keep = o < n
        if STRIDE == 1:
            ptrs = src + o
        else:
            ptrs = src + o.to(tl.int64) * STRIDE      # sampled keys: 64-bit, n * STRIDE may pass 2^31
        key = _orderable_key(tl.load(ptrs, mask=keep, other=0.0))
        if HIGH > 0:
            keep = keep & ((key >> (32 - HIGH)) == (prefix >> (32 - HIGH)))
        digit = ((key >> SHIFT) & (NBINS - 1)).to(tl.int32)
        hist += tl.histogram(digit, NBINS, mask=keep)
    at_or_above = tl.cumsum(hist, 0, reverse=True)          # keys in this digit or a higher one
    bins = tl.arange(0, NBINS)
    digit_k = tl.max(tl.where(at_or_above >= k_left, bins, -1), 0)
    above = tl.sum(tl.where(bins > digit_k, hist, 0), 0)
    in_bin = tl.sum(tl.where(bins == digit_k, hist, 0), 0)
    return prefix | (digit_k.to(tl.uint32) << SHIFT), k_left - above, in_bin


@triton.jit
def _radix_select_into(src, n, dst, index_map, K: tl.constexpr, BLOCK: tl.constexpr, HAS_MAP: tl.constexpr):
    """Exact top-K of the n fp32 keys at src (n > K) into dst[0:K]: every key above the K-th largest,
    then the first equal ones in order. HAS_MAP: write index_map[i] for key i instead of i."""
    # Radix select of the K-th largest key, one byte at a time, most significant first. 256 bins:
    # Triton's histogram costs about bins/32 operations per key, so wide digits are slower.
    # Stop early once the chosen bin holds exactly the keys still wanted (all of it is taken).
    offs = tl.arange(0, BLOCK)
    prefix = tl.zeros((), dtype=tl.uint32)
    prefix, k_left, in_bin = _radix_digit(src, n, prefix, K, 24, 256, 0, BLOCK)
    fixed = tl.full((), 8, tl.int32)                       # leading key bits decided so far
    if in_bin > k_left:
        prefix, k_left, in_bin = _radix_digit(src, n, prefix, k_left, 16, 256, 8, BLOCK)
        fixed = fixed + 8
        if in_bin > k_left:
            prefix, k_left, in_bin = _radix_digit(src, n, prefix, k_left, 8, 256, 16, BLOCK)
            fixed = fixed + 8
            if in_bin > k_left:
                prefix, k_left, in_bin = _radix_digit(src, n, prefix, k_left, 0, 256, 24, BLOCK)
                fixed = fixed + 8
    # keys whose leading `fixed` bits beat prefix's are in; k_left of those equal to it are in
    shift = (32 - fixed).to(tl.uint32)
    threshold = prefix >> shift
    n_above = K - k_left
    taken_above = 0
    taken_equal = 0
    for start in range(0, n, BLOCK):
        o = start + offs
        inside = o < n
        key = _orderable_key(tl.load(src + o, mask=inside, other=0.0))
        gt = inside & ((key >> shift) > threshold)
        eq = inside & ((key >> shift) == threshold)
        if HAS_MAP:
            value = tl.load(index_map + o, mask=inside, other=0)
        else:
            value = o.to(tl.int32)
        rank_gt = taken_above + tl.cumsum(gt.to(tl.int32), 0) - 1
        rank_eq = taken_equal + tl.cumsum(eq.to(tl.int32), 0) - 1
        tl.store(dst + rank_gt, value, mask=gt)
        tl.store(dst + n_above + rank_eq, value, mask=eq & (rank_eq < k_left))
        taken_above += tl.sum(gt.to(tl.int32), 0)
        taken_equal += tl.sum(eq.to(tl.int32), 0)


@triton.jit
def _topk_rows_kernel(
    scores_ptr, out_ptr, qstart_ptr, kvlen_ptr, cand_key_ptr, cand_idx_ptr, path_ptr,
    t0, T_chunk, ss_b, ss_t, so_b, so_t,
    K: tl.constexpr, BLOCK: tl.constexpr, SAMPLED: tl.constexpr, STRIDE: tl.constexpr,
    RANK: tl.constexpr, CAP: tl.constexpr, RECORD_PATH: tl.constexpr,
):
    """Top-K of one row of scores per program.

    SAMPLED=False: radix select over the whole row (up to 5 reads of it).
    SAMPLED=True: estimate a threshold from every STRIDE-th key (the key of rank RANK among them, to
    16 bits: about RANK * STRIDE = margin * K keys lie above it), copy the keys at or above it with their
    indices into a per-row scratch of CAP entries (one read of the row), and radix-select there. When
    the estimate fails (fewer than K or more than CAP candidates: adversarial or tied rows), fall back
    to the whole row. The result is the same either way; only the time differs.
    RECORD_PATH: path_ptr[row] = 0 short row, 1 sampled, 2 fallback (tests, benchmarks)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T_chunk
    t = row % T_chunk
    q_start = tl.load(qstart_ptr + b)
    kv_len = tl.load(kvlen_ptr + b)
    n = tl.minimum(q_start + t0 + t + 1, kv_len)      # valid keys of this query: 0..n-1
    n = tl.maximum(n, 0)
    src = scores_ptr + b * ss_b + t * ss_t
    dst = out_ptr + b * so_b + (t0 + t) * so_t
    offs = tl.arange(0, BLOCK)
    if n <= K:
        for start in range(0, K, BLOCK):
            o = start + offs
            tl.store(dst + o, tl.where(o < n, o, -1).to(tl.int32), mask=o < K)
        if RECORD_PATH:
            tl.store(path_ptr + row, 0)
        return
    path = 2
    if SAMPLED:
        m = (n + STRIDE - 1) // STRIDE                      # samples: keys 0, STRIDE, 2*STRIDE, ...
        if m > RANK:
            est = tl.zeros((), dtype=tl.uint32)
            est, r_left, in_bin = _radix_digit(src, m, est, RANK, 24, 256, 0, BLOCK, STRIDE)
            est, r_left, in_bin = _radix_digit(src, m, est, r_left, 16, 256, 8, BLOCK, STRIDE)
            cand_key = cand_key_ptr + row * CAP
            cand_idx = cand_idx_ptr + row * CAP
            count = 0
            for c0 in range(0, n, BLOCK):
                o = c0 + offs
                inside = o < n
                x = tl.load(src + o, mask=inside, other=0.0)
                take = inside & (_orderable_key(x) >= est)
                rank = count + tl.cumsum(take.to(tl.int32), 0) - 1
                tl.store(cand_key + rank, x, mask=take & (rank < CAP))
                tl.store(cand_idx + rank, o.to(tl.int32), mask=take & (rank < CAP))
                count += tl.sum(take.to(tl.int32), 0)
            if (count >= K) & (count <= CAP):
                path = 1
                if count == K:
                    for j in range(0, K, BLOCK):
                        oj = j + offs
                        tl.store(dst + oj, tl.load(cand_idx + oj, mask=oj < K, other=0), mask=oj < K)
                else:
                    _radix_select_into(cand_key, count, dst, cand_idx, K, BLOCK, True)
    if path == 2:
        _radix_select_into(src, n, dst, src, K, BLOCK, False)
    if RECORD_PATH:
        tl.store(path_ptr + row, path)


def _check_device(*tensors) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not INTERPRET:
            raise ValueError(f"the Triton indexer needs CUDA tensors, got {t.device}; "
                             "use the reference (INDEXCACHE_KERNELS=torch) on the CPU")


def indexer_scores_into(q, k, weights, q_start, kv_len, k_scale, t0, t1, out, write_all,
                        block_t=64, block_s=128, num_warps=8, num_stages=3, k_slots=None, k_rows=None):
    """Scores of queries t0..t1 into out (B, t1-t0, >=S) fp32 (stage 1 only).
    k_slots (B,) int64: query row b reads K row k_slots[b] of k (n_slots, S, D), a cache read in place.
    k_rows (B, S) int64: paged pool; k is (1, n_rows, D) (k_scale (1, n_rows)) and key s of query row b is
    pool row k_rows[b, s]."""
    B, T, H, D = q.shape
    S = k.shape[1] if k_rows is None else k_rows.shape[1]
    table = k_rows if k_rows is not None else (k_slots if k_slots is not None else q_start)
    sr_b = k_rows.stride(0) if k_rows is not None else 0
    sk_b = 0 if k_rows is not None else k.stride(0)
    Tc = t1 - t0
    ks = k_scale if k_scale is not None else weights  # dummy pointer when unused
    sks_b = k_scale.stride(0) if k_scale is not None else 0
    if k_rows is not None:   # one pool for every query row: the table alone says where each key is
        sks_b = 0
    if Tc <= 16 and H <= 128:
        grid = (triton.cdiv(S, block_s), Tc, B)
        _indexer_decode_kernel[grid](
            q, k, weights, ks, out, q_start, kv_len, table, t0, S,
            q.stride(0), q.stride(1), q.stride(2), sk_b, k.stride(1),
            weights.stride(0), weights.stride(1), sks_b, out.stride(0), out.stride(1), sr_b,
            H=H, H_PAD=max(16, triton.next_power_of_2(H)), D=D, HAS_KSCALE=k_scale is not None,
            HAS_KSLOT=k_slots is not None, HAS_KROW=k_rows is not None,
            BLOCK_S=block_s, num_warps=4)
        return
    grid = (triton.cdiv(S, block_s), triton.cdiv(Tc, block_t), B)
    _indexer_scores_kernel[grid](
        q, k, weights, ks, out, q_start, kv_len, table, t0, Tc, S,
        q.stride(0), q.stride(1), q.stride(2), sk_b, k.stride(1),
        weights.stride(0), weights.stride(1), sks_b, out.stride(0), out.stride(1), sr_b,
        H=H, D=D, HAS_KSCALE=k_scale is not None, HAS_KSLOT=k_slots is not None, HAS_KROW=k_rows is not None,
        WRITE_ALL=write_all,
        BLOCK_T=block_t, BLOCK_S=block_s, num_warps=num_warps, num_stages=num_stages)


# Sampled top-k: every TOPK_STRIDE-th key estimates a threshold with ~TOPK_MARGIN * K keys above it.
TOPK_STRIDE = 64
TOPK_MARGIN = 2
TOPK_METHODS = ("radix", "sampled")
# Sampled is the default: 2.3x / 2.9x / 3.2x faster than the radix select at 64K / 128K / 200K on the H200,
# the same sets (bench/RESULTS.md, kernel run 5).
_TOPK_DEFAULT_METHOD = "sampled"


def topk_rows_into(scores, out, q_start, kv_len, t0, topk, block=1024, num_warps=8, method=None,
                   stride=TOPK_STRIDE, margin=TOPK_MARGIN, path_out=None):
    """Top-k of each row of scores (B, Tc, >=S) into out[:, t0:t0+Tc] (stage 2 only).
    method: "radix" (whole-row radix select) or "sampled" (threshold from a sample, radix select over
    the candidates above it, whole-row fallback); the same indices either way. path_out: optional
    (B * Tc,) int32 receiving 0 / 1 / 2 per row (short row / sampled / fallback)."""
    method = method or _TOPK_DEFAULT_METHOD
    if method not in TOPK_METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(TOPK_METHODS)}")
    B, Tc = scores.shape[:2]
    sampled = method == "sampled"
    rank = max(1, (topk * margin) // stride)
    cap = triton.next_power_of_2(2 * topk * margin)
    if sampled:
        cand_key = torch.empty(B * Tc, cap, dtype=torch.float32, device=scores.device)
        cand_idx = torch.empty(B * Tc, cap, dtype=torch.int32, device=scores.device)
    else:
        cand_key = cand_idx = scores                       # unused pointers
    _topk_rows_kernel[(B * Tc,)](
        scores, out, q_start, kv_len, cand_key, cand_idx, path_out if path_out is not None else out,
        t0, Tc, scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        K=topk, BLOCK=block, SAMPLED=sampled, STRIDE=stride, RANK=rank, CAP=cap,
        RECORD_PATH=path_out is not None, num_warps=num_warps)


def indexer_topk(q, k, weights, topk: int, q_start, kv_len, k_scale=None, query_chunk: int | None = None,
                 out=None, topk_method: str | None = None, k_slots=None, k_rows=None):
    """Triton twin of `ref_indexer_topk`: (B, T, topk) int32, -1 where fewer keys are valid.
    topk_method: "sampled" (default) or "radix" (see `topk_rows_into`).
    k_slots (B,) int64: k (and k_scale) hold every cache slot, (n_slots, S, D) / (n_slots, S), possibly a
    strided view of a longer cache; query row b reads slot k_slots[b] in place (no gathered copy).
    k_rows (B, S) int64: k (and k_scale) are a paged pool's rows, (n_rows, D) / (n_rows,); key s of query
    row b is pool row k_rows[b, s], read through the table in place (no gathered copy)."""
    if k_rows is not None:
        if k_slots is not None:
            raise ValueError("pass k_slots (slot cache) or k_rows (paged cache), not both")
        if k_rows.dim() != 2 or k_rows.shape[0] != q.shape[0]:
            raise ValueError(f"k_rows: expected ({q.shape[0]}, S), got {tuple(k_rows.shape)}; "
                             "pass one pool row per query row and visible key")
        B_, S_ = k_rows.shape
        check_indexer_inputs(q, k[:1][None].expand(B_, S_, -1), weights, q_start, kv_len,
                             None if k_scale is None else k_scale[:1][None].expand(B_, S_), topk)
        k, k_rows = k[None], k_rows.to(torch.int64).contiguous()          # (1, n_rows, D)
        k_scale = None if k_scale is None else k_scale[None]
    elif k_slots is not None:
        check_indexer_inputs(q, k[:1].expand(q.shape[0], -1, -1), weights, q_start, kv_len,
                             None if k_scale is None else k_scale[:1].expand(q.shape[0], -1), topk)
        if tuple(k_slots.shape) != (q.shape[0],):
            raise ValueError(f"k_slots: expected shape ({q.shape[0]},), got {tuple(k_slots.shape)}; "
                             "pass one cache slot per query row")
        k_slots = k_slots.to(torch.int64).contiguous()
    else:
        check_indexer_inputs(q, k, weights, q_start, kv_len, k_scale, topk)
    _check_device(q, k, weights, q_start, kv_len, k_scale)
    B, T, H, D = q.shape
    S = k.shape[1] if k_rows is None else k_rows.shape[1]
    if D & (D - 1) or D < 16:
        raise ValueError(f"q: head_dim {D} must be a power of two >= 16 for the Triton indexer; "
                         "use INDEXCACHE_KERNELS=torch for this model")
    if k.dtype != q.dtype:     # one operand type for the tensor-core product (FP8 pairs are checked)
        k = k.to(q.dtype)
    q = q.contiguous()
    k = k if k.stride(2) == 1 else k.contiguous()        # a strided cache view is read in place
    weights = weights.float().contiguous()
    q_start = q_start.to(torch.int64).contiguous()
    kv_len = kv_len.to(torch.int64).contiguous()
    if k_scale is not None:
        k_scale = k_scale.float()
        k_scale = k_scale if k_scale.stride(1) == 1 else k_scale.contiguous()
    if out is None:
        out = torch.empty(B, T, topk, dtype=torch.int32, device=q.device)
    if T == 0:
        return out
    chunk = query_chunk or max(1, min(T, _SCORE_BUFFER_ELEMENTS // max(1, B * S)))
    if chunk < T and not query_chunk:   # multiples of 64: sub-chunks keep one Triton specialisation
        chunk = max(64, chunk // 64 * 64)
    scores = torch.empty(B, min(chunk, T), S, dtype=torch.float32, device=q.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        rows = B * (t1 - t0)
        radix = rows >= _MIN_ROWS_FOR_RADIX or S >= DECODE_ROWS_MIN_KEYS or INTERPRET
        buf = scores[:, : t1 - t0]
        indexer_scores_into(q, k, weights, q_start, kv_len, k_scale, t0, t1, buf, write_all=not radix,
                            k_slots=k_slots, k_rows=k_rows)
        if radix:
            topk_rows_into(buf, out, q_start, kv_len, t0, topk, method=topk_method)
        else:
            kk = min(topk, S)
            values, idx = buf.topk(kk, dim=-1)
            idx = idx.to(torch.int32).masked_fill_(values == float("-inf"), -1)
            out[:, t0:t1, :kk] = idx
            out[:, t0:t1, kk:] = -1
    return out
