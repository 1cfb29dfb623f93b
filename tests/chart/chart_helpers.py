"""Chart test helpers (imported by conftest.py and the tests): helm, rendering, the operator's API calls."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "indexcache-operator"
ALL_ON_VALUES = Path(__file__).resolve().parent / "values-all-on.yaml"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for `import dashboards`

def find_helm() -> str:
    candidates = [os.environ.get("HELM"), ROOT / ".tools/bin/helm",
                  Path(sys.executable).resolve().parents[2] / ".tools/bin/helm",  # the venv's checkout
                  Path(sys.executable).parents[2] / ".tools/bin/helm", shutil.which("helm")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    pytest.fail("helm not found: run `bash scripts/setup.sh` (installs .tools/bin/helm) or set HELM=/path/to/helm")




def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HELM_CACHE_HOME": "/tmp/helm-cache", "HELM_CONFIG_HOME": "/tmp/helm-config"})
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(helm: str, *extra: str, namespace: str = "indexcache-system") -> list[dict]:
    out = run_helm(helm, "template", "icd", str(CHART), "--namespace", namespace, "--include-crds", *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]






def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]
