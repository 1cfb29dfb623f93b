"""Kernel-level benchmark on one GPU: fused Triton lightning indexer vs the plain-PyTorch one,
and the sparse MLA attention kernels, against peaks measured in the same run.

    PYTHONPATH=serving python3 bench/bench_kernels.py --out results.json [--contexts 16384,65536]

Prefill: one layer's indexer over a whole causal context of N tokens (every query, top-2048).
Decode: one query per sequence at the end of an N-token indexer K cache.
Sparse MLA: bf16 latent cache vs FP8 latent cache (e4m3 + fp32 scale per key, bf16 RoPE key) on the same
queries and indices (`--only-mla`: just those and the peaks, a short run).
FLOPs counted are the useful causal ones: sum over queries of visible keys x H x D x 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))

from indexcache.kernels import reference as ref  # noqa: E402
from indexcache.kernels.indexer import indexer_scores_into, indexer_topk, topk_rows_into  # noqa: E402
from indexcache.kernels.sparse_attention import (  # noqa: E402
    MLA_PREFILL_TILES, sparse_attention_mla, sparse_attention_mla_fp8)

H, D, TOPK = 32, 128, 2048          # the 30B model's indexer (GLM-5 / paper shape)


def bench(fn, warmup=1, rep=3):
    """Median seconds of rep timed calls (CUDA events), after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_peaks():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ b, warmup=3, rep=10)
    bf16 = 2 * n ** 3 / t / 1e12
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    t = bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), warmup=3, rep=10)
    fp8 = 2 * n ** 3 / t / 1e12
    x = torch.randn(1 << 30, device="cuda")           # 4 GiB
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), warmup=2, rep=5)
    bw = 2 * x.numel() * 4 / t / 1e12
    del a, b, a8, b8, x, y
    torch.cuda.empty_cache()
    return {"bf16_tflops": bf16, "fp8_tflops": fp8, "copy_tbps": bw}


def causal_flops(n_queries, n_keys, q_start):
    # sum_{t} (q_start + t + 1) visible keys, capped at n_keys
    first, last = q_start + 1, min(q_start + n_queries, n_keys)
    keys = (first + last) * (last - first + 1) / 2
    return keys * H * D * 2


