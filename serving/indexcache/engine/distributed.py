"""Ray as the distributed engine: one replica drives N shard workers in lockstep (the shape of vLLM's Ray
executor).

The replica keeps the engine's scheduler (engine.py, unchanged: admission, chunked prefill, batched
decode, sampling, pattern per request). Its model is a `DistributedModel`: a stand-in with the model's
`args`, `check_pattern` and `default_pattern`, whose forward sends the step's inputs (token ids, start
positions, cache slots, the pattern, where to take logits) to every worker and returns rank 0's logits.
Each `ShardWorker` is a Ray actor on one GPU (or CPU, in tests) of a placement group on one node: it
joins the torch.distributed group (NCCL on GPUs, gloo on CPUs), loads only its slices of the checkpoint
(parallel.py), and holds its shard of the model, its own KV cache and, on CUDA, its decode CUDA graphs:
it builds an `Engine` for them and never starts its thread, so cache geometry, FP8 indexer keys, warm-up
and graph capture are exactly those of the in-process engine. Every rank sees the same inputs, the
collectives inside the forward keep them in step, and the logits are all-gathered, so rank 0 alone
answers.

A live pattern switch needs nothing on the workers: every forward carries its pattern, and each worker's
cache allocates indexer keys for a layer the first time a forward runs it as F.

Costs, stated: logits (B, V) fp32 travel from rank 0 to the replica each step (sampling stays with the
scheduler); a Ray call per worker per forward (~0.1-1 ms) is paid on top of the forward.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from ..model.config import ModelArgs
from ..model.dsa import DSAForCausalLM

log = logging.getLogger(__name__)


def load_shard(model: str, ctx, dtype: str = "auto", cache_dir: str | None = None, fp8: str = "keep",
               device: str | None = None):
    """Rank ctx.rank's shard of `model` ('tiny', a checkpoint directory or a model URI) -> (shard, pattern)."""
    from ..model.parallel import shard_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model == "tiny":
        from ..model.tiny import tiny_model
        m = shard_model(tiny_model(seed=0), ctx).to(device)
        return m, m.default_pattern
    from ..model.checkpoint import load_checkpoint
    from ..model.storage import resolve
    path = resolve(model, cache_dir).path
    return load_checkpoint(path, dtype=None if dtype == "auto" else getattr(torch, dtype), device=device, fp8=fp8,
                           parallel=ctx)


