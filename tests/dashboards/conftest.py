"""Dashboard and alert test setup: the repository root (for `import dashboards`) and this directory's helpers."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE.parents[1]), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
