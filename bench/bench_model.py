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

from indexcache.kernels import quantize_indexer_fp8  # noqa: E402,F401
from indexcache.kernels.indexer import indexer_scores_into, topk_rows_into  # noqa: E402
from indexcache.kernels.sparse_attention import sparse_attention_mla  # noqa: E402

PATTERNS = {
    "all-F": "F" * 47,
    "1/2": "FSFSFSSSSFSFFFFSFFSSFFSFFFSSFFSSFSSSSFSFFFSFSSF",
    "1/4": "FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS",
    "uniform-1/4": "".join("F" if (l < 2 or (l - 1) % 4 == 0) else "S" for l in range(47)),
}
PHASES = ("indexer", "topk", "attention", "ffn", "rest")
# BENCH_DEVICE=cpu with TRITON_INTERPRET=1 and a tiny Cfg is a smoke test of this script, no timing
DEV = os.environ.get("BENCH_DEVICE", "cuda")


class Cfg:
    layers = 47
    hidden = 2048
    heads = 20
    q_rank, kv_rank = 768, 512
    nope, rope, v_dim = 192, 64, 256
    experts, topk_experts, expert_width = 64, 4, 1536
    dense_width = 10240
    idx_heads, idx_dim, idx_topk = 32, 128, 2048


def rand(*shape, scale=None):
    w = torch.randn(*shape, device=DEV, dtype=torch.bfloat16)
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
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def rope(x, pos):
    """Rotate-half RoPE on the last dim of x (..., T, [heads,] 64) at absolute positions pos (T,)."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * inv[None]                          # (T, d/2)
    if x.dim() == 3:
        ang = ang[:, None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


def swiglu(h, gu, d):
    a, b = (h @ gu).chunk(2, dim=-1)
    return (F.silu(a) * b) @ d


def moe(h, w: Weights, c: Cfg, grouped: dict):
    """Routed top-4 of 64 experts + 1 shared. Tokens are sorted by expert and run as one grouped
    GEMM (torch._grouped_mm) when available, else one matmul per expert."""
    T = h.shape[0]
    logits = (h @ w.router).float()
    top_w, top_e = logits.softmax(-1).topk(c.topk_experts, dim=-1)           # (T, 4)
    flat_e = top_e.reshape(-1)
    order = flat_e.argsort()
    tok = order // c.topk_experts
    xs = h[tok]                                                              # (T*4, hidden)
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
    return (out + swiglu(h, w.shared_gu, w.shared_d).float()).to(h.dtype)


class PhaseTimer:
    """Records CUDA events at phase boundaries; sums per phase after one synchronisation."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.marks = []

    def mark(self, phase):
        if self.enabled:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((phase, ev))

    def totals(self):
        torch.cuda.synchronize()
        out = {p: 0.0 for p in PHASES}
        for (phase, a), (_, b) in zip(self.marks, self.marks[1:]):
            if phase in out:
                out[phase] += a.elapsed_time(b) / 1e3
        return out


