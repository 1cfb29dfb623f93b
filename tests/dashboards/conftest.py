"""Dashboard and alert test setup: the repository root (for `import dashboards`), this directory's helpers
and tests/operator's harness (the live test runs the operator against the API emulator)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE.parent / "operator"), str(HERE.parents[1]), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
