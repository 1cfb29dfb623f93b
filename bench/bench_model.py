"""End-to-end benchmark of the served model: `DSAForCausalLM` driven by the serving `Engine`, random weights.

    PYTHONPATH=serving python3 bench/bench_model.py --out model.json \
        [--config path/to/config.json] [--contexts 65536,200000] [--patterns all-F,1/4]

What it times is what a Ray Serve replica runs (nothing here re-implements model code):
  - prefill: one request of N random tokens through `Engine.step()` (chunked prefill, --chunk tokens a
    step), time to its first token (TTFT = whole prefill + one sampled token);
  - decode (batch 1) at that context: the same request's next tokens, one `Engine.step()` each (CUDA-graph
    replay unless --enforce-eager), median step time after the graph's capture;
  - batched decode: --batch requests of --batch-context tokens decoding together, tokens/s;
  - --profile: a whole prefill (wall time per step) and 4 decode steps under torch.profiler, device time
    per kernel and per phase (indexer, top-k, sparse attention, MoE, GEMM, rest);
  - serving load (--load): N concurrent requests of P-token prompts and G generated tokens each through
    the engine's own thread (continuous batching, chunked prefill), as a replica sees them without Ray:
    output tokens/s, TTFT and TPOT p50/p99.
Shape: --config (any checkpoint's config.json: its shape with random weights), else the IndexCache
paper's 30B DSA shape (47 layers: layer 0 dense, 46 MoE; hidden 2048; MLA 20 heads, q/kv latent 768/512,
head dims 192 nope + 64 rope / 256 value; 64 experts top-4 + 1 shared of width 1536, dense width 10240;
indexer 32 x 128, top-k 2048). Weights bf16 on the GPU (one distinct tensor per layer, like a checkpoint).

CPU smoke test (no timing meaning; Triton kernels in the interpreter, fp32):
    BENCH_DEVICE=cpu TRITON_INTERPRET=1 INDEXCACHE_KERNELS=triton python3 bench/bench_model.py --tiny \
        --contexts 48 --chunk 32 --batch 2 --batch-context 16 --load 3,8,4 --out /tmp/smoke.json
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))

from indexcache.kernels.interpreter import patch_for_numpy2  # noqa: E402

patch_for_numpy2()   # the CPU smoke test under TRITON_INTERPRET=1

from indexcache.model import DSAForCausalLM  # noqa: E402
from indexcache.model.config import ModelArgs  # noqa: E402
from indexcache.model.pattern import resolve_pattern  # noqa: E402
from indexcache.engine import Engine, SamplingParams  # noqa: E402

DEV = os.environ.get("BENCH_DEVICE", "cuda")
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32

# The IndexCache paper's 30B DSA model (GLM-4.7-Flash-like), as a HF config.
SHAPE_30B = dict(model_type="deepseek_v32", vocab_size=151552, dim=2048, n_layers=47, max_seq_len=262144,
                 n_heads=20, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64,
                 v_head_dim=256, inter_dim=10240, moe_inter_dim=1536, n_routed_experts=64, n_shared_experts=1,
                 n_activated_experts=4, first_k_dense=1, route_scale=1.8, index_n_heads=32,
                 index_head_dim=128, index_rope_head_dim=64, index_topk=2048, rope_theta=1e6, eos_token_id=-1)
SHAPE_TINY = dict(model_type="deepseek_v32", vocab_size=97, dim=64, n_layers=4, max_seq_len=256, n_heads=4,
                  q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                  inter_dim=96, moe_inter_dim=32, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                  first_k_dense=1, index_n_heads=4, index_head_dim=16, index_rope_head_dim=8, index_topk=8,
                  eos_token_id=-1)
# The paper's 1/4 pattern for 47 layers (greedy-searched); "uniform-1/4" and other layer counts get the
# upstream rule with freq 4, offset 2.
PATTERNS_47 = {"1/4": "FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS"}


def pattern_for(name: str, n_layers: int) -> str:
    if name == "all-F":
        return "F" * n_layers
    if name in PATTERNS_47 and n_layers == 47:
        return PATTERNS_47[name]
    if name in ("1/4", "uniform-1/4"):
        return resolve_pattern(n_layers, freq=4, offset=2)
    if set(name) <= {"F", "S"} and len(name) == n_layers:
        return name
    raise SystemExit(f"--patterns: unknown pattern {name!r} (all-F, 1/4, uniform-1/4 or an F/S string)")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def release(engine):
    """Free an engine's KV cache and graphs before the next one is built."""
    engine.graphs = engine.cache = None
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