class Model:
    def __init__(self, c: Cfg, w: Weights, max_len: int, pattern: str, fp8_indexer: bool, grouped: dict,
                 mla_cfg: dict):
        self.c, self.w, self.pattern, self.fp8 = c, w, pattern, fp8_indexer
        self.grouped, self.mla_cfg = grouped, mla_cfg
        L = c.layers
        self.latent = [torch.empty(1, max_len, c.kv_rank + c.rope, device=DEV, dtype=torch.bfloat16)
                       for _ in range(L)]
        # an S layer writes no indexer K cache and allocates none
        kdt = torch.float8_e4m3fn if fp8_indexer else torch.bfloat16
        self.idx_k = [torch.empty(1, max_len, c.idx_dim, device=DEV, dtype=kdt) if p == "F" else None
                      for p in pattern]
        self.idx_ks = [torch.ones(1, max_len, device=DEV) if (p == "F" and fp8_indexer) else None
                       for p in pattern]

    def layer(self, l, x, pos, p0, idx_prev, timer, scores_buf):
        c, w = self.c, self.w
        T = x.shape[0]
        timer.mark("rest")
        h = rms(x)
        timer.mark("attention")
        q_lat = rms(h @ w.wq_a)                                               # (T, 768)
        q = (q_lat @ w.wq_b).view(T, c.heads, c.nope + c.rope)
        kv = h @ w.wkv_a                                                      # (T, 512 + 64)
        timer.mark("rest")
        q_rope = rope(q[..., c.nope:], pos)
        k_rope = rope(kv[:, c.kv_rank:], pos)
        self.latent[l][0, p0:p0 + T] = torch.cat([rms(kv[:, : c.kv_rank]), k_rope], -1)
        timer.mark("attention")
        q_abs = torch.einsum("thn,hnc->thc", q[..., : c.nope], w.w_uk)       # (T, 20, 512)
        q_full = torch.cat([q_abs, q_rope], -1)[None]                         # (1, T, 20, 576)
        qs = torch.full((1,), p0, dtype=torch.int64, device=DEV)
        kl = torch.full((1,), p0 + T, dtype=torch.int64, device=DEV)
        if self.pattern[l] == "F":
            timer.mark("indexer")
            iq = (q_lat @ w.wi_q).view(1, T, c.idx_heads, c.idx_dim)
            ik = F.layer_norm((h @ w.wi_k).float(), (c.idx_dim,)).to(torch.bfloat16)
            ik = torch.cat([rope(ik[:, :64], pos), ik[:, 64:]], -1)
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
        o = sparse_attention_mla(q_full, self.latent[l][:, : p0 + T], idx_prev, (c.nope + c.rope) ** -0.5, c.kv_rank,
                                 **self.mla_cfg)
        o = torch.einsum("thc,hcv->thv", o[0], w.w_uv).reshape(T, c.heads * c.v_dim) @ w.wo
        timer.mark("rest")
        x = x + o
        h = rms(x)
        timer.mark("ffn")
        f = swiglu(h, w.dense_gu, w.dense_d) if l == 0 else moe(h, w, c, self.grouped)
        timer.mark("rest")
        return x + f, idx_prev

    def forward(self, x, p0, timer, scores_buf):
        pos = torch.arange(p0, p0 + x.shape[0], device=DEV)
        idx = None
        for l in range(self.c.layers):
            x, idx = self.layer(l, x, pos, p0, idx, timer, scores_buf)
        timer.mark("end")
        return x


def prefill(model: Model, n: int, chunk: int):
    c = model.c
    scores_buf = torch.empty(1, chunk, n, device=DEV)
    timer = PhaseTimer()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for p0 in range(0, n, chunk):
        T = min(chunk, n - p0)
        x = torch.randn(T, c.hidden, device=DEV, dtype=torch.bfloat16)
        model.forward(x, p0, timer, scores_buf)
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    phases = timer.totals()
    return {"prefill_s": start.elapsed_time(end) / 1e3, "prefill_wall_s": wall, "phases": phases}


def decode(model: Model, n: int, steps: int = 20):
    """Per-token latency at context n (batch 1), caches holding random values."""
    c = model.c
    for l in range(c.layers):
        model.latent[l][0, :n].normal_()
        if model.idx_k[l] is not None:
            model.idx_k[l][0, :n] = torch.randn(n, c.idx_dim, device=DEV).to(model.idx_k[l].dtype)
    scores_buf = torch.empty(1, 1, n + 1, device=DEV)
    x = torch.randn(1, c.hidden, device=DEV, dtype=torch.bfloat16)
    off = PhaseTimer(enabled=False)
    result = {}
    # per-phase split from one eager step with events (launch gaps included), then graph replay
    model.forward(x, n, off, scores_buf)
    timer = PhaseTimer()
    model.forward(x, n, timer, scores_buf)
    result["decode_phases_eager"] = timer.totals()
    try:
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
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            graph.replay()
        b.record()
        torch.cuda.synchronize()
        per_token = a.elapsed_time(b) / 1e3 / steps
        result["decode_graph"] = True
    except Exception as e:  # MoE fallback path syncs and cannot be captured: time eager instead
        result["decode_graph"] = False
        result["decode_graph_error"] = repr(e)[:300]
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            model.forward(x, n, off, scores_buf)
        b.record()
        torch.cuda.synchronize()
        per_token = a.elapsed_time(b) / 1e3 / steps
    result["decode_s_per_token"] = per_token
    result["decode_tokens_per_s"] = 1.0 / per_token
    return result


