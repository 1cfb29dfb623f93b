"""Where a long prefill's time goes on the CPU: the bundled SmolLM2 DSA model through the engine (CPU fast
forward, in-process, no server), one --prompt-tokens prompt of essay text, for each --chunk-sizes value.

    python bench/cpu_prefill.py --json bench/results/cpu_prefill.json

Per chunk size: wall seconds and the process's CPU seconds (all threads; other jobs on a shared machine
inflate wall time far more than CPU time), medians of --repeats after a warm-up; then one prefill under
torch.profiler, its self CPU time summed by op (the top --top ops).
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "serving"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="none")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from indexcache.engine import Engine
    from indexcache.engine.sampling import SamplingParams
    from indexcache.model.loading import load_model
    from indexcache.offline.corpora import heldout_essays
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    model, pattern, tokenizer, _ = load_model("smollm2", args.dtype)
    ids = tokenizer.encode(" ".join(d.text for d in heldout_essays()[:3]))[:args.prompt_tokens]
    engine = Engine(model, pattern=pattern, max_batch_size=8, max_model_len=2048, quantization=args.quantization)

    def prefill(chunk: int) -> tuple[float, float]:
        engine.chunk_size = chunk
        t0, c0 = time.perf_counter(), time.process_time()
        engine.submit(ids, SamplingParams(max_new_tokens=1), lambda c: None)
        while engine.step():
            pass
        return time.perf_counter() - t0, time.process_time() - c0

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "command": " ".join(sys.argv), "dtype": str(model.lm_head.weight.dtype),
              "pattern": pattern, "threads": torch.get_num_threads(), "load_before": os.getloadavg(), "runs": []}
    for chunk in args.chunk_sizes:
        times = [prefill(chunk) for _ in range(args.repeats + 1)][1:]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prefill(chunk)
        ops = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda kv: -kv[1])
        row = {"chunk_size": chunk, "wall_s": round(statistics.median(t for t, _ in times), 3),
               "cpu_s": round(statistics.median(c for _, c in times), 3),
               "wall_all": [round(t, 3) for t, _ in times], "cpu_all": [round(c, 3) for _, c in times],
               "profile_self_cpu_s": {k: round(v, 3) for k, v in ops[:args.top]}, "load": os.getloadavg()}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
