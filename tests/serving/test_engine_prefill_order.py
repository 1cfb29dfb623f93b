"""Who gets each step's prefill budget (Engine._prefill_order): a short prompt submitted while a long one is
in the middle of its prefill goes ahead of it, and short prompts arriving every step cannot starve the long
one. Both on the slot cache and on the paged pool; every request still gets the tokens it gets alone.

Budget 8 tokens a step (chunk_size), so "short" is at most 32 tokens left to prefill (4 chunks, the default
long_prefill_token_threshold) and the oldest long prompt goes first after 4 steps short of a full chunk
(long_prefill_max_wait): it gets a full chunk in at least one of every 5 steps.
"""
import math

import pytest

from indexcache.engine import Engine, SamplingParams
from indexcache.engine.generate import naive_generate
from engine_jobs import run_all, tokens

CHUNK, WAIT, THRESHOLD = 8, 4, 32
LONG = 160                 # 20 chunks


def make_engine(model, kv, **kw):
    paged = {"kv_cache_tokens": 1024, "block_size": 8} if kv == "paged" else {}
    return Engine(model, max_batch_size=4, chunk_size=CHUNK, max_model_len=256, **paged, **kw)


@pytest.fixture(params=["slots", "paged"])
def kv(request):
    return request.param


def test_a_short_prompt_does_not_wait_for_a_long_prefill(model, random_prompts, kv):
    """A one-chunk prompt submitted at step 3 of a 20-chunk prefill: its prefill is the first in line (no
    other short prompt), and the long prompt had full chunks so far, so it cannot jump ahead: the short
    prompt's first token comes in the step it is submitted (the bound from the policy is 2 steps: at most
    one step in which the long prompt takes its guaranteed turn), 16 steps before the long prompt's."""
    engine = make_engine(model, kv)
    assert (engine.long_prefill_token_threshold, engine.long_prefill_max_wait) == (THRESHOLD, WAIT)
    long, short = random_prompts(1, lo=LONG, hi=LONG, seed=21)[0], random_prompts(1, lo=CHUNK, hi=CHUNK, seed=22)[0]
    params = SamplingParams(max_new_tokens=5)
    steps = {}
    chunks = run_all(engine, [(0, long, params, None), (3, short, params, None)], steps=steps)
    assert steps[1][0] <= 3 + 1
    assert steps[0][0] >= LONG // CHUNK - 1 > steps[1][0] + 10
    assert tokens(chunks[0]) == naive_generate(model, long, params)
    assert tokens(chunks[1]) == naive_generate(model, short, params)


def test_with_the_threshold_at_zero_prefill_is_first_come_first_served(model, random_prompts, kv):
    """long_prefill_token_threshold=0 (the old behaviour, the bench's baseline): the short prompt waits
    for the whole long prefill."""
    engine = make_engine(model, kv, long_prefill_token_threshold=0)
    long, short = random_prompts(1, lo=LONG, hi=LONG, seed=21)[0], random_prompts(1, lo=CHUNK, hi=CHUNK, seed=22)[0]
    params = SamplingParams(max_new_tokens=5)
    steps = {}
    chunks = run_all(engine, [(0, long, params, None), (3, short, params, None)], steps=steps)
    assert steps[1][0] > steps[0][0] >= LONG // CHUNK - 1
    assert tokens(chunks[1]) == naive_generate(model, short, params)


def test_short_prompts_arriving_every_step_do_not_starve_a_long_one(model, random_prompts, kv):
    """A 12-token prompt arrives every step for 100 steps: 12 tokens of demand per 8 of budget, so short
    prompts alone would fill every step. The long prompt still gets a full chunk in at least one of every
    WAIT + 1 steps while it is long, then (32 tokens left: short, and older than every short one) the
    whole budget: its first token comes within (WAIT + 1) x ceil((160 - 32) / 8) + 32 / 8 = 84 steps,
    while short prompts keep arriving until step 100."""
    engine = make_engine(model, kv)
    long = random_prompts(1, lo=LONG, hi=LONG, seed=23)[0]
    shorts = random_prompts(100, lo=12, hi=12, seed=24)
    params, one = SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=1)
    bound = (WAIT + 1) * math.ceil((LONG - THRESHOLD) / CHUNK) + THRESHOLD // CHUNK
    steps = {}
    chunks = run_all(engine, [(0, long, params, None)] + [(1 + i, p, one, None) for i, p in enumerate(shorts)],
                     steps=steps)
    assert steps[0][0] < bound < len(shorts)
    assert tokens(chunks[0]) == naive_generate(model, long, params)
    for i, p in enumerate(shorts, start=1):
        assert tokens(chunks[i]) == naive_generate(model, p, one), f"short request {i}"
    # and the short prompts did go first while the long one was mid-prefill: most of them were served
    # before it finished
    assert sum(steps[i][0] < steps[0][0] for i in range(1, len(shorts) + 1)) > 30


def test_a_negative_threshold_is_refused_naming_the_field(model):
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 0"):
        Engine(model, max_batch_size=1, long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="long_prefill_max_wait must be >= 1"):
        Engine(model, max_batch_size=1, long_prefill_max_wait=0)
