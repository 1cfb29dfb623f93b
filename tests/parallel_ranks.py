"""What each rank of a CPU tensor-parallel test runs (spawned by tests/model/test_parallel.py), and the
single-process twin the test compares it with: the same code path with world = 1.

Each case: logits of a plain forward on random tokens (sparse, with S layers), then the engine's own
scheduler (chunked prefill, batched decode) generating 32 greedy tokens for two prompts, a live pattern
switch after a few steps, and a third prompt admitted on the new pattern.
"""
from __future__ import annotations

import torch

from tiny_models import random_model

CASES = {"mla": dict(pattern="FFSFSS", switch="FSSFSS"), "gqa": dict(pattern="FFSSFS", switch="FSFSSS")}
STEPS = 32


def run_case(family: str, ctx) -> dict:
    """The single-process model (ctx.world == 1) or rank ctx.rank's shard of it, exercised."""
    from indexcache.model.parallel import shard_model
    return exercise(shard_model(random_model(family, seed=1), ctx), family)


def exercise(model, family: str) -> dict:
    """Logits of a forward through the KV cache at two positions (and, for an in-process model, of a
    plain forward at every position), then the engine: 32 greedy tokens for two prompts, a live switch
    after five steps, a third prompt on the new pattern. `model`: a DSAForCausalLM, a shard of one, or a
    DistributedModel driving workers."""
    from indexcache.engine import Engine
    from indexcache.engine.sampling import SamplingParams

    case = CASES[family]
    gen = torch.Generator().manual_seed(7)
    vocab = model.args.vocab_size
    device = model.lm_head.weight.device   # a DistributedModel's is the CPU: its workers take host lists
    tokens = torch.randint(0, vocab, (2, 24), generator=gen).to(device)                  # (B, T)
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (13, 21, 9)]
    engine = Engine(model, pattern=case["pattern"], max_batch_size=3, chunk_size=8)
    out = {"prompts": prompts}
    with torch.no_grad():
        if isinstance(model, torch.nn.Module):
            out["logits"] = model(tokens, pattern=case["pattern"]).cpu()                 # (B, T, V)
        out["cached_logits"] = model(tokens, start_pos=0, cache=engine.cache, slots=[0, 1], pattern=case["pattern"],
                                     logits_at=torch.tensor([23, 17], device=device)).cpu()   # (B, V)
    outputs: dict[int, list] = {0: [], 1: [], 2: []}
    params = SamplingParams(max_new_tokens=STEPS, temperature=0.0)
    for i in (0, 1):
        engine.submit(prompts[i], params, outputs[i].append)
    steps = 0
    while engine.step():
        steps += 1
        if steps == 5:   # live switch: running requests keep theirs, the next one gets the new pattern
            engine.set_pattern(case["switch"], 1)
            engine.submit(prompts[2], params, outputs[2].append)
    out["tokens"] = {i: [c.token_id for c in chunks if c.token_id is not None] for i, chunks in outputs.items()}
    out["patterns"] = {i: {c.pattern for c in chunks} for i, chunks in outputs.items()}
    return out


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """torch.multiprocessing entry point: join the gloo group on loopback, run every case, save."""
    import torch.distributed as dist

    from indexcache.model.parallel import init_parallel

    torch.set_num_threads(1)
    ctx = init_parallel(rank, world, "127.0.0.1", port, backend="gloo")
    results = {family: run_case(family, ctx) for family in CASES}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
