"""Ray as the distributed engine: the replica's engine drives shard workers (Ray actors in a placement
group, gloo between them) that load their slices of a checkpoint; tokens, logits and a live pattern
switch equal the single-process model's."""
import os

import pytest
import torch

import parallel_ranks
from indexcache.model.checkpoint import save_checkpoint
from indexcache.model.parallel import ParallelContext
from tiny_models import random_model

SERVING_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "serving")
TESTS_DIR = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    started = not ray.is_initialized()
    if started:
        path = os.pathsep.join(os.path.abspath(p) for p in (SERVING_DIR, TESTS_DIR))
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.timeout(240)
def test_replica_driving_two_workers_is_the_single_process_model(ray_cluster, tmp_path):
    from indexcache.engine.distributed import start_ray_workers

    family = "mla"   # MoE (experts split over the workers) and S layers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = parallel_ranks.run_case(family, ParallelContext())
        save_checkpoint(random_model(family, seed=1), tmp_path / "ckpt")
        model = start_ray_workers(str(tmp_path / "ckpt"), 2, engine_options={"chunk_size": 8}, use_gpus=False)
        try:
            bundles = ray_cluster.util.placement_group_table(model.placement_group)["bundles"]
            assert len(bundles) == 2 and model.world == 2
            got = parallel_ranks.exercise(model, family)
        finally:
            model.stop()
            for w in model.workers:
                ray_cluster.kill(w)
            ray_cluster.util.remove_placement_group(model.placement_group)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got["cached_logits"], want["cached_logits"], rtol=1e-4, atol=1e-4)
    assert got["tokens"] == want["tokens"]
    assert got["patterns"] == want["patterns"]
    case = parallel_ranks.CASES[family]
    assert got["patterns"][2] == {case["switch"]}


@pytest.mark.timeout(240)
def test_a_tensor_parallel_replica_serves_what_the_single_process_one_does(ray_cluster, tmp_path):
    """IndexCacheServer with tensor_parallel_size=2 (what gpusPerReplica: 2 becomes): its model is the
    workers', loaded from the checkpoint; the same greedy tokens as the in-process replica, by the API."""
    import asyncio

    from indexcache.model.tiny import save_char_tokenizer
    from indexcache.serving.protocol import GenerateRequest, TextDelta
    from indexcache.serving.server import IndexCacheServer

    save_checkpoint(random_model("gqa", seed=1, vocab_size=98), tmp_path / "ckpt")
    save_char_tokenizer(tmp_path / "ckpt")

    def complete(server, prompt):
        async def run():
            text, tokens = "", 0
            async for part in server.generate(GenerateRequest(prompt=prompt, max_tokens=32, temperature=0.0)):
                if isinstance(part, TextDelta):
                    text, tokens = text + part.text, part.completion_tokens
            assert tokens > 0, "nothing generated: the comparison would be empty"
            return text, tokens
        return asyncio.run(run())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # fp32 on both sides (dtype auto picks bf16 on CPUs with fast bf16): the comparison is exact
        options = dict(max_model_len=128, max_batch_size=2, chunk_size=8, dtype="float32")
        local = IndexCacheServer(model=str(tmp_path / "ckpt"), **options)
        sharded = IndexCacheServer(model=str(tmp_path / "ckpt"), tensor_parallel_size=2, **options)
        try:
            assert sharded.model.world == 2 and sharded.not_ready() is None
            for prompt in ("The indexer picks", "S layers reuse"):
                assert complete(sharded, prompt) == complete(local, prompt)
            sharded.reconfigure({"pattern": "FFSSFS", "pattern_version": 1})
            local.reconfigure({"pattern": "FFSSFS", "pattern_version": 1})
            assert complete(sharded, "after the switch") == complete(local, "after the switch")
            assert sharded.info()["pattern"] == "FFSSFS"
        finally:
            for server in (local, sharded):
                server.engine.stop()
            sharded.model.stop()
            for w in sharded.model.workers:
                ray_cluster.kill(w)
            ray_cluster.util.remove_placement_group(sharded.model.placement_group)
    finally:
        torch.set_num_threads(threads)
