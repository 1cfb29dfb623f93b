"""Tiny random DSA models, checkpoints and sample files for the calibration tests.

Same approach as tests/model/conftest.py (importlib mode: conftest files are not importable, so the
factories are fixtures). 16 indexer heads avoid exact top-k score ties.
"""
import json
import random

import pytest
import torch

from indexcache.model.checkpoint import save_checkpoint
from tiny_models import FAMILIES, TINY_GQA, TINY_MLA, random_model as _random_model  # noqa: F401


def random_model(family: str = "gqa", seed: int = 0, indexer_layers=None, **overrides):
    # Larger projections than tests/model's so attention is peaked and the top-k choice matters for
    # the loss: the search then has real differences to find.
    return _random_model(family, seed, indexer_layers, projection_std=0.3, **overrides)


def random_token_lists(n: int, lengths=(24, 64), vocab: int = 97, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@pytest.fixture
def make_model():
    """make_model(family="gqa", seed=0, indexer_layers=None, **config_overrides) -> tiny random model."""
    return random_model


@pytest.fixture
def make_tokens():
    """make_tokens(n, lengths=(24, 64), vocab=97, seed=0) -> n random token-id lists."""
    return random_token_lists


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A saved tiny GQA checkpoint (8 layers) with its model: (dir, model)."""
    model = random_model("gqa", seed=1, n_layers=8)
    path = save_checkpoint(model, tmp_path / "ckpt")
    return path, model


@pytest.fixture
def write_samples(tmp_path):
    """write_samples(lines, name="samples.jsonl") -> path; dict lines are JSON-encoded, str lines written raw."""
    def write(lines, name="samples.jsonl"):
        path = tmp_path / name
        with open(path, "w") as f:
            for line in lines:
                f.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
        return path
    return write


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a loaded 2-core machine two threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
