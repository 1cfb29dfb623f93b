"""Weight-only int8 (`quantization="int8"`) on the bundled SmolLM2 DSA model against its bf16 weights, on the CPU:
what quantising costs in quality and what it buys in decode speed (issue 20).

    python bench/int8_quality.py --json bench/results/int8_quality.json

Quality:
  - perplexity on held-out windows (the essays and Shakespeare of `indexcache eval`, `window_nll` of
    offline/evaluate.py, the checkpoint's pattern, sparse attention) of the bf16 model and of the same model
    with every linear weight and the LM head replaced by its int8 dequantised value (what the int8 fast
    forward multiplies by; the embedding lookup stays bf16 in both);
  - greedy tokens through the engine (CPU fast forward) with quantization none and int8, for a few
    prompts: how many of the first N tokens agree, and where the first difference is.
Speed, in-process (no server): prefill of a --long-prompt-tokens prompt, decode tok/s of one request and of
8 requests decoded together, bf16 then int8 then bf16 again (the machine is shared: the load average is
recorded, and the two bf16 runs bracket the int8 one); also the CPU seconds the process spent (all threads;
the 1-request figure per token includes its 20-token prompt), which other jobs on the machine inflate far
less than wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "serving"))

from serve_vs_peer import git_commit  # noqa: E402 (bench/ is the script's directory)

PROMPTS = ["Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,",
           "The three most important things to know about compound interest are",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


def perplexities(model, twin, tokenizer, pattern: str, context: int, windows: int) -> dict:
    import math

    from indexcache.offline.evaluate import heldout_windows, window_nll
    out = {}
    for source, wins in heldout_windows(tokenizer.encode, context, windows).items():
        row = {}
        for name, m in (("bfloat16", model), ("int8", twin)):
            nll = n = 0
            for w in wins:
                total, count = window_nll(m, w, "sparse", pattern)
                nll, n = nll + total, n + count
            row[name] = round(math.exp(nll / n), 4)
        row["windows"] = len(wins)
        row["relative_change"] = round(row["int8"] / row["bfloat16"] - 1, 5)
        out[source] = row
    return out


def run_engine(model, pattern, quantization: str, prompts, new_tokens: int):
    from indexcache.engine import Engine
    from indexcache.engine.sampling import SamplingParams
    engine = Engine(model, pattern=pattern, max_batch_size=8, max_model_len=2048, chunk_size=256,
                    quantization=quantization)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=new_tokens, temperature=0.0), lambda c: None)
            for p in prompts]
    while engine.step():
        pass
    return engine, [r.output for r in reqs]


def agreement(a: list[int], b: list[int]) -> dict:
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"tokens": min(len(a), len(b)), "equal_prefix": first,
            "equal_positions": sum(x == y for x, y in zip(a, b))}


def speed(engine, long_ids, decode_ids, batch, decode_tokens: int, repeats: int) -> dict:
    from indexcache.engine.sampling import SamplingParams

    def run(prompts, n):
        stamps = [[] for _ in prompts]
        reqs = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0),
                              lambda c, s=s: s.append(time.perf_counter())) for p, s in zip(prompts, stamps)]
        t0, c0 = time.perf_counter(), time.process_time()
        while engine.step():
            pass
        cpu.append(time.process_time() - c0)
        return t0, stamps, reqs

    prefill, one, eight, cpu = [], [], [], []
    prefill_cpu, one_cpu = [], []
    for rep in range(repeats + 1):
        t0, stamps, _ = run([long_ids], 1)
        t_prefill = stamps[0][0] - t0
        c_prefill = cpu[-1]
        _, stamps, reqs = run([decode_ids], decode_tokens)
        s = stamps[0]
        t_one = (len(reqs[0].output) - 1) / (s[-1] - s[0])
        c_one = cpu[-1] / len(reqs[0].output)
        _, stamps, reqs = run(batch, decode_tokens)
        start, end = max(s[0] for s in stamps), min(s[-1] for s in stamps)   # all 8 decoding together
        steps = min(sum(start <= t <= end for t in s) for s in stamps)
        t_eight = 8 * (steps - 1) / (end - start)
        if rep:
            prefill.append(t_prefill), one.append(t_one), eight.append(t_eight)
            prefill_cpu.append(c_prefill), one_cpu.append(c_one)
    return {"prefill_long_s": round(statistics.median(prefill), 3), "prefill_all": [round(x, 3) for x in prefill],
            "decode1_tok_s": round(statistics.median(one), 1), "decode1_all": [round(x, 1) for x in one],
            "decode8_tok_s": round(statistics.median(eight), 1), "decode8_all": [round(x, 1) for x in eight],
            # CPU seconds of this process (all threads): what the work costs, whatever else runs on the machine
            "prefill_long_cpu_s": round(statistics.median(prefill_cpu), 3),
            "decode1_cpu_ms_per_token": round(1000 * statistics.median(one_cpu), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=1024, help="perplexity window, tokens")
    p.add_argument("--windows", type=int, default=3, help="windows per held-out source")
    p.add_argument("--greedy-tokens", type=int, default=64)
    p.add_argument("--long-prompt-tokens", type=int, default=1000)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--skip-perplexity", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    from indexcache.model.loading import load_model
    from indexcache.offline.corpora import heldout_essays
    model, pattern, tokenizer, _ = load_model("smollm2", "bfloat16")
    result = {"commit": git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "pattern": pattern, "load_before": os.getloadavg(),
              "tied_embeddings": model.args.tie_word_embeddings}
    if not args.skip_perplexity:
        t0 = time.perf_counter()
        import copy

        from indexcache.model.int8 import dequantize_linears
        result["perplexity"] = perplexities(model, dequantize_linears(copy.deepcopy(model)), tokenizer, pattern,
                                            args.context, args.windows)
        result["perplexity"]["context"] = args.context
        print("perplexity:", json.dumps(result["perplexity"]), f"({time.perf_counter() - t0:.0f} s)", flush=True)

    prompts = [tokenizer.encode(t) for t in PROMPTS]
    engines, outputs = {}, {}
    for q in ("none", "int8"):
        engines[q], outputs[q] = run_engine(model, pattern, q, prompts, args.greedy_tokens)
    result["greedy"] = [agreement(a, b) | {"prompt": t[:40]} for a, b, t in zip(outputs["none"], outputs["int8"], PROMPTS)]
    print("greedy:", json.dumps(result["greedy"]), flush=True)

    ids = tokenizer.encode(" ".join(d.text for d in heldout_essays()[:3]))
    long_ids = ids[:args.long_prompt_tokens]
    batch = [ids[args.long_prompt_tokens + 64 * i: args.long_prompt_tokens + 64 * (i + 1)] for i in range(8)]
    result["speed"] = {}
    for name, q in (("bfloat16", "none"), ("int8", "int8"), ("bfloat16_again", "none")):
        result["speed"][name] = speed(engines[q], long_ids, prompts[0], batch, args.decode_tokens, args.repeats)
        result["speed"][name]["load"] = os.getloadavg()
        print(name, json.dumps(result["speed"][name]), flush=True)
    result["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
