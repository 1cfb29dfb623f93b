"""The harness the operator tests and the live dashboard tests share: a Kubernetes API emulator (kmock)
on loopback in its own thread, the real kopf operator (KopfRunner) pointed at it through a kubeconfig, and
helpers that play the parts of KubeRay and of a recalibration Job. The fixtures live in the conftest.py
files; this is a plain module (importlib mode: conftest.py files cannot import each other)."""
from __future__ import annotations

import asyncio
import copy
import datetime
import json
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import jsonpatch
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "operator") not in sys.path:
    sys.path.insert(0, str(ROOT / "operator"))

import kmock  # noqa: E402
from kmock._internal import dicts as kmock_dicts  # noqa: E402

from indexcache_operator import GROUP, KIND, PLURAL, VERSION  # noqa: E402
from indexcache_operator import kube as k  # noqa: E402

KUBERAY_CRD = ROOT.parent / "shared" / "data" / "kuberay" / "ray.io_rayservices.yaml"
if not KUBERAY_CRD.exists():
    KUBERAY_CRD = Path("/work/shared/data/kuberay/ray.io_rayservices.yaml")
ICDS = k.Resource(GROUP, VERSION, PLURAL)
EVENTS = k.Resource("", "v1", "events")
NS = "serving"

ALL_VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
RESOURCES = {
    f"{GROUP}/{VERSION}/{PLURAL}": dict(kind=KIND, subresources={"status", "scale"}, shortnames={"icd"}),
    "ray.io/v1/rayservices": dict(kind="RayService", subresources={"status"}),
    "batch/v1/jobs": dict(kind="Job", subresources={"status"}),
    "batch/v1/cronjobs": dict(kind="CronJob", subresources={"status"}),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", subresources={"status"}),
    "v1/configmaps": dict(kind="ConfigMap"),
    "v1/serviceaccounts": dict(kind="ServiceAccount"),
    "v1/events": dict(kind="Event"),
    "rbac.authorization.k8s.io/v1/roles": dict(kind="Role"),
    "rbac.authorization.k8s.io/v1/rolebindings": dict(kind="RoleBinding"),
}


class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock plus the server-set metadata the operator and kopf rely on: uid, resourceVersion, creationTimestamp and a
    generation that the API server bumps on every spec change (kmock keeps none of these)."""

    _revision = 0

    async def _handle(self, request):
        data = request.data
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            self._revision += 1
            if isinstance(data, list):  # a JSON patch (kopf's finalizers): bump after its tests
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": str(self._revision)})
            elif isinstance(data, dict):
                data.setdefault("metadata", {})["resourceVersion"] = str(self._revision)
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):  # kopf's Events use these
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp",
                                datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            elif request.action == kmock.action.UPDATE and request.name and not request.subresource \
                    and "spec" in data:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    current = dict(self.objects[key].raw)
                    old_spec = copy.deepcopy(current.get("spec") or {})
                    new_spec = kmock_dicts.patch_dict(copy.deepcopy(old_spec), data["spec"])
                    if new_spec != old_spec:
                        meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as e:
            # The API server answers a failed resourceVersion test with 422; kopf then retries
            # on its next cycle with a fresh body (kmock would answer 500 and kopf would spin).
            return await self._render_error(kmock.KubernetesError(status=422, reason="Invalid", message=str(e)))


    async def _serve_watch(self, request):
        """kmock's watch lists the objects, then subscribes to changes: a change in between is lost
        and kopf never hears of it. Take the bus mark under the same lock as the listing."""
        yield b""
        bus = self._buses[request.resource]
        async with self._lock:
            mark = await bus.mark()
            objs = [obj for (res, ns, name), obj in self.objects.items()
                    if res == request.resource and not obj.deleted
                    and (request.namespace is None or ns == request.namespace)
                    and (request.name is None or name == request.name)]
            events = [{"type": "ADDED", "object": obj.raw} for obj in objs]
        for event in events:
            yield event
        try:
            async for event in bus.stream(since=mark):
                meta = event.get("object", {}).get("metadata", {})
                if (request.namespace is None or meta.get("namespace") == request.namespace) and \
                        (request.name is None or meta.get("name") == request.name):
                    yield event
        finally:
            await bus.unmark(mark)


class ApiServer:
    """The emulator on its own event loop thread, so that tests and kopf can block freely."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.kubeconfig = tmp_path / "kubeconfig"
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("kmock did not start")
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}],
        }))
        import kubernetes
        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        cfg.api_key = {"BearerToken": "Bearer test"}
        self.kube = k.Kube(kubernetes.client.ApiClient(cfg))

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServerEmulator() as emulator, kmock.Server(emulator) as server:
            for res, info in RESOURCES.items():
                emulator.resources[res] = kmock.ResourceInfo(namespaced=True, verbs=ALL_VERBS, **info)
            # kopf's resource and namespace observers start from these cluster-scoped kinds.
            emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
                namespaced=False, verbs=ALL_VERBS, kind="CustomResourceDefinition")
            emulator.resources["v1/namespaces"] = kmock.ResourceInfo(
                namespaced=False, verbs=ALL_VERBS, kind="Namespace")
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    # -- reading and writing through the HTTP API, as kubectl would --
    def get(self, res: k.Resource, name: str, ns: str = NS) -> dict | None:
        return self.kube.get(res, ns, name)

    def names(self, res: k.Resource, ns: str = NS) -> set[str]:
        return {o["metadata"]["name"] for o in self.kube.list(res, ns)}

    def events(self, ns: str = NS) -> list[dict]:
        return self.kube.list(EVENTS, ns)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """The real kopf operator (KopfRunner: kopf's own CLI in a thread), restartable."""

    def __init__(self, api: ApiServer, monkeypatch) -> None:
        self.api = api
        self.metrics_port = free_port()
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig))
        monkeypatch.setenv("INDEXCACHE_OPERATOR_METRICS_PORT", str(self.metrics_port))
        # Watches alone must drive the work: the periodic resync is a safety net, and at 60 s (its
        # production default) any wait_for below that needs it times out, so a lost event fails a test.
        monkeypatch.setenv("INDEXCACHE_OPERATOR_RESYNC_SECONDS", "60")
        monkeypatch.setenv("INDEXCACHE_SERVING_IMAGE", "registry.test/indexcache-serving:test")
        self.runner = None

    def start(self) -> None:
        from kopf.testing import KopfRunner
        self.runner = KopfRunner(["run", "-A", "--standalone", "-m", "indexcache_operator.handlers"],
                                 timeout=30)
        self.runner.__enter__()
        wait_for(lambda: _http_ok(self.metrics_port), what="operator /healthz")

    def reconciles(self) -> float:
        """Reconciles finished so far (all resources), from the operator's own /metrics."""
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("indexcache_operator_reconciles_total{"))

    def wait_idle(self, quiet_s: float = 0.6, timeout: float = 15.0) -> None:
        """Wait until no reconcile has finished for `quiet_s`: whatever happens next was started by
        the next change alone, not by the tail of an earlier one."""
        deadline = time.monotonic() + timeout
        last, since = self.reconciles(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.reconciles()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
        raise AssertionError(f"the operator kept reconciling for {timeout}s")

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.__exit__(None, None, None)
            runner, self.runner = self.runner, None
            assert runner.exception is None, runner.exception


def _http_ok(port: int) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll (never sleep a fixed time) until predicate() is truthy; return its value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as e:  # not there yet (e.g. a KeyError on a missing status)
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


# ---- resources and the other actors ------------------------------------------------------------

def icd(name: str = "chat", **spec) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"uri": "/models/glm5-tiny", "numLayers": 8}, "replicas": 2,
                     "indexCache": {"pattern": "FFSSFSSS"}, **spec}}
    return body


