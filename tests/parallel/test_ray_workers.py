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
@pytest.mark.parametrize("family", ["mla", "gqa"])
def test_replica_driving_two_workers_is_the_single_process_model(family, ray_cluster, tmp_path):
    from indexcache.engine.distributed import start_ray_workers

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
