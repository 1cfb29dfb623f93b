"""Servers shared by the model delivery tests (model_sources.py)."""
import pytest

from model_sources import MotoS3, tiny_checkpoint_files


@pytest.fixture(scope="session")
def tiny_files():
    """The bundled tiny model as checkpoint files (config, weights, tokenizer)."""
    return tiny_checkpoint_files()


@pytest.fixture(scope="session")
def s3(tiny_files):
    """moto's S3 server holding the tiny model at s3://models/tiny-dsa/, IAM authentication on."""
    with MotoS3("models", "tiny-dsa", tiny_files) as server:
        yield server
