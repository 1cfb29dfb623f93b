"""The paged KV cache (model/paged.py) against the contiguous slot cache, on random block layouts.

The same tokens fed through the same forwards (chunked prefills, then batched decodes of requests at
different lengths) must give the same logits and the same top-k selections whether each request's cache
is a contiguous slot or blocks scattered at random over the pool. The reference path gathers each
prefix through the block table, so the tensors the attention sees are the same: tolerance 1e-6.
"""
import pytest
import torch

from indexcache.model import KVCache
from indexcache.model.dsa import Capture
from indexcache.model.paged import PagedKVCache, kv_bytes_per_token, map_indices, logical_rows
from tiny_models import random_model

BLOCK = 4


def _run(model, pattern, prompts, cache_for, tables_for, decode_steps=4):
    """Chunked prefill of each request alone (5-token chunks), then batched decodes over all requests.
    Returns (logits of every forward, top-k indices per layer of every forward)."""
    cache = cache_for()
    outs, selections = [], []
    for i, prompt in enumerate(prompts):
        for c0 in range(0, len(prompt), 5):
            capture = Capture(attention=False, index_scores=False)
            chunk = torch.tensor([prompt[c0:c0 + 5]])
            logits = model(chunk, start_pos=[c0], cache=cache, pattern=pattern, capture=capture, **tables_for([i]))
            outs.append(logits[0])
            selections.append(capture.indices)
    lengths = [len(p) for p in prompts]
    nxt = [p[-1] for p in prompts]
    everyone = list(range(len(prompts)))
    for _ in range(decode_steps):
        capture = Capture(attention=False, index_scores=False)
        logits = model(torch.tensor([[t] for t in nxt]), start_pos=lengths, cache=cache, pattern=pattern,
                       capture=capture, **tables_for(everyone))
        outs.append(logits[:, -1])
        selections.append(capture.indices)
        nxt = [(t * 7 + 3) % model.args.vocab_size for t in nxt]
        lengths = [n + 1 for n in lengths]
    return torch.cat(outs), selections, cache


@pytest.mark.parametrize("family", ["gqa", "mla"])
@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_paged_forward_equals_the_contiguous_cache_on_random_block_layouts(family, attention):
    seed = int(torch.randint(0, 10_000, ()))
    model = random_model(family, seed=seed, projection_std=0.3)
    pattern = "FSSFSS"
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 97, (n,), generator=gen).tolist() for n in (13, 22, 9)]
    max_len = 40
    per_request = max_len // BLOCK
    n_blocks = 1 + per_request * len(prompts) + 7          # null block + everyone's + spare ones
    layout = (torch.randperm(n_blocks - 1, generator=gen) + 1)[: per_request * len(prompts)].view(len(prompts), -1)

    def contiguous(rows):
        return {"slots": rows}

    def paged(rows):
        return {"block_tables": layout[rows]}

    with torch.no_grad():
        ref, ref_sel, _ = _run(model, pattern, prompts,
                               lambda: KVCache(model.args, len(prompts), max_len, pattern), contiguous)
        got, got_sel, cache = _run(model, pattern, prompts,
                                   lambda: PagedKVCache(model.args, n_blocks, BLOCK, pattern), paged)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, msg=f"seed {seed}")
    for a, b in zip(ref_sel, got_sel):
        assert a.keys() == b.keys()
        for layer in a:
            assert torch.equal(a[layer], b[layer]), f"layer {layer} selected other keys (seed {seed})"
    # IndexCache: only the F layers own indexer-key blocks
    assert sorted(cache.indexer_k) == [0, 3]


def test_s_layers_own_no_indexer_blocks_and_a_switch_adds_only_new_f_layers():
    model = random_model("mla")
    cache = PagedKVCache(model.args, 9, BLOCK, "FSSSSS")
    assert sorted(cache.indexer_k) == [0]
    one_f = cache.nbytes()
    cache.ensure_pattern("FSFSSS")
    assert sorted(cache.indexer_k) == [0, 2]
    assert cache.nbytes() - one_f == 9 * BLOCK * model.args.index_head_dim * 4   # one layer's fp32 keys
    assert cache.release_indexer_layers({"FSFSSS"}) == []
    assert cache.release_indexer_layers({"FSSSSS"}) == [2] and sorted(cache.indexer_k) == [0]
    all_f, quarter = (kv_bytes_per_token(model.args, p, torch.bfloat16, True) for p in ("FFFFFF", "FSSSSS"))
    latent = 6 * (24 + 8) * 2
    assert (all_f, quarter) == (latent + 6 * (16 + 4), latent + 1 * (16 + 4))


def test_top_k_indices_map_to_the_rows_of_their_blocks():
    tables = torch.tensor([[5, 2, 7], [1, 3, 0]])
    rows = logical_rows(tables, BLOCK, 10)                    # (2, 10)
    assert rows[0].tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29]
    indices = torch.tensor([[[0, 5, -1]], [[9, 4, 3]]], dtype=torch.int32)   # (B=2, T=1, K=3)
    assert map_indices(indices, rows).tolist() == [[[20, 9, -1]], [[1, 12, 7]]]


def test_bad_block_tables_are_refused_with_the_fix():
    model = random_model("gqa")
    cache = PagedKVCache(model.args, 5, BLOCK, model.default_pattern)
    with pytest.raises(ValueError, match="fewer than the 9 this forward reads"):
        model(torch.ones(1, 9, dtype=torch.long), cache=cache, block_tables=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="needs block_tables"):
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="need a paged KV cache"):
        model(torch.ones(1, 3, dtype=torch.long), cache=KVCache(model.args, 1, 8, model.default_pattern),
              block_tables=torch.tensor([[1, 2]]))


@pytest.mark.parametrize("family", ["gqa", "mla"])
def test_a_prefix_read_from_shared_blocks_gives_the_logits_of_a_cold_prefill(family):
    """Request B's table starts with request A's first 3 blocks (their 12 tokens are B's prefix too):
    prefilling only B's tail over those blocks gives the logits of B prefilled cold into blocks of its own."""
    seed = int(torch.randint(0, 10_000, ()))
    model = random_model(family, seed=seed, projection_std=0.3)
    pattern = "FSFSSS"
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(2, 97, (12,), generator=gen).tolist()
    a = shared + torch.randint(2, 97, (7,), generator=gen).tolist()
    b = shared + torch.randint(2, 97, (9,), generator=gen).tolist()
    cache = PagedKVCache(model.args, 20, BLOCK, pattern)
    table_a = torch.tensor([[3, 7, 1, 9, 4]])
    table_b = torch.tensor([[3, 7, 1, 12, 5, 6]])          # A's three prefix blocks, then its own
    table_cold = torch.tensor([[15, 2, 18, 11, 13, 8]])
    with torch.no_grad():
        model(torch.tensor([a]), cache=cache, pattern=pattern, block_tables=table_a)
        warm = model(torch.tensor([b[12:]]), start_pos=[12], cache=cache, pattern=pattern, block_tables=table_b)
        cold = model(torch.tensor([b]), cache=cache, pattern=pattern, block_tables=table_cold)[:, 12:]
    torch.testing.assert_close(warm, cold, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
