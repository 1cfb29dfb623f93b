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

# What the operator calls on the Kubernetes API, as (apiGroup, resource, verb). The chart's ClusterRole must
# grant exactly these (test_rbac.py). Kept here, next to the test, because the operator package is owned
# elsewhere; update both when the operator starts calling something new.
OPERATOR_API_CALLS = {
    # kopf: list+watch the resource, patch finalizers/annotations (its progress storage) and status.
    *(("indexcache.io", "indexcachedeployments", v) for v in ("get", "list", "watch", "patch")),
    ("indexcache.io", "indexcachedeployments/status", "get"),
    ("indexcache.io", "indexcachedeployments/status", "patch"),
    # Children get ownerReferences with blockOwnerDeletion: the API server then wants update on this.
    ("indexcache.io", "indexcachedeployments/finalizers", "update"),
    # kopf observes CRDs at runtime.
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    # kopf's and the operator's events.
    ("", "events", "create"),
    # Children: created, read back (status, drift), restored by patch; deleted when the spec drops them.
    *(("ray.io", "rayservices", v) for v in ("get", "list", "watch", "create", "patch", "delete")),
    *(("batch", "jobs", v) for v in ("get", "list", "watch", "create", "patch", "delete")),
    *(("batch", "cronjobs", v) for v in ("get", "list", "watch", "create", "patch", "delete")),
    *(("", "persistentvolumeclaims", v) for v in ("get", "list", "watch", "create", "patch")),
    *(("", "serviceaccounts", v) for v in ("get", "list", "watch", "create", "patch")),
    *(("rbac.authorization.k8s.io", "roles", v) for v in ("get", "list", "watch", "create", "patch")),
    *(("rbac.authorization.k8s.io", "rolebindings", v) for v in ("get", "list", "watch", "create", "patch")),
    # Result ConfigMaps: read by the operator; and the Job's Role grants create/update/patch on them, which
    # Kubernetes only lets the operator create if the operator holds those verbs itself.
    *(("", "configmaps", v) for v in ("get", "list", "watch", "create", "update", "patch", "delete")),
}


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
