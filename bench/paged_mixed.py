"""One long and many short requests in one replica on the paged KV pool (issue 15), GPU.

    PYTHONPATH=serving python3 bench/paged_mixed.py --out $OUT/paged_mixed.json      # H200, ~3-4 min

The 30B-shape DSA model of bench_model.py (random bf16 weights, FP8 indexer), served by the `Engine` on a
paged pool sized from free GPU memory (`gpu_memory_utilization`, like vLLM). It records:
  - KV bytes per token, all-F vs the 1/4 pattern (latent of every layer + FP8 indexer keys of F layers),
    and how many tokens the same memory holds under each;
  - the pool: blocks, tokens, GB;
  - one --long (200K) request and --short (32) requests of --short-len tokens arriving --delay s later,
    served together: the long request's TTFT, the short ones' TTFT p50/p99 and their TPOT, preemptions.
With the slot cache the same replica would need max_batch_size x max_model_len rows for this.

`--compare-fifo`: the same mix (fresh prompts) served a second time by the same engine with
long_prefill_token_threshold=0 (first come, first served: the short requests wait for the long prefill),
after the run with the engine's short-first order ("mixed" in the output; the FIFO run is "mixed_fifo"):

    PYTHONPATH=serving python3 bench/paged_mixed.py --long 131072 --short 12 --compare-fifo --out $OUT/paged_mixed.json

(12 short requests: on an H100 the pool left beside the 131K prompt admits about 14 at once; more wait for blocks,
whatever the prefill order.)

CPU smoke test (no timing meaning):
    BENCH_DEVICE=cpu PYTHONPATH=serving python3 bench/paged_mixed.py --tiny --out /tmp/paged_mixed.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_model import DEV, DTYPE, SHAPE_30B, SHAPE_TINY, commit, pattern_for, random_model, random_prompt  # noqa: E402

from indexcache.engine import Engine, SamplingParams  # noqa: E402
from indexcache.model.config import ModelArgs  # noqa: E402
from indexcache.model.paged import kv_bytes_per_token  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="paged_mixed.json")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--pattern", default="1/4")
    ap.add_argument("--long", type=int, default=200_000)
    ap.add_argument("--short", type=int, default=32)
    ap.add_argument("--short-len", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--delay", type=float, default=1.0, help="seconds between the long and the short arrivals")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--long-prefill-token-threshold", type=int, default=None,
                    help="the engine's (default 4 x --chunk; 0: first come, first served)")
    ap.add_argument("--compare-fifo", action="store_true",
                    help="then serve the same mix again first come, first served (before/after in one run)")
    a = ap.parse_args()
    if a.tiny:
        a.long, a.short, a.short_len, a.gen, a.chunk, a.delay = 150, 4, 20, 4, 32, 0.0
    args = ModelArgs(**(SHAPE_TINY if a.tiny else SHAPE_30B))
    out: dict = {"commit": commit(), "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu"}
    fp8 = DEV == "cuda"
    patterns = {name: pattern_for(name, args.n_layers) for name in ("all-F", a.pattern)}
    out["kv_bytes_per_token"] = {name: kv_bytes_per_token(args, p, DTYPE, fp8) for name, p in patterns.items()}
    out["indexer_fp8"] = fp8

    t0 = time.perf_counter()
    model = random_model(args)
    out["model_build_s"] = time.perf_counter() - t0
    pattern = patterns[a.pattern]
    pool = ({"gpu_memory_utilization": a.gpu_memory_utilization} if DEV == "cuda"
            else {"kv_cache_tokens": a.long + a.short * (a.short_len + a.gen) + 4 * a.block_size})
    t0 = time.perf_counter()
    engine = Engine(model, pattern=pattern, max_batch_size=a.short + 1, max_model_len=a.long + a.gen + 2,
                    chunk_size=a.chunk, block_size=a.block_size,
                    long_prefill_token_threshold=a.long_prefill_token_threshold, **pool)
    out["engine_start_s"] = time.perf_counter() - t0
    per_token = out["kv_bytes_per_token"][a.pattern]
    pool_bytes = (engine.pool.usable) * a.block_size * per_token
    out["pool"] = {"blocks": engine.pool.usable, "block_size": a.block_size,
                   "tokens": engine.pool.usable * a.block_size, "gb": pool_bytes / 1e9,
                   "allocated_gb": engine.cache.nbytes() / 1e9,
                   "tokens_if_all_F": int(pool_bytes // out["kv_bytes_per_token"]["all-F"])}
    print(json.dumps(out), flush=True)

    gen = torch.Generator().manual_seed(0)   # one stream: the second run's prompts are new (no prefix hits)
    engine.start()
    out["mixed"] = serve_mix(engine, a, args, gen, per_token)
    print(json.dumps(out["mixed"]), flush=True)
    if a.compare_fifo:
        engine.long_prefill_token_threshold = 0   # read by the engine thread at each step; it is idle now
        out["mixed_fifo"] = serve_mix(engine, a, args, gen, per_token)
        print(json.dumps(out["mixed_fifo"]), flush=True)
    engine.stop()
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


def serve_mix(engine: Engine, a, args: ModelArgs, gen: torch.Generator, per_token: float) -> dict:
    """One long request, then --short ones --delay s later, all to the end: TTFTs, TPOT, preemptions."""
    stamps: dict[int, list[float]] = {}
    arrivals: dict[int, float] = {}
    errors: list[str] = []
    done = threading.Event()
    finished: list[int] = []
    n = 1 + a.short

    def emitter(i):
        def emit(chunk):
            if chunk.token_id is not None:
                stamps.setdefault(i, []).append(time.perf_counter())
            if chunk.finish_reason == "error":
                errors.append(chunk.error)
            if chunk.finish_reason is not None:
                finished.append(i)
                if len(finished) == n:
                    done.set()
        return emit

    params = SamplingParams(max_new_tokens=a.gen)
    arrivals[0] = time.perf_counter()
    reqs = [engine.submit(random_prompt(a.long, args.vocab_size, gen), params, emitter(0))]
    time.sleep(a.delay)
    for i in range(1, n):
        arrivals[i] = time.perf_counter()
        reqs.append(engine.submit(random_prompt(a.short_len, args.vocab_size, gen), params, emitter(i)))
    peak_usage = 0.0
    while not done.wait(timeout=0.05):
        peak_usage = max(peak_usage, engine.pool.usage())
        if time.perf_counter() - arrivals[0] > 180:
            errors.append("timed out after 180 s")
            break
    wall = time.perf_counter() - arrivals[0]
    short_ttft = sorted(stamps[i][0] - arrivals[i] for i in range(1, n) if i in stamps)
    short_tpot = sorted((s[-1] - s[0]) / (len(s) - 1) for i, s in stamps.items() if i > 0 and len(s) > 1)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    return {
        "long_prefill_token_threshold": engine.long_prefill_token_threshold,
        "long_tokens": a.long, "short_requests": a.short, "short_tokens": a.short_len, "generated": a.gen,
        "wall_s": wall, "errors": errors, "preemptions": sum(r.preemptions for r in reqs),
        "long_ttft_s": stamps[0][0] - arrivals[0] if 0 in stamps else None,
        "long_tokens_out": len(stamps.get(0, [])),
        "short_ttft_p50_s": pct(short_ttft, 0.5), "short_ttft_p99_s": pct(short_ttft, 0.99),
        "short_tpot_p50_s": pct(short_tpot, 0.5), "peak_pool_usage": peak_usage,
        "slot_cache_gb_for_the_same": (a.short + 1) * (a.long + a.gen + 2) * per_token / 1e9,
    }


if __name__ == "__main__":
    main()