def phase_rates(row, c: Cfg, peaks: dict):
    """Achieved rates of the prefill phases from their summed times (useful work only):
    indexer FLOPs over indexer + top-k time (the fused indexer's whole cost) and over the score
    stage alone; sparse MLA FLOPs and gathered bytes over attention time; MoE/FFN FLOPs."""
    n, ph = row["context"], row["phases"]
    f_layers = row["full_layers"]
    idx_flops = f_layers * (n * (n + 1) / 2) * c.idx_heads * c.idx_dim * 2
    attn_flops = c.layers * n * c.heads * min(c.idx_topk, n) * (2 * c.kv_rank + c.rope) * 2
    attn_bytes = c.layers * n * min(c.idx_topk, n) * (c.kv_rank + c.rope) * 2
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
            rates = phase_rates(r, Cfg(), peaks)
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
    args = ap.parse_args()
    if args.report:
        return report(args.report, args.peaks_from)
    torch.backends.cuda.matmul.allow_tf32 = True
    c = Cfg()
    contexts = [int(x) for x in args.contexts.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "commit": commit or os.environ.get("BENCH_COMMIT", "?"), "chunk": args.chunk,
           "fp8_indexer": args.fp8_indexer, "runs": [], "skipped": []}
    t_start = time.time()
    w = Weights(c)
    grouped = {}
    mla_cfg = best_mla_config(args.mla_config_from)
    res["mla_config"] = mla_cfg
    # warm-up: compile the kernels and the grouped GEMM path on a short prefill
    wt = args.warmup_tokens
    prefill(Model(c, w, wt, "F" * 46 + "S", args.fp8_indexer, grouped, mla_cfg), wt, wt // 2)
    names = args.patterns.split(",")
    for n in contexts:                      # contexts outer: a time-budget cut keeps whole comparisons
        for name in names:
            pattern = PATTERNS[name]
            if time.time() - t_start > args.time_budget:
                res["skipped"].append({"pattern": name, "context": n})
                continue
            row = {"pattern": name, "full_layers": pattern.count("F"), "context": n}
            try:
                model = Model(c, w, n + 1, pattern, args.fp8_indexer, grouped, mla_cfg)
                if n <= args.prefill_patterns_max_context or name in ("all-F", "1/4"):
                    row.update(prefill(model, n, args.chunk))
                if not args.no_decode:
                    row.update(decode(model, n))
                del model
            except Exception as e:
                row["error"] = repr(e)[:500]
            row["moe_grouped_gemm"] = grouped.get("ok")
            res["runs"].append(row)
            print("run", json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    res["moe_grouped_error"] = grouped.get("error")
    res["wall_s"] = time.time() - t_start
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print_table(res)


def print_table(res):
    print(f"\n{res['gpu']} torch {res['torch']} commit {res['commit']} chunk {res['chunk']} "
          f"fp8 indexer {res['fp8_indexer']}")
    print(f"{'pattern':>12} {'F':>3} {'ctx':>7} {'prefill s':>9} | {'indexer':>7} {'topk':>6} {'attn':>6} "
          f"{'ffn':>6} {'rest':>6} | {'tok/s':>6}")
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
              + f" | {r.get('decode_tokens_per_s', float('nan')):6.1f}")
    for r in res["runs"]:
        b = base.get(r["context"])
        if b and r["pattern"] != "all-F" and "error" not in r:
            sp = b.get("prefill_s", float("nan")) / r.get("prefill_s", float("nan"))
            sd = r.get("decode_tokens_per_s", float("nan")) / b.get("decode_tokens_per_s", float("nan"))
            print(f"speedup {r['pattern']:>12} @ {r['context']:>7}: prefill {sp:.2f}x  decode {sd:.2f}x")
    if res["skipped"]:
        print("skipped (time budget):", res["skipped"])


if __name__ == "__main__":
    main()
