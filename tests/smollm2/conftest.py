"""Fixtures for the SmolLM2 tests: real checkpoints converted from the packaged GGUF (no downloads)."""
import pytest


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """The first 2 of SmolLM2's 30 layers, real weights, random indexer (4 heads x 32): ~2 s to write."""
    from indexcache.offline.smollm2 import convert_smollm2

    return convert_smollm2(tmp_path_factory.mktemp("smollm2-2l"), index_n_heads=4, index_head_dim=32,
                           index_topk=16, seed=0, num_layers=2)


@pytest.fixture(scope="session")
def tokenizer(small_checkpoint):
    from indexcache.model.tokenizer import load_tokenizer

    return load_tokenizer(small_checkpoint)
