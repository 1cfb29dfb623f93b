"""Shared serving fixtures: the tiny random model (same weights as `indexcache serve --tiny`) and its tokenizer."""
import random

import pytest

from indexcache.tiny import CharTokenizer, tiny_model


@pytest.fixture(scope="session")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return CharTokenizer()


@pytest.fixture
def random_prompts(model):
    """Factory: n fresh random prompts (token ids, no specials) of lengths in [lo, hi]."""
    def make(n, lo=3, hi=40, seed=None):
        rng = random.Random(seed)
        return [[rng.randrange(2, model.args.vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return make
