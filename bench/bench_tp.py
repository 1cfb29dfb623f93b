"""Tensor-parallel serving benchmark on the 30B shape (bench_model.py's model, random weights).

    # one GPU: the in-process engine against the same engine driving a shard worker (TP=1), side by side
    PYTHONPATH=serving python3 bench/bench_tp.py --mode worker --out $OUT/tp1.json
    # 2 or 4 GPUs of one node: every rank runs the engine on its shard in lockstep (NCCL), rank 0 reports
    PYTHONPATH=serving python3 bench/bench_tp.py --mode spmd --world 2 --out $OUT/tp2.json

--mode worker: the model is built once; the in-process rows run `Engine(model)`, the worker rows run
`Engine(DistributedModel)` whose one `ShardWorker`, in this process, holds that same model (the H200
machine has no Ray; a Ray actor adds one RPC and the logits' transfer per forward on top). What the worker
path adds per forward is what it costs: token lists out, rank 0's logits back, the worker's own engine
cache and CUDA graphs (the same ones an in-process engine builds).
--mode spmd: torch.multiprocessing, one process per GPU, each builds its shard on the meta device then on
its GPU (random weights; no full copy anywhere), and runs bench_model's prefill / decode rows through its
own Engine; identical inputs keep the ranks in step. Rows: prefill TTFT at --context, decode step at that
context (batch 1), batched decode (--batch x --batch-context). Everything under --time-budget seconds.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_model as bm  # noqa: E402  (puts serving/ on sys.path)

from indexcache.model.config import ModelArgs  # noqa: E402


def rows(model, a, res, label, t_start):
    gen = torch.Generator().manual_seed(1)
    for name in a.patterns.split(","):
        pattern = bm.pattern_for(name, model.args.n_layers)
        if time.perf_counter() - t_start > a.time_budget:
            res["skipped"].append(f"{label} {name}")
            continue
        try:
            row = bm.prefill_and_decode(model, pattern, a.context, a.decode_steps, a.chunk, a.enforce_eager, gen)
            row.update(path=label, pattern=name)
            res["rows"].append(row)
            print(f"{label:>10} {name:>6} @ {a.context}: prefill {row['prefill_s']:.3f} s, decode "
                  f"{1e3 * row['decode_step_s']:.2f} ms/step", flush=True)
            if a.batch:
                row = bm.batched_decode(model, pattern, a.batch, a.batch_context, a.decode_steps, a.chunk,
                                        a.enforce_eager, gen)
                row.update(path=label, pattern=name)
                res["batched"].append(row)
                print(f"{label:>10} {name:>6} batch {a.batch} @ {a.batch_context}: "
                      f"{1e3 * row['decode_step_s']:.2f} ms/step", flush=True)
        except Exception as exc:   # record and go on: one run measures what it can
            res["errors"].append(f"{label} {name}: {exc!r}"[:2000])
            print(f"{label} {name} failed: {exc!r}", flush=True)


def worker_model(model, a):
    from indexcache.engine.distributed import in_process_worker
    return in_process_worker(model, {"chunk_size": a.chunk, "enforce_eager": a.enforce_eager})


def release_worker(dm):
    dm.workers[0].engine = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shape(a) -> ModelArgs:
    args = ModelArgs(**(bm.SHAPE_TINY if a.tiny else bm.SHAPE_30B))
    args.max_seq_len = max(args.max_seq_len, a.context + a.decode_steps + 16, a.batch_context + a.decode_steps + 16)
    return args


def run_worker_mode(a):
    t_start = time.perf_counter()
    res = {"mode": "worker", "commit": bm.commit(), "device": torch.cuda.get_device_name() if bm.DEV == "cuda" else "cpu",
           "torch": torch.__version__, "context": a.context, "chunk": a.chunk, "rows": [], "batched": [], "errors": [],
           "skipped": []}
    model = bm.random_model(shape(a))
    # interleaved, so that clocks and allocator state drift equally on both paths
    for label in ("in-process", "worker", "in-process", "worker")[: 4 if a.repeat else 2]:
        if label == "worker":
            dm = worker_model(model, a)
            rows(dm, a, res, label, t_start)
            release_worker(dm)
        else:
            rows(model, a, res, label, t_start)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    res["wall_s"] = time.perf_counter() - t_start
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


def spmd_rank(rank, a, port):
    from indexcache.model.dsa import DSAForCausalLM
    from indexcache.model.parallel import init_parallel, shard_model

    ctx = init_parallel(rank, a.world, "127.0.0.1", port)
    t_start = time.perf_counter()
    args = shape(a)
    default = torch.get_default_dtype()
    torch.set_default_dtype(bm.DTYPE)
    try:
        with torch.device("meta"):
            model = DSAForCausalLM(args)
    finally:
        torch.set_default_dtype(default)
    model = shard_model(model, ctx).to_empty(device=bm.DEV)
    gen = torch.Generator(device=bm.DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            elif name.endswith("e_score_correction_bias"):
                p.zero_()
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.02, generator=gen)
    model.eval()
    res = {"mode": "spmd", "world": a.world, "rank": rank, "commit": bm.commit(),
           "device": torch.cuda.get_device_name() if bm.DEV == "cuda" else "cpu", "torch": torch.__version__,
           "weights_gib_per_rank": sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30,
           "context": a.context, "chunk": a.chunk, "rows": [], "batched": [], "errors": [], "skipped": []}
    rows(model, a, res, f"tp{a.world}", t_start)
    res["wall_s"] = time.perf_counter() - t_start
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("worker", "spmd"), default="worker")
    ap.add_argument("--world", type=int, default=2, help="--mode spmd: GPUs (ranks)")
    ap.add_argument("--out", default="bench_tp.json")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke test)")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-context", type=int, default=2048)
    ap.add_argument("--patterns", default="all-F,1/4")
    ap.add_argument("--repeat", action="store_true", help="worker mode: both paths twice, interleaved")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--time-budget", type=float, default=240.0)
    a = ap.parse_args()
    if a.mode == "worker":
        run_worker_mode(a)
    else:
        import torch.multiprocessing as mp

        from indexcache.model.parallel import free_port
        mp.start_processes(spmd_rank, args=(a, free_port()), nprocs=a.world, start_method="spawn")


if __name__ == "__main__":
    main()
