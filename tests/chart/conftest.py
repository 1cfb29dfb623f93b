"""Chart test fixtures; the helpers live in chart_helpers.py (importable: this directory goes on sys.path)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chart_helpers import ALL_ON_VALUES, find_helm, render  # noqa: E402


@pytest.fixture(scope="session")
def helm() -> str:
    return find_helm()


@pytest.fixture(scope="session")
def default_objects(helm) -> list[dict]:
    return render(helm)


@pytest.fixture(scope="session")
def all_on_objects(helm) -> list[dict]:
    return render(helm, "-f", str(ALL_ON_VALUES))
