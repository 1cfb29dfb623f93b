"""The worker path on CUDA (what a tensor-parallel replica runs, at TP=1): the engine driving a ShardWorker
that holds the model, its cache, in-place kernels and decode CUDA graphs, gives the in-process engine's
greedy tokens, across a live pattern switch. Needs CUDA: pytest -m gpu."""
import pytest
import torch

import parallel_ranks
from indexcache.engine.distributed import in_process_worker
from tiny_models import random_model

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the worker path's GPU side needs a CUDA device")
@pytest.mark.parametrize("family", ["gqa", "mla"])
def test_worker_path_gives_the_in_process_tokens_on_cuda(family):
    # fp32 weights: the two paths run the same kernels, so tokens must match exactly
    model = random_model(family, seed=1, index_head_dim=32).cuda()   # FP8 indexer dots need K >= 32
    want = parallel_ranks.exercise(model, family)
    worker = in_process_worker(model, {"chunk_size": 8})
    got = parallel_ranks.exercise(worker, family)
    assert worker.workers[0].engine.graphs is not None and worker.workers[0].engine.graphs.captures > 0
    torch.testing.assert_close(got["cached_logits"], want["cached_logits"], rtol=0, atol=0)
    assert got["tokens"] == want["tokens"] and got["patterns"] == want["patterns"]