class Failed(RuntimeError):
    pass


def collect(errors: list):
    def emit(chunk):
        if chunk.finish_reason == "error":
            errors.append(chunk.error)
    return emit


@torch.no_grad()
def random_model(args: ModelArgs) -> DSAForCausalLM:
    """The served model class with random weights, built straight on the device in DTYPE (no host copy)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)             # parameters are born in DTYPE: 30B fp32 would not fit
    try:
        with torch.device("meta"):
            model = DSAForCausalLM(args)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight") or "k_norm" in name:
            p.fill_(1.0) if name.endswith("weight") else p.zero_()
        elif name.endswith("k_norm.bias") or name.endswith("e_score_correction_bias"):
            p.zero_()
        elif p.dim() >= 2:
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)      # unit-variance outputs for unit inputs
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def engine_for(model, pattern, max_batch, max_len, chunk, enforce_eager):
    return Engine(model, pattern=pattern, max_batch_size=max_batch, max_model_len=max_len, chunk_size=chunk,
                  enforce_eager=enforce_eager)


def random_prompt(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=gen).tolist()


def prefill_and_decode(model, pattern, n, steps, chunk, enforce_eager, gen):
    """One request of n tokens: TTFT through the engine's chunked prefill, then `steps` decode steps."""
    engine = engine_for(model, pattern, 1, n + steps + 2, chunk, enforce_eager)
    errors = []
    req = engine.submit(random_prompt(n, model.args.vocab_size, gen),
                        SamplingParams(max_new_tokens=steps + 1), emit=collect(errors))
    sync()
    t0 = time.perf_counter()
    step_s = []
    while not req.output:
        t = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - t)
    ttft = time.perf_counter() - t0            # the first token's sampling synchronised the device
    times = []
    while not req.finished:
        t = time.perf_counter()
        engine.step()                          # each step samples on the host: it ends synchronised
        times.append(time.perf_counter() - t)
    if errors:
        raise Failed(errors[0])
    warm = times[2:] or times                  # the first replays include the graph capture
    step = statistics.median(warm)
    out = {"context": n, "prefill_s": ttft, "prefill_step_s": step_s, "prefill_tokens_per_s": n / ttft, "decode_step_s": step,
           "decode_tokens_per_s": 1.0 / step, "decode_steps": len(times),
           "kv_cache_gib": engine.cache.nbytes() / 2 ** 30, "graph_captures": engine.graphs.captures if engine.graphs else 0}
    release(engine)
    return out


# kernel name fragments -> phase (first match wins); everything else is "rest"
PHASES = (("indexer", ("indexer_scores", "indexer_decode", "quantize_indexer")), ("topk", ("topk", "radix", "sampled")),
          ("sparse_attention", ("sparse_", "mla_", "attention")), ("moe", ("moe_", "grouped", "GroupMM", "group_gemm")),
          ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "fp8_block")))


def phase_of(kernel: str) -> str:
    low = kernel.lower()
    for phase, keys in PHASES:
        if any(k.lower() in low for k in keys):
            return phase
    return "rest"


def kernel_split(prof, top: int = 25) -> dict:
    """Device time per phase and the top kernels of a torch.profiler run (seconds)."""
    per_kernel: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = per_kernel.setdefault(ev.name, [0.0, 0])
            t[0] += ev.device_time_total / 1e6 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e6
            t[1] += 1
    phases: dict[str, float] = {}
    for name, (t, _) in per_kernel.items():
        phases[phase_of(name)] = phases.get(phase_of(name), 0.0) + t
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {"device_s": sum(phases.values()), "phases_s": phases,
            "top_kernels": [{"name": n[:160], "s": t, "calls": c} for n, (t, c) in ranked]}


