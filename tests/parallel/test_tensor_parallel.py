"""Tensor and expert parallelism on the CPU: TP=2 and TP=4 ranks in separate processes over gloo on
loopback give the single-process model's logits (fp32 tolerance) and its greedy tokens through the
engine, across a live pattern switch, on tiny MLA (MoE, S layers) and GQA models."""
import pytest
import torch
import torch.multiprocessing as mp

import parallel_ranks
from indexcache.model.config import ModelArgs
from indexcache.model.parallel import ParallelContext, check_tensor_parallel, free_port, tensor_parallel_sizes
from tiny_models import TINY_GQA, TINY_MLA


@pytest.fixture(scope="module")
def single_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as each rank runs; tiny ops on a shared 2-core machine are faster on one thread
    try:
        return {family: parallel_ranks.run_case(family, ParallelContext()) for family in parallel_ranks.CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_reproduce_the_single_process_model(world, tmp_path, single_process):
    mp.start_processes(parallel_ranks.run_rank, args=(world, free_port(), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for family, want in single_process.items():
        for rank, got in enumerate(ranks):
            got = got[family]
            torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{family} TP={world} rank {rank}: {m}")
            torch.testing.assert_close(got["cached_logits"], want["cached_logits"], rtol=1e-4, atol=1e-4)
            assert got["tokens"] == want["tokens"], f"{family} TP={world} rank {rank}: greedy tokens differ"
            assert got["patterns"] == want["patterns"]
        case = parallel_ranks.CASES[family]
        assert want["patterns"] == {0: {case["pattern"]}, 1: {case["pattern"]}, 2: {case["switch"]}}
        assert all(len(t) == parallel_ranks.STEPS for t in want["tokens"].values())


def test_world_sizes_that_do_not_divide_are_refused_naming_the_field():
    mla = ModelArgs(**TINY_MLA)   # 4 heads, 8 experts
    check_tensor_parallel(mla, 4)
    with pytest.raises(ValueError, match=r"gpusPerReplica=3 does not divide .*num_attention_heads=4.*n_routed_experts=8"
                                         r".*set gpusPerReplica to a tensor-parallel size that does \(1, 2, 4 among"):
        check_tensor_parallel(mla, 3)
    gqa = ModelArgs(**{**TINY_GQA, "n_heads": 6, "n_kv_heads": 3, "inter_dim": 96})
    assert tensor_parallel_sizes(gqa) == [1, 3, 6]   # 2 splits the heads but not the 3 kv heads
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        check_tensor_parallel(gqa, 2)


@pytest.mark.parametrize("family", ["mla", "gqa"])
def test_the_worker_path_in_process_is_the_model(family, single_process):
    """The replica side of the Ray executor (DistributedModel: host lists out, rank 0's logits back, the
    worker's own engine cache) over one in-process worker: the single-process model's logits and tokens."""
    from indexcache.engine.distributed import in_process_worker
    from tiny_models import random_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = parallel_ranks.exercise(in_process_worker(random_model(family, seed=1), {"chunk_size": 8}), family)
    finally:
        torch.set_num_threads(threads)
    want = single_process[family]
    torch.testing.assert_close(got["cached_logits"], want["cached_logits"], rtol=0, atol=0)
    assert got["tokens"] == want["tokens"] and got["patterns"] == want["patterns"]
