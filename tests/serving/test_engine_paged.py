"""The engine on a paged KV pool (engine/block_pool.py + model/paged.py) against its slow twins: the same
greedy tokens as each request alone (naive_generate), with requests waiting for blocks, decode running
out of blocks (preemption + recompute), and prefix blocks shared between requests.

8-token blocks keep the pools tiny; the tiny model's context is 256 tokens.
"""
import pytest

from indexcache.engine import ContextLengthError, Engine, SamplingParams
from indexcache.engine.generate import naive_generate
from indexcache.serving.metrics import ServingMetrics
from engine_jobs import run_all, tokens

BS = 8


def sample(metrics, name):
    return metrics.registry.get_sample_value(name, {"model": "tiny", "deployment": "test"}) or 0.0


def test_paged_engine_gives_each_request_its_tokens_alone_and_frees_every_block(model, random_prompts):
    engine = Engine(model, max_batch_size=3, chunk_size=16, max_model_len=128, kv_cache_tokens=3 * 128,
                    block_size=BS, prefix_caching=False)
    prompts = random_prompts(6, lo=3, hi=40, seed=11)
    jobs = [(i, p, SamplingParams(max_new_tokens=6 + i), None) for i, p in enumerate(prompts)]
    chunks = run_all(engine, jobs)
    for i, p in enumerate(prompts):
        assert tokens(chunks[i]) == naive_generate(model, p, jobs[i][2]), f"request {i}"
    assert engine.pool.num_used == 0 and engine.pool.num_free == engine.pool.usable


def test_requests_wait_for_blocks_and_decode_preempts_the_youngest_without_corrupting_anyone(model, random_prompts):
    """A 10-block pool (80 tokens) for 4 requests that each end near 50 tokens: admission must hold some
    back (waiting gauge > 0 while slots are free) and decode must preempt; every request still gets
    exactly the greedy tokens of an uninterrupted run alone."""
    metrics = ServingMetrics("tiny", "test", model.args.n_layers)
    engine = Engine(model, max_batch_size=4, chunk_size=64, max_model_len=128, kv_cache_tokens=10 * BS,
                    block_size=BS, metrics=metrics)
    prompts = random_prompts(4, lo=20, hi=30, seed=12)
    params = SamplingParams(max_new_tokens=24)
    seen = {"waiting_with_free_slot": 0, "max_usage": 0.0}

    def watch(e):
        if e.waiting and e.free_slots:
            seen["waiting_with_free_slot"] += 1
            assert sample(metrics, "indexcache_requests_waiting") == len(e.waiting)
        seen["max_usage"] = max(seen["max_usage"], sample(metrics, "indexcache_kv_cache_usage_ratio"))
        held = sorted(b for r in e.running for b in r.blocks)
        assert len(held) == len(set(held)), "two requests own one block"

    chunks = run_all(engine, [(0, p, params, None) for p in prompts], watch)
    for i, p in enumerate(prompts):
        assert tokens(chunks[i]) == naive_generate(model, p, params), f"request {i}"
        assert chunks[i][-1].finish_reason == "length"
    assert seen["waiting_with_free_slot"] > 0
    assert sample(metrics, "indexcache_num_preemptions_total") > 0
    assert 0.5 < seen["max_usage"] <= 1.0
    assert engine.pool.num_used == 0


def test_prefix_reuse_gives_the_logprobs_of_a_cold_prefill(model, random_prompts):
    """Three requests share a 40-token prefix (5 full blocks); with prefix caching the later ones prefill
    only their own tails, and their tokens and top-5 logprobs equal the same requests with caching off."""
    shared = random_prompts(1, lo=40, hi=40, seed=13)[0]
    tails = random_prompts(3, lo=3, hi=12, seed=14)
    params = SamplingParams(max_new_tokens=8, logprobs=5)
    jobs = [(4 * i, shared + t, params, None) for i, t in enumerate(tails)]   # one after the other

    def serve(prefix_caching):
        metrics = ServingMetrics("tiny", "test", model.args.n_layers)
        engine = Engine(model, max_batch_size=2, chunk_size=16, max_model_len=128, kv_cache_tokens=40 * BS,
                        block_size=BS, prefix_caching=prefix_caching, metrics=metrics)
        return run_all(engine, jobs), metrics, engine

    warm, m_warm, e_warm = serve(True)
    cold, m_cold, _ = serve(False)
    for i in range(3):
        assert tokens(warm[i]) == tokens(cold[i]) == naive_generate(model, shared + tails[i], params)
        for a, b in zip(warm[i], cold[i]):
            if a.token_id is not None:
                assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
                assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    queries = sum(len(shared) + len(t) for t in tails)
    assert sample(m_warm, "indexcache_prefix_cache_queries_total") == queries
    assert sample(m_warm, "indexcache_prefix_cache_hits_total") >= 2 * 40      # the 2nd and 3rd reuse the prefix
    assert sample(m_cold, "indexcache_prefix_cache_hits_total") == 0
    assert sample(m_warm, "indexcache_prompt_tokens_total") < sample(m_cold, "indexcache_prompt_tokens_total")
    assert e_warm.pool.num_used == 0 and e_warm.pool.evictable   # the prefix stays cached, unreferenced