def profile_prefill_and_decode(model, pattern, n, chunk, gen):
    """An n-token request through the served engine under torch.profiler (kernels only): every prefill
    step's wall time, the prefill's device time by phase, then 4 decode steps after the graph capture."""
    from torch.profiler import ProfilerActivity, profile
    engine = engine_for(model, pattern, 1, n + 16, chunk, False)
    req = engine.submit(random_prompt(n, model.args.vocab_size, gen), SamplingParams(max_new_tokens=12),
                        emit=lambda c: None)
    out = {"context": n, "chunk": chunk, "prefill_step_wall_s": []}
    sync()
    with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
        while not req.output:
            t0 = time.perf_counter()
            engine.step()                     # ends with the logits' copy to the host: synchronised
            out["prefill_step_wall_s"].append(time.perf_counter() - t0)
    out["prefill_wall_s"] = sum(out["prefill_step_wall_s"])
    out["prefill"] = kernel_split(prof)
    for _ in range(3):                        # graph capture and warm-up
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(4):
            engine.step()
        sync()
        out["decode_wall_s_per_step"] = (time.perf_counter() - t0) / 4
    out["decode_4_steps"] = kernel_split(prof)
    release(engine)
    return out


def batched_decode(model, pattern, batch, context, steps, chunk, enforce_eager, gen):
    engine = engine_for(model, pattern, batch, context + steps + 2, chunk, enforce_eager)
    errors = []
    reqs = [engine.submit(random_prompt(context, model.args.vocab_size, gen), SamplingParams(max_new_tokens=steps + 1),
                          emit=collect(errors)) for _ in range(batch)]
    while not all(r.output for r in reqs):
        engine.step()
    times = []
    while not any(r.finished for r in reqs):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    if errors:
        raise Failed(errors[0])
    step = statistics.median(times[2:] or times)
    release(engine)
    return {"batch": batch, "context": context, "decode_step_s": step, "decode_tokens_per_s": batch / step}


def serving_load(model, pattern, n_requests, prompt_len, gen_len, chunk, enforce_eager, gen):
    """n_requests arrive at once; the engine thread serves them (continuous batching, chunked prefill)."""
    engine = engine_for(model, pattern, n_requests, prompt_len + gen_len + 2, chunk, enforce_eager).start()
    arrivals, stamps, done = {}, {}, threading.Event()
    finished = []

    def emitter(i):
        def emit(chunk):
            stamps.setdefault(i, []).append(time.perf_counter())
            if chunk.finish_reason is not None:
                finished.append(i)
                if len(finished) == n_requests:
                    done.set()
        return emit

    prompts = [random_prompt(prompt_len, model.args.vocab_size, gen) for _ in range(n_requests)]
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        arrivals[i] = time.perf_counter()
        engine.submit(p, SamplingParams(max_new_tokens=gen_len), emit=emitter(i))
    done.wait(timeout=600)
    wall = time.perf_counter() - t0
    engine.stop()
    release(engine)
    ttft = sorted(stamps[i][0] - arrivals[i] for i in stamps)
    tpot = sorted((s[-1] - s[0]) / (len(s) - 1) for s in stamps.values() if len(s) > 1)
    tokens = sum(len(s) for s in stamps.values())
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {"requests": n_requests, "prompt_tokens": prompt_len, "generated_tokens": gen_len, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "tpot_p50_s": pct(tpot, 0.5), "tpot_p99_s": pct(tpot, 0.99)}


