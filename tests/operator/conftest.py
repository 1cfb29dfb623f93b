"""Fixtures for the operator tests, over the shared harness in kube_harness.py: the emulator (`api`),
the real operator (`operator`), the KubeRay/Job helpers (`kit`), and what the API server checks on
`kubectl apply` (`validate`)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from kube_harness import (EVENTS, ICDS, KUBERAY_CRD, NS, ApiServer, OperatorProcess,  # noqa: E402
                          calibration_result, condition, fetch_ends, free_port, icd, job_finishes, k,
                          kuberay_reports_healthy, replica_pod, wait_for)


@pytest.fixture()
def api(tmp_path):
    server = ApiServer(tmp_path)
    yield server
    server.close()


@pytest.fixture()
def operator(api, monkeypatch):
    proc = OperatorProcess(api, monkeypatch)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture()
def make_operator(api, monkeypatch):
    """Operators with their own kopf arguments and environment (started by the test, stopped here)."""
    started = []

    def make(kopf_args=("-A", "--standalone"), **env) -> OperatorProcess:
        proc = OperatorProcess(api, monkeypatch, kopf_args=kopf_args, env=env)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture()
def kit():
    """The helpers above, for test modules (importlib mode: tests cannot import conftest)."""
    import types
    return types.SimpleNamespace(
        NS=NS, ICDS=ICDS, PLURAL=ICDS.plural, EVENTS=EVENTS, KUBERAY_CRD=KUBERAY_CRD, k=k, icd=icd, wait_for=wait_for,
        condition=condition, kuberay_reports_healthy=kuberay_reports_healthy,
        calibration_result=calibration_result, job_finishes=job_finishes, free_port=free_port,
        replica_pod=replica_pod, fetch_ends=fetch_ends)


# ---- what the API server checks on `kubectl apply`: schema, defaults, CEL ----------------------

def _apply_defaults(schema: dict, value):
    if isinstance(value, dict) and schema.get("type") == "object":
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        return [_apply_defaults(schema["items"], v) for v in value]
    return value


def _cel_errors(schema: dict, value, path: str) -> list[str]:
    import celpy
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        env = celpy.Environment()
        result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        if result is not True and not (hasattr(result, "__bool__") and bool(result) and
                                       not isinstance(result, Exception)):
            errors.append(f"{path}{rule.get('fieldPath', '')}: Invalid value: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                errors += _cel_errors(sub, value[name], f"{path}.{name}" if path else name)
    return errors


def validate_icd(obj: dict) -> list[str]:
    """The API server's answer to creating `obj`: [] if accepted, else messages naming fields."""
    import jsonschema
    from indexcache_operator.crd import build_crd
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    obj = copy.deepcopy(obj)
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in jsonschema.Draft4Validator(schema).iter_errors(obj)]
    if errors:
        return errors  # like the API server: CEL runs only on schema-valid objects
    obj = _apply_defaults(schema, obj)
    return _cel_errors(schema, obj, "")


@pytest.fixture()
def validate():
    return validate_icd