def test_a_pattern_switch_never_reuses_blocks_written_under_another_pattern(model, random_prompts):
    """Request A runs all-F; the pattern switches; B shares A's prefix but must not reuse A's blocks (their
    indexer keys and the selections behind every later latent belong to the other pattern): B equals a
    cold run on the new pattern, no hit counted. C, on the new pattern too, reuses B's blocks. Once no
    request runs all-F, its indexer-key pools are freed and its cached prefixes forgotten: D, all-F again,
    reuses nothing."""
    n = model.args.n_layers
    sparse = "F" + "S" * (n - 1)
    shared = random_prompts(1, lo=32, hi=32, seed=15)[0]
    a, b, c = (shared + t for t in random_prompts(3, lo=4, hi=9, seed=16))
    params = SamplingParams(max_new_tokens=6)
    metrics = ServingMetrics("tiny", "test", n)
    engine = Engine(model, max_batch_size=2, chunk_size=64, max_model_len=128, kv_cache_tokens=30 * BS,
                    block_size=BS, metrics=metrics, pattern="F" * n)
    out_a = run_all(engine, [(0, a, params, None)])[0]
    assert sample(metrics, "indexcache_prefix_cache_hits_total") == 0
    out_b = run_all(engine, [(0, b, params, sparse)])[0]
    assert sample(metrics, "indexcache_prefix_cache_hits_total") == 0
    out_c = run_all(engine, [(0, c, params, None)])[0]
    assert sample(metrics, "indexcache_prefix_cache_hits_total") == 32
    assert sorted(engine.cache.indexer_k) == [0]   # all-F gone from the engine: its indexer pools freed
    # back to all-F: A's cached blocks lost their indexer keys with those pools, so D (A's prefix) must
    # not reuse them either
    d = shared + random_prompts(1, lo=4, hi=9, seed=18)[0]
    out_d = run_all(engine, [(0, d, params, "F" * n)])[0]
    assert sample(metrics, "indexcache_prefix_cache_hits_total") == 32
    assert tokens(out_a) == naive_generate(model, a, params, pattern="F" * n)
    assert tokens(out_b) == naive_generate(model, b, params, pattern=sparse)
    assert tokens(out_c) == naive_generate(model, c, params, pattern=sparse)
    assert tokens(out_d) == naive_generate(model, d, params, pattern="F" * n)
    assert out_b[0].pattern == sparse


def test_a_prompt_larger_than_the_pool_is_refused_and_generation_is_capped_by_it(model):
    engine = Engine(model, max_batch_size=2, max_model_len=200, kv_cache_tokens=6 * BS, block_size=BS)
    with pytest.raises(ContextLengthError, match="KV cache holds 48 tokens"):
        engine.submit([5] * 48, SamplingParams(), lambda c: None)
    req = engine.submit([5] * 40, SamplingParams(max_new_tokens=100), lambda c: None)
    assert req.params.max_new_tokens == 8


def test_abort_frees_the_blocks_for_a_waiting_request(model, random_prompts):
    engine = Engine(model, max_batch_size=2, chunk_size=64, max_model_len=128, kv_cache_tokens=6 * BS,
                    block_size=BS, prefix_caching=False)
    p1, p2 = random_prompts(2, lo=30, hi=30, seed=17)
    got = []
    r1 = engine.submit(p1, SamplingParams(max_new_tokens=10), lambda c: None)
    engine.step()
    r2 = engine.submit(p2, SamplingParams(max_new_tokens=3), got.append)
    engine.step()
    assert r2 in engine.waiting and engine.free_slots    # a slot is free, the blocks are not
    engine.abort(r1)
    while engine.step():
        pass
    assert tokens(got) == naive_generate(model, p2, SamplingParams(max_new_tokens=3))
    assert r1.blocks == [] and engine.pool.num_used == 0
