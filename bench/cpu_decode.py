"""Where a CPU decode step's time goes, and what the C decode kernels (kernels/cpu_decode.py) change: the bundled
SmolLM2 DSA model (bf16) in-process, no server.

    python bench/cpu_decode.py --json bench/results/cpu_decode.json

1. GEMV: every projection of the 30 layers (S-layer rows of the packed q|k|v weight, o, gate|up, down) and the
   LM head once, at 1..8 input rows, through the AVX-512 kernel, the AMX kernel (packed tiles), F.linear
   (oneDNN) in bf16 and F.linear in fp32 on fp32 copies (the other `--dtype`); best and median of --repeats,
   interleaved.
2. The bandwidth floor: a plain read (sum, as fp32 words) of as many bytes as those weights, best of
   --repeats: the fastest a step that reads every weight once can go here.
3. Engine decode steps: ms per step with the decode kernels on and off (the PyTorch path), batch 1 and 8,
   contexts ~30 (dense) and ~1,000 (past top-k 512: the indexer selects), medians of --steps steps after
   a warm-up; the greedy tokens of one request through both paths.
4. serve_vs_peer's 8-stream workload without the server: 8 prompts of 64 tokens submitted together, 64 greedy
   tokens each, tokens / wall time (prefill included), median of --repeats // 2 + 1 runs, kernels on and off.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")    # what the local server gives its replica (serving/app.py)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "serving"))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from indexcache.engine import Engine
    from indexcache.engine.sampling import SamplingParams
    from indexcache.kernels import cpu_decode
    from indexcache.model.loading import load_model
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if cpu_decode.available() is not None:
        raise SystemExit(f"the decode kernels do not run here: {cpu_decode.available()}")
    model, pattern, _, _ = load_model("smollm2", "bfloat16")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "command": " ".join(sys.argv), "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu": cpu_decode_cpu_name(),
              "loadavg_before": [round(x, 2) for x in os.getloadavg()]}

    # 1. GEMV sweep over the model's own weights
    probe = Engine(model, pattern=pattern, max_batch_size=1, max_model_len=64).cpu_fast
    weights = [w for layer in probe.layers for w in (layer.w_in[:probe.v_end], layer.w_o, layer.w_gate_up,
                                                     layer.w_down)] + [probe.lm_head]
    weights32 = [w.float() for w in weights]
    tiles = [cpu_decode.pack_amx(w) for w in weights] if cpu_decode.amx_available() is None else None
    nbytes = sum(w.numel() * 2 for w in weights)
    result["weight_bytes_bf16"] = nbytes
    gemv_rows = []
    for rows in (1, 2, 4, 8):
        xs = {k: torch.randn(rows, k).bfloat16() for k in {w.shape[1] for w in weights}}
        xs32 = {k: x.float() for k, x in xs.items()}
        runs = {"kernel": lambda: [cpu_decode.gemv_bf16(xs[w.shape[1]], w, torch.get_num_threads()) for w in weights],
                "F.linear bf16": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                **({"amx": lambda: [cpu_decode.amx_gemv_bf16(xs[w.shape[1]], t, torch.get_num_threads())
                                    for w, t in zip(weights, tiles)]} if tiles is not None else {}),
                "F.linear fp32": lambda: [F.linear(xs32[w.shape[1]], w) for w in weights32]}
        times = {name: [] for name in runs}
        for name, fn in runs.items():
            fn()
        for _ in range(args.repeats):          # interleaved: a noisy neighbour hits all three alike
            for name, fn in runs.items():
                times[name] += timed(fn, 1)
        row = {"rows": rows}
        for name, t in times.items():
            row[name] = {"best_ms": round(1e3 * min(t), 2), "median_ms": round(1e3 * statistics.median(t), 2)}
        for name in ("kernel", "amx"):
            if name in times:
                row[name + "_GBps_best"] = round(nbytes / min(times[name]) / 1e9, 1)
        gemv_rows.append(row)
        print(json.dumps(row), flush=True)
    result["gemv"] = gemv_rows

    # 2. bandwidth floor: read the same number of bytes once
    block = torch.ones(nbytes // 4, dtype=torch.float32)
    block.sum()
    t = timed(block.sum, args.repeats)
    result["read_floor"] = {"best_ms": round(1e3 * min(t), 2), "GBps_best": round(nbytes / min(t) / 1e9, 1)}
    print(json.dumps(result["read_floor"]), flush=True)
    del block

    # 3. engine decode steps, kernels on and off
    steps = []
    for batch, context in ((1, 30), (1, 1000), (8, 30), (8, 1000)):
        row = {"batch": batch, "context": context}
        for kernels in (True, False):
            engine = Engine(model, pattern=pattern, max_batch_size=8, max_model_len=2048, chunk_size=1024,
                            cpu_decode_kernels=kernels)
            params = SamplingParams(max_new_tokens=100_000, temperature=0.0)
            reqs = [engine.submit([(7 * i + j) % 40000 + 100 for j in range(context)], params, lambda c: None)
                    for i in range(batch)]
            while any(r.prefilling or not r.output for r in reqs):
                engine.step()
            for _ in range(3):
                engine.step()
            t = timed(engine.step, args.steps)
            key = "kernels" if kernels else "pytorch"
            row[key + "_ms"] = round(1e3 * statistics.median(t), 2)
            row[key + "_tok_s"] = round(batch / statistics.median(t), 1)
        steps.append(row)
        print(json.dumps(row), flush=True)
    result["steps"] = steps

    # 4. 8 streams x 64 tokens in-process
    streams = {}
    for kernels in (True, False):
        engine = Engine(model, pattern=pattern, max_batch_size=8, max_model_len=2048, chunk_size=1024,
                        cpu_decode_kernels=kernels)
        runs = []
        for rep in range(args.repeats // 2 + 1):
            t0 = time.perf_counter()
            reqs = [engine.submit([(97 * i + j + rep) % 40000 + 100 for j in range(64)],
                                  SamplingParams(max_new_tokens=64, temperature=0.0), lambda c: None) for i in range(8)]
            prefilled = None
            while engine.step():
                if prefilled is None and all(r.output for r in reqs):
                    prefilled = time.perf_counter() - t0
            wall = time.perf_counter() - t0
            runs.append((sum(len(r.output) for r in reqs) / wall, prefilled, wall))
        tok_s, prefilled, wall = sorted(runs)[len(runs) // 2]
        streams["kernels" if kernels else "pytorch"] = {"tok_s": round(tok_s, 1), "prefill_s": round(prefilled, 3),
                                                        "wall_s": round(wall, 3)}
    result["streams8x64"] = streams
    print(json.dumps(streams), flush=True)

    # greedy tokens of one request, both paths
    outs = []
    for kernels in (True, False):
        engine = Engine(model, pattern=pattern, max_batch_size=1, max_model_len=2048, cpu_decode_kernels=kernels)
        req = engine.submit(list(range(200, 230)), SamplingParams(max_new_tokens=64, temperature=0.0), lambda c: None)
        while engine.step():
            pass
        outs.append(req.output)
    same = next((i for i, (a, b) in enumerate(zip(*outs)) if a != b), len(outs[0]))
    result["greedy_64"] = {"equal_prefix": same, "tokens": len(outs[0])}
    print(json.dumps(result["greedy_64"]))
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def cpu_decode_cpu_name() -> str:
    from indexcache.model.cpu_dtype import cpu_name
    return cpu_name()


if __name__ == "__main__":
    main()
