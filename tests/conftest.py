"""Shared test setup: import this checkout's packages (not an installed copy) and keep Ray on loopback."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for sub in ("operator", "serving"):
    path = str(ROOT / sub)
    if path not in sys.path:
        sys.path.insert(0, path)

sys.path.insert(0, str(ROOT / "tests"))  # shared helpers such as tiny_models

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402


@pytest.fixture(params=["gqa", "mla"])
def family(request) -> str:
    """Both attention families of the DSA model (tests/model and tests/calibration run each case on both)."""
    return request.param
