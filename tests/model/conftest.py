import pytest

from tiny_models import FAMILIES, random_model  # noqa: F401  (shared with tests/calibration)


@pytest.fixture
def make_model():
    """Factory: make_model(family, seed=0, indexer_layers=None, **config_overrides) -> random tiny model."""
    return random_model