class ShardWorker:
    """One rank (a Ray actor: `ray.remote(ShardWorker)`; a plain object in-process works too)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.model = self.engine = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 hosts the group's rendezvous: this node's address and a free port."""
        import socket

        import ray
        from ..model.parallel import free_port
        ip = ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostbyname("localhost")
        return ip, free_port()

    def load(self, address: str, port: int, model: str, dtype: str = "auto", cache_dir: str | None = None,
             fp8: str = "keep") -> dict:
        """Join the group and load this rank's shard. Returns what the replica needs to know of the model."""
        from ..model.parallel import init_parallel

        ctx = init_parallel(self.rank, self.world, address, port,
                            device_index=0 if torch.cuda.is_available() else None)   # Ray shows each actor its GPU as 0
        self.model, pattern = load_shard(model, ctx, dtype, cache_dir, fp8)
        return {**model_info(self.model), "pattern": pattern}

    def make_cache(self, n_slots: int, max_len: int, pattern: str, engine_options: dict) -> int:
        """This rank's KV cache (and CUDA graphs), as an in-process Engine would build them. Returns its bytes."""
        from .engine import Engine
        if self.engine is not None:   # free the previous cache and graphs before the new ones are allocated
            self.engine = None
            import gc
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.engine = Engine(self.model, pattern=pattern, max_batch_size=engine_options["max_batch_size"],
                             max_model_len=max_len, chunk_size=engine_options["chunk_size"],
                             enforce_eager=engine_options.get("enforce_eager", False))
        return self.engine.cache.nbytes()

    @torch.no_grad()
    def forward(self, tokens: list[list[int]], starts: list[int], slots: list[int], pattern: str,
                logits_at: list[int]) -> torch.Tensor | None:
        """One forward of the step -> rank 0: logits (B, V) fp32 on the CPU; other ranks: None."""
        engine = self.engine
        if engine is None:   # the forward reads and writes this worker's cache: there must be one
            raise RuntimeError("the worker has no KV cache yet: build an Engine over the DistributedModel "
                               "(it calls make_cache) before running forwards")
        if engine.graphs is not None and len(tokens[0]) == 1:   # one position per row: a decode graph replay
            logits = engine.graphs.run([row[0] for row in tokens], starts, slots, pattern)
        else:
            device = engine.device
            logits = self.model(torch.tensor(tokens, device=device), start_pos=starts, cache=engine.cache,
                                slots=slots, pattern=pattern, logits_at=torch.tensor(logits_at, device=device))
        return logits.float().cpu() if self.rank == 0 else None

    def stop(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


class _WorkerCache:
    """What the replica's engine holds for a cache: the workers hold the real ones."""

    def __init__(self, nbytes: int):
        self._nbytes = nbytes

    def ensure_pattern(self, pattern: str) -> None:
        pass

    def nbytes(self) -> int:
        return self._nbytes


class DistributedModel:
    """The replica's model: the engine calls it like a DSAForCausalLM; the workers run the forward.

    `call(method, *args)` runs a worker method on every rank and returns their results in rank order
    (Ray: `ray.get([getattr(w, method).remote(*args) for w in workers])`)."""

    def __init__(self, call, info: dict, world: int, engine_options: dict | None = None):
        self._call, self.world = call, world
        self.args = ModelArgs.from_hf_config(info["config"])
        self.indexer_layers = set(info["indexer_layers"])
        self.loaded_pattern = info["pattern"]
        self.engine_options = dict(engine_options or {})
        # the engine reads its device and dtype from lm_head.weight: the replica's side is the CPU
        self.lm_head = SimpleNamespace(weight=torch.empty(0, dtype=getattr(torch, info["dtype"])))
        self.worker_device = info["device"]

    check_pattern = DSAForCausalLM.check_pattern

    @property
    def default_pattern(self) -> str:
        return self.args.pattern

    def make_cache(self, n_slots: int, max_len: int, pattern: str) -> _WorkerCache:
        """Engine hook: the workers allocate their caches (and capture graphs as they would in-process)."""
        options = {"max_batch_size": n_slots, "chunk_size": 256, **self.engine_options}
        return _WorkerCache(self._call("make_cache", n_slots, max_len, pattern, options)[0])

    def __call__(self, tokens: torch.Tensor, *, start_pos, cache=None, slots=None, pattern: str | None = None,
                 logits_at: torch.Tensor | None = None, **unused) -> torch.Tensor:
        B, T = tokens.shape
        starts = [start_pos] * B if isinstance(start_pos, int) else list(map(int, start_pos))
        slots = list(range(B)) if slots is None else list(map(int, slots))
        at = [T - 1] * B if logits_at is None else logits_at.tolist()
        return self._call("forward", tokens.tolist(), starts, slots, pattern or self.default_pattern, at)[0]

    def stop(self) -> None:
        self._call("stop")


def model_info(model) -> dict:
    """What ShardWorker.load reports of a (shard) model."""
    return {"config": getattr(model, "full_args", model.args).to_hf_config(),
            "indexer_layers": sorted(model.indexer_layers), "pattern": model.default_pattern,
            "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."), "device": str(model.lm_head.weight.device)}


def in_process_worker(model, engine_options: dict | None = None) -> DistributedModel:
    """The worker path without Ray: one ShardWorker in this process holding `model` (TP=1), driven through a
    DistributedModel exactly as Ray workers are. For measuring the path's own cost, and its GPU test."""
    worker = ShardWorker(0, 1)
    worker.model = model

    def call(method, *args):
        return [getattr(worker, method)(*args)]

    dm = DistributedModel(call, model_info(model), 1, engine_options)
    dm.workers = [worker]
    return dm


def start_ray_workers(model: str, world: int, *, dtype: str = "auto", cache_dir: str | None = None,
                      fp8: str = "keep", engine_options: dict | None = None, placement_group=None,
                      first_bundle: int = 0, use_gpus: bool | None = None) -> DistributedModel:
    """N ShardWorker actors in `placement_group` (bundles first_bundle .. first_bundle + N - 1; one is
    reserved here on one node, STRICT_PACK, when none is given), loaded and joined. Returns the replica's
    DistributedModel; its `.workers` are the actors, `.placement_group` the group."""
    import ray
    from ray.util.placement_group import placement_group as make_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    use_gpus = torch.cuda.is_available() if use_gpus is None else use_gpus
    if placement_group is None:
        bundle = {"GPU": 1, "CPU": 1} if use_gpus else {"CPU": 1}
        placement_group = make_group([bundle] * world, strategy="STRICT_PACK")
        ray.get(placement_group.ready(), timeout=300)
        first_bundle = 0
    actor = ray.remote(ShardWorker)
    workers = [actor.options(num_cpus=1, num_gpus=1 if use_gpus else 0, scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group, placement_group_bundle_index=first_bundle + rank)).remote(rank, world) for rank in range(world)]
    address, port = ray.get(workers[0].address.remote())
    infos = ray.get([w.load.remote(address, port, model, dtype, cache_dir, fp8) for w in workers])

    def call(method, *args):
        return ray.get([getattr(w, method).remote(*args) for w in workers])

    dm = DistributedModel(call, infos[0], world, engine_options)
    dm.workers, dm.placement_group = workers, placement_group
    log.info("%d shard workers ready (%s, %s)", world, infos[0]["device"], infos[0]["dtype"])
    return dm
