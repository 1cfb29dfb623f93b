"""Decode through CUDA graphs (the served path on GPUs) against eager decode (`enforce_eager=True`, its
twin): the same greedy tokens, request by request, for 64 steps, with staggered arrivals (graphs of
several batch buckets), a batch padded up to its bucket, and a live pattern switch halfway (each
request keeps its pattern: the switch selects another pattern's graphs). fp32 weights so that the
padded batch's other matmul shapes cannot flip an argmax through rounding. Needs CUDA: pytest -m gpu."""
import pytest
import torch

from indexcache.engine import Engine, SamplingParams
from tiny_models import random_model

pytestmark = pytest.mark.gpu


def _serve(model, enforce_eager: bool, prompts, switch_at: int, **paged):
    engine = Engine(model, max_batch_size=6, chunk_size=16, max_model_len=160, enforce_eager=enforce_eager, **paged)
    out = {i: [] for i in range(len(prompts))}
    step, pending = 0, list(range(len(prompts)))
    while pending or engine.running or engine.waiting:
        if pending and step % 3 == 0:            # a new request every third step: buckets 1, 2, 4, 8 (6)
            i = pending.pop(0)
            engine.submit(prompts[i], SamplingParams(max_new_tokens=64), out[i].append)
        if step == switch_at:
            engine.set_pattern("F" + "S" * (model.args.n_layers - 2) + "F", version=1)
        engine.step()
        step += 1
    return {i: [c.token_id for c in chunks if c.token_id is not None] for i, chunks in out.items()}, engine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("family", ["gqa", "mla"])
@pytest.mark.parametrize("paged", [False, True], ids=["slots", "paged"])
def test_graph_decode_gives_the_eager_tokens(family, paged):
    """Paged: block tables are a static graph input (16-token blocks, a pool large enough for everyone:
    no preemption, so the eager contiguous run is the twin too)."""
    model = random_model(family, seed=int(torch.randint(0, 10_000, ())), projection_std=0.2,
                         index_head_dim=32).cuda()   # the FP8 indexer's tensor-core dots need K >= 32
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    prompts = [torch.randint(2, model.args.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (6,), generator=g)]
    eager, _ = _serve(model, True, prompts, switch_at=7)
    kw = {"kv_cache_tokens": 6 * 160, "block_size": 16} if paged else {}
    graphed, engine = _serve(model, False, prompts, switch_at=7, **kw)
    assert engine.graphs is not None and engine.graphs.captures >= 3
    assert (engine.pool is not None) == paged
    for i in eager:
        assert len(eager[i]) == 64 and graphed[i] == eager[i], f"request {i}"