def condition(obj: dict, ctype: str) -> dict:
    for c in (obj.get("status") or {}).get("conditions", []):
        if c["type"] == ctype:
            return c
    return {}


def kuberay_reports_healthy(api: ApiServer, name: str, ready: int, ns: str = NS) -> None:
    """Play KubeRay: the serve app at the RayService's current generation is RUNNING/HEALTHY."""
    rs = api.get(k.RAYSERVICES, name, ns)
    api.kube.patch(k.RAYSERVICES, ns, name, {"status": {
        "observedGeneration": rs["metadata"]["generation"],
        "activeServiceStatus": {
            "applicationStatuses": {"indexcache": {"status": "RUNNING", "serveDeploymentStatuses": {
                "IndexCacheServer": {"status": "HEALTHY"}, "OpenAIIngress": {"status": "HEALTHY"}}}},
            "rayClusterStatus": {"desiredWorkerReplicas": ready, "readyWorkerReplicas": ready}},
    }}, subresource="status")


def calibration_result(pattern: str, loss_delta: float) -> dict:
    loss_all_full = 2.5
    return {"pattern": pattern, "full_layers": pattern.count("F"), "num_layers": len(pattern),
            "target_full": 0.25, "loss_all_full": loss_all_full, "loss": loss_all_full + loss_delta,
            "loss_delta": loss_delta, "step_losses": [], "uniform_pattern": pattern,
            "uniform_loss": loss_all_full + 2 * loss_delta, "uniform_loss_delta": 2 * loss_delta,
            "overlap": {}, "num_samples": 10, "num_tokens": 1000, "model_id": "glm5-tiny",
            "duration_s": 1.0, "passes": 28, "passes_saved": 7, "version": "0.1.0"}


def job_finishes(api: ApiServer, job_name: str, result: dict | None, ns: str = NS,
                 failure_reason: str = "BackoffLimitExceeded") -> None:
    """Play the Job: write the result ConfigMap as `indexcache calibrate --report-configmap` does,
    then mark the Job Complete (or Failed when result is None)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if result is not None:
        api.kube.create(k.CONFIGMAPS, ns, {"apiVersion": "v1", "kind": "ConfigMap",
                                           "metadata": {"name": f"{job_name}-result", "namespace": ns},
                                           "data": {"result.json": json.dumps(result)}})
        cond = {"type": "Complete", "status": "True", "lastTransitionTime": when}
        status = {"succeeded": 1, "completionTime": when, "conditions": [cond]}
    else:
        cond = {"type": "Failed", "status": "True", "reason": failure_reason, "lastTransitionTime": when}
        status = {"failed": 2, "conditions": [cond]}
    api.kube.patch(k.JOBS, ns, job_name, {"status": status}, subresource="status")