def commit() -> str:
    """BENCH_COMMIT if set (the GPU machine's copy of the tree may carry another HEAD), else git's."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_model.json")
    ap.add_argument("--config", default="", help="a checkpoint's config.json: its shape, random weights")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: the CPU smoke test")
    ap.add_argument("--contexts", default="65536,200000")
    ap.add_argument("--patterns", default="all-F,1/4")
    ap.add_argument("--chunk", type=int, default=16384, help="prefill tokens per engine step")
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32, help="batched decode row: requests (0: skip)")
    ap.add_argument("--batch-context", type=int, default=4096)
    ap.add_argument("--load", default="64,2048,256", help="requests,prompt,generated for the serving load (empty: skip)")
    ap.add_argument("--enforce-eager", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--profile", action="store_true", help="profile the last prefill chunk and decode per "
                    "pattern (kernel time by phase) at --profile-context, before the timed rows")
    ap.add_argument("--profile-context", type=int, help="context of the profiled request (default: the first "
                    "of --contexts)")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds; later rows are skipped")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    if a.config:
        with open(a.config) as f:
            args = ModelArgs.from_hf_config(json.load(f))
    else:
        args = ModelArgs(**(SHAPE_TINY if a.tiny else SHAPE_30B))
    contexts = [int(c) for c in a.contexts.split(",") if c]
    if not contexts and not a.profile_context:
        raise SystemExit("--contexts: give at least one context (or --profile-context)")
    args.max_seq_len = max(args.max_seq_len, max(contexts + [a.profile_context or 0]) + a.decode_steps + 16)
    model = random_model(args)
    gen = torch.Generator().manual_seed(1)
    res = {"commit": commit(), "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
           "torch": torch.__version__, "shape": "config:" + a.config if a.config else ("tiny" if a.tiny else "30B"),
           "n_layers": args.n_layers, "enforce_eager": a.enforce_eager, "chunk": a.chunk,
           "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30,
           "rows": [], "skipped": []}

    def budget_left(what):
        if time.perf_counter() - t_start > a.time_budget:
            res["skipped"].append(what)
            return False
        return True

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    if a.profile:
        for name in a.patterns.split(","):
            try:
                prof = profile_prefill_and_decode(model, pattern_for(name, args.n_layers),
                                                  a.profile_context or contexts[0], a.chunk, gen)
            except Exception as exc:
                logging.exception("profile %s failed", name)
                res.setdefault("errors", []).append(f"profile {name}: {exc!r}"[:2000])
                continue
            prof["pattern"] = name
            res.setdefault("profiles", []).append(prof)
            pre, dec = prof["prefill"]["phases_s"], prof["decode_4_steps"]["phases_s"]
            print(f"profile {name} @ {prof['context']}: prefill {prof['prefill_wall_s']:.2f} s wall, steps "
                  + " ".join(f"{t:.2f}" for t in prof["prefill_step_wall_s"]) + "; device "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sorted(pre.items())) + " | decode 4 steps: "
                  + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in sorted(dec.items())), flush=True)
            save()
    for n in contexts:
        for name in a.patterns.split(","):
            if not budget_left(f"prefill+decode {name} @ {n}"):
                continue
            try:
                row = prefill_and_decode(model, pattern_for(name, args.n_layers), n, a.decode_steps, a.chunk,
                                         a.enforce_eager, gen)
            except Exception as exc:      # record it and go on: one round measures everything it can
                logging.exception("prefill+decode %s @ %d failed", name, n)
                res.setdefault("errors", []).append(f"prefill+decode {name} @ {n}: {exc!r}"[:2000])
                save()
                continue
            row["pattern"] = name
            res["rows"].append(row)
            print(f"{name:>6} @ {n:>7}: prefill {row['prefill_s']:7.2f} s ({row['prefill_tokens_per_s']:8.0f} tok/s)"
                  f"  decode {row['decode_tokens_per_s']:6.1f} tok/s", flush=True)
            save()
    if a.batch and budget_left("batched decode"):
        for name in a.patterns.split(","):
            try:
                row = batched_decode(model, pattern_for(name, args.n_layers), a.batch, a.batch_context,
                                     a.decode_steps, a.chunk, a.enforce_eager, gen)
            except Exception as exc:
                logging.exception("batched decode %s failed", name)
                res.setdefault("errors", []).append(f"batched {name}: {exc!r}"[:2000])
                continue
            row["pattern"] = name
            res.setdefault("batched", []).append(row)
            print(f"{name:>6} batch {a.batch} @ {a.batch_context}: {row['decode_tokens_per_s']:.0f} tok/s", flush=True)
            save()
    if a.load and budget_left("serving load"):
        n_req, p_len, g_len = (int(x) for x in a.load.split(","))
        for name in a.patterns.split(","):
            row = serving_load(model, pattern_for(name, args.n_layers), n_req, p_len, g_len, a.chunk,
                               a.enforce_eager, gen)
            row["pattern"] = name
            res.setdefault("load", []).append(row)
            print(f"{name:>6} load {n_req} x ({p_len} + {g_len}): {row['output_tokens_per_s']:.0f} out tok/s, "
                  f"TTFT p50 {row['ttft_p50_s']:.2f} s p99 {row['ttft_p99_s']:.2f} s, "
                  f"TPOT p50 {1e3 * row['tpot_p50_s']:.1f} ms p99 {1e3 * row['tpot_p99_s']:.1f} ms", flush=True)
            save()
    res["wall_s"] = time.perf_counter() - t_start
    save()


if __name__ == "__main__":
    main()