def plain_indexer_topk(q, k, w, topk, chunk=2048):
    """The plain-PyTorch indexer: bf16 q.k per chunk of queries, ReLU, head sum, mask, torch.topk."""
    B, T, _, _ = q.shape
    S = k.shape[1]
    out = torch.empty(B, T, topk, dtype=torch.int64, device=q.device)
    pos = torch.arange(S, device=q.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        logits = torch.einsum("bthd,bsd->bths", q[:, t0:t1], k)               # (B, t, H, S) bf16
        scores = torch.einsum("bths,bth->bts", logits.relu_(), w[:, t0:t1].to(logits.dtype)).float()
        causal = pos[None, :] > (S - T) + torch.arange(t0, t1, device=q.device)[:, None]
        scores.masked_fill_(causal[None], float("-inf"))
        out[:, t0:t1] = scores.topk(min(topk, S), dim=-1).indices
    return out


def indexer_inputs(n, batch=1, fp8=False, seed=0, n_queries=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nq = n if n_queries is None else n_queries
    q = torch.randn(batch, nq, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(batch, n, D, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(batch, nq, H, device="cuda", generator=g) * (H ** -0.5 * D ** -0.5)
    if fp8:
        q, k, w, ks = ref.quantize_indexer_fp8(q, k, w)
        return q, k, w, ks
    return q, k, w, None


def bench_indexer_prefill(n, peaks, plain_max):
    row = {"context": n}
    flops = causal_flops(n, n, 0)
    qs = torch.zeros(1, dtype=torch.int64, device="cuda")
    kl = torch.full((1,), n, dtype=torch.int64, device="cuda")
    for fp8 in (False, True):
        name = "fp8" if fp8 else "bf16"
        q, k, w, ks = indexer_inputs(n, fp8=fp8)
        chunk = max(1, min(n, (1 << 30) // n))
        t_all = bench(lambda: indexer_topk(q, k, w, TOPK, qs, kl, k_scale=ks))
        # stage split: scores of every chunk, then top-k of every chunk
        buf = torch.empty(1, min(chunk, n), n, device="cuda")
        out = torch.empty(1, n, TOPK, dtype=torch.int32, device="cuda")

        def scores_only():
            for t0 in range(0, n, chunk):
                indexer_scores_into(q, k, w, qs, kl, ks, t0, min(n, t0 + chunk), buf[:, :min(n, t0 + chunk) - t0], False)

        def topk_only(method="radix", path=None):
            for t0 in range(0, n, chunk):
                topk_rows_into(buf[:, :min(n, t0 + chunk) - t0], out, qs, kl, t0, TOPK, method=method,
                               path_out=path)

        scores_only()
        t_scores = bench(scores_only)
        t_topk = bench(topk_only)
        # the sampled top-k, side by side: time, the same sets as the radix select (last chunk), and how
        # many rows took the sampled path (1) or the whole-row fallback (2)
        last = out[:, n - min(chunk, n):].clone()
        t_topk_sampled = bench(lambda: topk_only("sampled"))
        if fp8:
            row["topk_sampled_same_sets"] = bool(torch.equal(last.sort(-1).values,
                                                             out[:, n - min(chunk, n):].sort(-1).values))
            path = torch.empty(min(chunk, n), dtype=torch.int32, device="cuda")
            t0 = n - min(chunk, n)
            topk_rows_into(buf[:, :n - t0], out, qs, kl, t0, TOPK, method="sampled", path_out=path)
            row["topk_sampled_fallback_rows"] = int((path == 2).sum())
            row["topk_sampled_rows"] = int((path == 1).sum())
        row[f"{name}_topk_sampled_s"] = t_topk_sampled
        row[f"{name}_sampled_s"] = bench(lambda: indexer_topk(q, k, w, TOPK, qs, kl, k_scale=ks, topk_method="sampled"))
        peak = peaks["fp8_tflops" if fp8 else "bf16_tflops"]
        row[f"{name}_s"] = t_all
        row[f"{name}_scores_s"] = t_scores
        row[f"{name}_topk_s"] = t_topk
        row[f"{name}_tflops"] = flops / t_all / 1e12
        row[f"{name}_scores_tflops"] = flops / t_scores / 1e12
        row[f"{name}_frac_of_peak"] = flops / t_all / 1e12 / peak
        # top-k reads the causal half of the fp32 scores 4 times
        row[f"{name}_topk_tbps"] = 4 * 4 * n * (n + 1) / 2 / t_topk / 1e12
        del q, k, w, ks, buf, out
        torch.cuda.empty_cache()
    if n <= plain_max:
        q, k, w, _ = indexer_inputs(n)
        t_plain = bench(lambda: plain_indexer_topk(q, k, w, TOPK), warmup=1, rep=1)
        row["plain_s"] = t_plain
        row["plain_tflops"] = flops / t_plain / 1e12
        row["speedup_bf16_vs_plain"] = t_plain / row["bf16_s"]
        del q, k, w
        torch.cuda.empty_cache()
    return row


def bench_indexer_decode(n, batch):
    q1, k, w1, _ = indexer_inputs(n, batch=batch, seed=1, n_queries=1)
    qs = torch.full((batch,), n - 1, dtype=torch.int64, device="cuda")
    kl = torch.full((batch,), n, dtype=torch.int64, device="cuda")
    t_fused = bench(lambda: indexer_topk(q1, k, w1, TOPK, qs, kl), warmup=3, rep=20)
    t_plain = bench(lambda: plain_indexer_topk(q1, k, w1, TOPK), warmup=3, rep=20)
    bytes_k = k.numel() * 2
    return {"context": n, "batch": batch, "fused_s": t_fused, "plain_s": t_plain,
            "fused_k_tbps": bytes_k / t_fused / 1e12}


def bench_decode_topk(n, batch, reps=20):
    """The decode indexer + top-k (FP8, one query per sequence over n keys) as a CUDA graph replays it,
    with torch.topk on the fully written scores (the few-rows default) vs the one-program-per-row radix
    kernel; microseconds per call and whether both pick the same sets."""
    from indexcache.kernels import indexer as ix
    q, k, w, ks = indexer_inputs(n, batch=batch, fp8=True, seed=3, n_queries=1)
    qs = torch.full((batch,), n - 1, dtype=torch.int64, device="cuda")
    kl = torch.full((batch,), n, dtype=torch.int64, device="cuda")
    row, picked = {"context": n, "batch": batch}, {}
    saved = ix.DECODE_ROWS_MIN_KEYS
    try:
        for name, threshold in (("torch_topk", 1 << 62), ("rows_kernel", 0)):
            ix.DECODE_ROWS_MIN_KEYS = threshold
            out = torch.empty(batch, 1, TOPK, dtype=torch.int32, device="cuda")
            indexer_topk(q, k, w, TOPK, qs, kl, k_scale=ks, out=out)          # compile and warm up
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                indexer_topk(q, k, w, TOPK, qs, kl, k_scale=ks, out=out)
            t = bench(lambda: [graph.replay() for _ in range(reps)], warmup=2, rep=5) / reps
            row[f"{name}_us"] = t * 1e6
            picked[name] = out.sort(dim=-1).values.clone()
    finally:
        ix.DECODE_ROWS_MIN_KEYS = saved
    row["same_sets"] = bool(torch.equal(picked["torch_topk"], picked["rows_kernel"]))
    row["rows_kernel_speedup"] = row["torch_topk_us"] / row["rows_kernel_us"]
    return row


def bench_mla(n_queries, batch, heads=20, dc=512, dr=64, s=65536, k_sel=TOPK, **cfg):
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(batch, n_queries, heads, dc + dr, device="cuda", generator=g, dtype=torch.bfloat16)
    kv = torch.randn(batch, s, dc + dr, device="cuda", generator=g, dtype=torch.bfloat16)
    idx = torch.randint(0, s, (batch, n_queries, k_sel), device="cuda", generator=g, dtype=torch.int32)
    t = bench(lambda: sparse_attention_mla(q, kv, idx, 0.0625, dc, **cfg), warmup=2, rep=5)
    flops = batch * n_queries * heads * k_sel * (dc + dr + dc) * 2
    bytes_ = batch * n_queries * k_sel * (dc + dr) * 2          # each selected row read once per query
    return {"queries": n_queries, "batch": batch, **cfg, "s": t, "tflops": flops / t / 1e12,
            "gather_tbps": bytes_ / t / 1e12}


def bench_mla_kv_formats(n_queries, batch, heads=20, dc=512, dr=64, s=65536, k_sel=TOPK, peaks=None):
    """Sparse MLA over the bf16 latent cache and over its FP8 form (e4m3 latent + fp32 scale per key,
    bf16 RoPE key), same queries, same indices: time, gather rate and the output difference."""
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(batch, n_queries, heads, dc + dr, device="cuda", generator=g, dtype=torch.bfloat16)
    kv = torch.randn(batch, s, dc + dr, device="cuda", generator=g, dtype=torch.bfloat16)
    idx = torch.randint(0, s, (batch, n_queries, k_sel), device="cuda", generator=g, dtype=torch.int32)
    latent8, latent_scale = ref.quantize_latent_fp8(kv[..., :dc])                  # (B, S, dc), (B, S)
    k_rope = kv[..., dc:].contiguous()                                             # (B, S, dr) bf16
    t_bf16 = bench(lambda: sparse_attention_mla(q, kv, idx, 0.0625, dc), warmup=2, rep=5)
    t_fp8 = bench(lambda: sparse_attention_mla_fp8(q, latent8, latent_scale, k_rope, idx, 0.0625), warmup=2, rep=5)
    a = sparse_attention_mla(q, kv, idx, 0.0625, dc).float()
    b = sparse_attention_mla_fp8(q, latent8, latent_scale, k_rope, idx, 0.0625).float()
    reads = batch * n_queries * k_sel                                              # selected rows gathered
    row = {"queries": n_queries, "batch": batch, "bf16_s": t_bf16, "fp8_kv_s": t_fp8,
           "fp8_kv_speedup": t_bf16 / t_fp8, "fp8_vs_bf16_rel_err": float((a - b).norm() / a.norm()),
           "bf16_gather_tbps": reads * (dc + dr) * 2 / t_bf16 / 1e12,
           "fp8_gather_tbps": reads * (dc + 2 * dr + 4) / t_fp8 / 1e12}
    if peaks:
        row["bf16_frac_copy_bw"] = row["bf16_gather_tbps"] / peaks["copy_tbps"]
        row["fp8_frac_copy_bw"] = row["fp8_gather_tbps"] / peaks["copy_tbps"]
    del q, kv, idx, latent8, latent_scale, k_rope, a, b
    torch.cuda.empty_cache()
    return row


def mla_indices(kind, n_queries, s, k_sel, g):
    """(1, n_queries, k_sel) int32 indices for the last n_queries positions of an s-token context.
    "uniform": distinct random keys over the whole causal range (no locality between queries);
    "clustered": like a trained indexer's choice, 3/4 from a shared hot set of 2 x k_sel keys (neighbouring
    queries pick mostly the same rows, so many gathers hit L2) and 1/4 spread over the context."""
    if kind == "uniform":
        r = torch.rand(n_queries, s, device="cuda", generator=g)
        return r.topk(k_sel, dim=1).indices.to(torch.int32)[None]
    hot = torch.randperm(s, device="cuda", generator=g)[:2 * k_sel]
    n_hot = 3 * k_sel // 4
    pick = torch.rand(n_queries, 2 * k_sel, device="cuda", generator=g).topk(n_hot, dim=1).indices
    far = torch.randint(0, s, (n_queries, k_sel - n_hot), device="cuda", generator=g)
    return torch.cat([hot[pick], far], dim=1).to(torch.int32)[None]


MLA_LAYOUT_CONFIGS = (("heads_m", MLA_PREFILL_TILES["heads_m"]), ("keys_m", MLA_PREFILL_TILES["keys_m"]),
                      ("keys_m", dict(block_k=64, num_warps=4, num_stages=2)))


def mla_layout_rows(n_queries=8192, s=200000, heads=20, dc=512, dr=64, k_sel=TOPK, budget_s=120.0):
    """Sparse MLA prefill at the 200K shape (the last n_queries of a 200K context, the 30B shape's 20 heads),
    every prefill layout/tile config of MLA_LAYOUT_CONFIGS on uniform and clustered indices: time, TFLOP/s,
    gather rate, and each config's output against the first config's."""
    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(1, n_queries, heads, dc + dr, device="cuda", generator=g, dtype=torch.bfloat16) * 0.5
    kv = torch.randn(1, s, dc + dr, device="cuda", generator=g, dtype=torch.bfloat16)
    flops = n_queries * heads * k_sel * (dc + dr + dc) * 2
    bytes_ = n_queries * k_sel * (dc + dr) * 2
    rows, t0 = [], time.time()
    for kind in ("uniform", "clustered"):
        idx = mla_indices(kind, n_queries, s, k_sel, g)
        first = None
        for layout, cfg in MLA_LAYOUT_CONFIGS:
            if time.time() - t0 > budget_s:
                break
            row = {"indices": kind, "layout": layout, **cfg, "queries": n_queries, "context": s}
            try:
                out = sparse_attention_mla(q, kv, idx, 0.0625, dc, layout=layout, **cfg)
                t = bench(lambda: sparse_attention_mla(q, kv, idx, 0.0625, dc, layout=layout, **cfg), warmup=2, rep=5)
                if first is None:
                    first = out.float()
                row.update(s=t, tflops=flops / t / 1e12, gather_tbps=bytes_ / t / 1e12,
                           rel_diff_vs_first=float((out.float() - first).norm() / first.norm()),
                           per_layer_200k_s=t * 200000 / n_queries)
            except Exception as e:
                row["error"] = repr(e)[:300]
            rows.append(row)
            print("mla_layout", json.dumps(row), flush=True)
    return rows


MLA_KV_CASES = ((4096, 1), (1, 1), (1, 32))     # a 4K-token prefill chunk; decode at batch 1 and 32


def mla_kv_format_rows(peaks):
    rows = []
    for nq, batch in MLA_KV_CASES:
        try:
            row = bench_mla_kv_formats(nq, batch, peaks=peaks)
        except Exception as e:  # a failure is recorded, not hidden
            row = {"queries": nq, "batch": batch, "error": repr(e)[:500]}
        rows.append(row)
        print("mla_kv", json.dumps(row), flush=True)
    return rows


def print_mla_kv(rows):
    print("sparse MLA, bf16 latent cache vs FP8 latent cache (same queries and indices; gather per key "
          "1152 B vs 644 B)")
    for row in rows:
        if "error" in row:
            print(f"q{row['queries']} b{row['batch']} ERROR {row['error'][:100]}")
            continue
        print(f"queries {row['queries']:>5} batch {row['batch']:>3}: bf16 {1e3 * row['bf16_s']:.3f} ms "
              f"({row['bf16_gather_tbps']:.2f} TB/s)  fp8 {1e3 * row['fp8_kv_s']:.3f} ms "
              f"({row['fp8_gather_tbps']:.2f} TB/s)  {row['fp8_kv_speedup']:.2f}x  "
              f"rel diff {row['fp8_vs_bf16_rel_err']:.3f}")


def sweep_scores_configs(n=65536):
    """Scores-stage time at one context for a few tile shapes (picks the kernel's defaults)."""
    q, k, w, _ = indexer_inputs(n, seed=3)
    qs = torch.zeros(1, dtype=torch.int64, device="cuda")
    kl = torch.full((1,), n, dtype=torch.int64, device="cuda")
    chunk = 8192
    buf = torch.empty(1, chunk, n, device="cuda")
    flops = causal_flops(n, n, 0)
    rows = []
    for bt, bs, warps, stages in ((64, 128, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 256, 8, 3),
                                  (128, 256, 8, 2), (128, 128, 4, 4), (64, 128, 4, 4)):
        def run():
            for t0 in range(0, n, chunk):
                indexer_scores_into(q, k, w, qs, kl, None, t0, t0 + chunk, buf, False,
                                    block_t=bt, block_s=bs, num_warps=warps, num_stages=stages)
        try:
            t = bench(run)
            rows.append({"block_t": bt, "block_s": bs, "warps": warps, "stages": stages, "s": t,
                         "tflops": flops / t / 1e12})
        except Exception as e:
            rows.append({"block_t": bt, "block_s": bs, "warps": warps, "stages": stages, "error": repr(e)[:300]})
        print("sweep", json.dumps(rows[-1]), flush=True)
    return rows


def sweep_topk_configs(n=131072, rows=4096):
    """Radix top-k time for a few (BLOCK, warps) over rows at the end of an n-token context."""
    g = torch.Generator(device="cuda").manual_seed(4)
    scores = torch.randn(1, rows, n, device="cuda", generator=g)
    out = torch.empty(1, rows, TOPK, dtype=torch.int32, device="cuda")
    qs = torch.full((1,), n - rows, dtype=torch.int64, device="cuda")
    kl = torch.full((1,), n, dtype=torch.int64, device="cuda")
    result = []
    for block, warps in ((1024, 8), (2048, 8), (4096, 16), (1024, 4), (512, 4), (2048, 16), (4096, 8)):
        try:
            t = bench(lambda: topk_rows_into(scores, out, qs, kl, 0, TOPK, block=block, num_warps=warps))
            row = {"block": block, "warps": warps, "s": t, "row_reads_tbps": rows * n * 4 / t / 1e12}
        except Exception as e:
            row = {"block": block, "warps": warps, "error": repr(e)[:300]}
        result.append(row)
        print("topk_sweep", json.dumps(row), flush=True)
    return result


def served_cases() -> dict:
    """Kernels as the served model calls them. MoE at the 30B shape (E=64, top-4, D=2048, I=1536, bf16):
    the gather GEMVs vs the grouped GEMM per decode batch (sets moe.GATHER_MAX_PAIRS). The FP8 indexer over
    a 16K chunk of queries at the end of a 64K context: keys read in place from a one-slot cache through
    k_slots (what the model does on the GPU) vs a plain (1, S, D) tensor."""
    from indexcache.kernels import moe
    out = {"moe": [], "indexer": []}
    E, k, Dm, I = 64, 4, 2048, 1536
    g = torch.Generator(device="cuda").manual_seed(0)
    wgu = torch.randn(E, 2 * I, Dm, device="cuda", generator=g, dtype=torch.bfloat16) * Dm ** -0.5
    wd = torch.randn(E, Dm, I, device="cuda", generator=g, dtype=torch.bfloat16) * I ** -0.5
    for n in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(n, Dm, device="cuda", generator=g, dtype=torch.bfloat16)
        top_w = torch.rand(n, k, device="cuda", generator=g)
        top_e = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(n)])
        row = {"tokens": n, "pairs": n * k}
        for path in ("gather", "grouped"):
            row[f"{path}_ms"] = 1e3 * bench(lambda: moe.moe_routed(x, top_w, top_e, wgu, wd, path), warmup=2, rep=10)
        out["moe"].append(row)
        print("moe", json.dumps(row), flush=True)
    del wgu, wd
    S, T = 65536, 16384
    q, kk, w, ks = indexer_inputs(S, fp8=True, n_queries=T)
    qs, kl = torch.tensor([S - T], device="cuda"), torch.tensor([S], device="cuda")
    cache_k = torch.zeros(2, S + 4096, D, device="cuda", dtype=kk.dtype)    # a cache longer than the context
    cache_s = torch.zeros(2, S + 4096, device="cuda")
    cache_k[1, :S], cache_s[1, :S] = kk[0], ks[0]
    slots = torch.tensor([1], device="cuda")
    row = {"context": S, "queries": T}
    row["plain_s"] = bench(lambda: indexer_topk(q, kk, w, TOPK, qs, kl, k_scale=ks))
    row["in_place_s"] = bench(lambda: indexer_topk(q, cache_k[:, :S], w, TOPK, qs, kl, k_scale=cache_s[:, :S],
                                                   k_slots=slots))
    a = indexer_topk(q, kk, w, TOPK, qs, kl, k_scale=ks).sort(-1).values
    b = indexer_topk(q, cache_k[:, :S], w, TOPK, qs, kl, k_scale=cache_s[:, :S], k_slots=slots).sort(-1).values
    row["same_sets"] = bool(torch.equal(a, b))
    out["indexer"].append(row)
    print("indexer", json.dumps(row), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_kernels.json")
    ap.add_argument("--contexts", default="16384,65536,131072,200000")
    ap.add_argument("--plain-max", type=int, default=200000, help="largest context for the plain indexer")
    ap.add_argument("--sweep", action="store_true", help="also time a few tile shapes of the scores stage")
    ap.add_argument("--only-sweeps", action="store_true",
                    help="only the top-k tile sweep and the MLA decode cases (short run)")
    ap.add_argument("--only-mla", action="store_true",
                    help="only the peaks and sparse MLA, bf16 vs FP8 latent cache (short run)")
    ap.add_argument("--only-mla-layouts", action="store_true",
                    help="only sparse MLA prefill at the 200K shape: heads-on-M vs keys-on-M layouts and tiles")
    ap.add_argument("--only-decode-topk", action="store_true",
                    help="only the decode indexer + top-k: torch.topk vs the one-program-per-row kernel")
    ap.add_argument("--only-served", action="store_true",
                    help="only the kernels as the served model calls them (MoE paths, in-place indexer)")
    args = ap.parse_args()
    if args.only_decode_topk:
        rows = []
        for n in (16384, 65536, 131072, 200000):
            for batch in (1, 8, 32):
                rows.append(bench_decode_topk(n, batch))
                print("decode_topk", json.dumps(rows[-1]), flush=True)
        wins = [r["context"] for r in rows if r["rows_kernel_speedup"] > 1.05 and r["same_sets"]]
        # the smallest context from which the rows kernel wins at every measured batch and context
        ok = [n for n in sorted({r["context"] for r in rows})
              if all(r["rows_kernel_speedup"] > 1.05 and r["same_sets"] for r in rows if r["context"] >= n)]
        res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("BENCH_COMMIT", "?"),
               "decode_topk": rows, "rows_kernel_wins_at": wins, "min_keys": ok[0] if ok else None}
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print("DECODE_TOPK_MIN_S", ok[0] if ok else "none", flush=True)
        return
    if args.only_mla_layouts:
        rows = mla_layout_rows()
        # the layout the model should run: the faster on clustered indices at its default tiles, same output
        ok = [r for r in rows if r["indices"] == "clustered" and "s" in r and r["rel_diff_vs_first"] < 1e-2
              and all(r[k] == v for k, v in MLA_PREFILL_TILES[r["layout"]].items())]
        res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("BENCH_COMMIT", "?"),
               "mla_layouts": rows, "fastest_layout": min(ok, key=lambda r: r["s"])["layout"] if ok else None}
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    if args.only_served:
        res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("BENCH_COMMIT", "?"), **served_cases()}
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    if args.only_mla:
        res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("BENCH_COMMIT", "?"),
               "peaks": measure_peaks()}
        res["mla_kv_formats"] = mla_kv_format_rows(res["peaks"])
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print_mla_kv(res["mla_kv_formats"])
        return
    if args.only_sweeps:
        res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("BENCH_COMMIT", "?"),
               "topk_sweep": sweep_topk_configs(),
               "mla_decode": [bench_mla(1, 1), bench_mla(1, 32), bench_mla(1, 1, n_split=1), bench_mla(1, 32, n_split=1)]}
        for row in res["mla_decode"]:
            print("mla_decode", json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    contexts = [int(x) for x in args.contexts.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit or os.environ.get("BENCH_COMMIT", "?")}
    import triton
    result["triton"] = triton.__version__
    t0 = time.time()
    result["peaks"] = peaks = measure_peaks()
    print(f"peaks: bf16 {peaks['bf16_tflops']:.0f} TFLOP/s, fp8 {peaks['fp8_tflops']:.0f} TFLOP/s, "
          f"copy {peaks['copy_tbps']:.2f} TB/s", flush=True)
    result["sweep"] = sweep_scores_configs() if args.sweep else []
    result["prefill"] = []
    for n in contexts:
        try:
            row = bench_indexer_prefill(n, peaks, args.plain_max)
        except Exception as e:  # keep the rest of the run: a failure is recorded, not hidden
            row = {"context": n, "error": repr(e)[:500]}
        result["prefill"].append(row)
        print("prefill", json.dumps(row), flush=True)
    result["decode"] = []
    for n in contexts:
        for batch in (1, 32):
            try:
                row = bench_indexer_decode(n, batch)
            except Exception as e:
                row = {"context": n, "batch": batch, "error": repr(e)[:500]}
            result["decode"].append(row)
            print("decode", json.dumps(row), flush=True)
    result["mla"] = []
    cases = [(4096, 1, {}), (1, 1, {}), (1, 32, {})]
    if args.sweep:
        cases += [(4096, 1, dict(block_k=bk, num_warps=nw, num_stages=ns))
                  for bk, nw, ns in ((32, 8, 1), (32, 8, 3), (64, 8, 2), (32, 4, 2), (16, 4, 3))]
    for nq, batch, cfg in cases:
        try:
            row = bench_mla(nq, batch, **cfg)
        except Exception as e:
            row = {"queries": nq, "batch": batch, "error": repr(e)[:500]}
        result["mla"].append(row)
        print("mla", json.dumps(row), flush=True)
    result["mla_kv_formats"] = mla_kv_format_rows(peaks)
    result["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)


def print_table(r):
    p = r["peaks"]
    print(f"\n{r['gpu']} torch {r['torch']} triton {r['triton']} commit {r['commit']}")
    print(f"peaks: bf16 {p['bf16_tflops']:.0f} TF/s  fp8 {p['fp8_tflops']:.0f} TF/s  copy {p['copy_tbps']:.2f} TB/s")
    print("prefill indexer (one layer, whole causal context, top-2048)")
    print(f"{'ctx':>7} {'bf16 s':>8} {'TF/s':>6} {'%pk':>5} {'scores':>7} {'topk':>7} {'fp8 s':>8} {'TF/s':>6} {'%pk':>5} {'plain s':>8} {'x':>5}")
    for row in r["prefill"]:
        if "error" in row:
            print(f"{row['context']:>7} ERROR {row['error'][:100]}")
            continue
        print(f"{row['context']:>7} {row['bf16_s']:8.3f} {row['bf16_tflops']:6.0f} {100*row['bf16_frac_of_peak']:5.0f}"
              f" {row['bf16_scores_s']:7.3f} {row['bf16_topk_s']:7.3f} {row['fp8_s']:8.3f} {row['fp8_tflops']:6.0f}"
              f" {100*row['fp8_frac_of_peak']:5.0f} {row.get('plain_s', math.nan):8.3f} {row.get('speedup_bf16_vs_plain', math.nan):5.1f}")
    print("top-k: radix select vs sampled threshold (same sets?; rows sampled / whole-row fallback, last chunk)")
    for row in r["prefill"]:
        if "error" in row or "fp8_topk_sampled_s" not in row:
            continue
        flops = causal_flops(row["context"], row["context"], 0)
        print(f"{row['context']:>7} top-k radix {row['fp8_topk_s']:.3f} s  sampled {row['fp8_topk_sampled_s']:.3f} s "
              f"({row['fp8_topk_s'] / row['fp8_topk_sampled_s']:.2f}x)  same sets {row['topk_sampled_same_sets']}  "
              f"rows {row['topk_sampled_rows']} / {row['topk_sampled_fallback_rows']}  |  fp8 indexer with sampled "
              f"top-k {row['fp8_sampled_s']:.3f} s {flops / row['fp8_sampled_s'] / 1e12:.0f} TF/s "
              f"{100 * flops / row['fp8_sampled_s'] / 1e12 / r['peaks']['fp8_tflops']:.0f} % of peak")
    print("decode indexer (one query per sequence)")
    for row in r["decode"]:
        if "error" in row:
            print(f"{row['context']:>7} b{row['batch']} ERROR {row['error'][:100]}")
            continue
        print(f"{row['context']:>7} b{row['batch']:<3} fused {1e3*row['fused_s']:.3f} ms  plain {1e3*row['plain_s']:.3f} ms  "
              f"K read {row['fused_k_tbps']:.2f} TB/s")
    print("sparse MLA attention (20 heads, 512+64, top-2048)")
    for row in r["mla"]:
        if "error" in row:
            print(f"q{row['queries']} b{row['batch']} ERROR {row['error'][:100]}")
            continue
        print(f"queries {row['queries']:>5} batch {row['batch']:>3} {row.get('block_k', '')} {row.get('num_warps', '')} {row.get('num_stages', '')}: {1e3*row['s']:.3f} ms  {row['tflops']:.0f} TF/s  "
              f"gather {row['gather_tbps']:.2f} TB/s")
    if r.get("mla_kv_formats"):
        print_mla_kv(r["mla_kv_formats"])


if __name__ == "__main__":
    main()
