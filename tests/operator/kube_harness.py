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

import aiohttp.web
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
    "v1/pods": dict(kind="Pod", subresources={"status"}),
    "v1/serviceaccounts": dict(kind="ServiceAccount"),
    "v1/events": dict(kind="Event"),
    "rbac.authorization.k8s.io/v1/roles": dict(kind="Role"),
    "rbac.authorization.k8s.io/v1/rolebindings": dict(kind="RoleBinding"),
    # kopf's peering objects (HA: two operators, one active), namespaced and cluster-wide.
    "kopf.dev/v1/kopfpeerings": dict(kind="KopfPeering"),
}
CLUSTER_RESOURCES = {
    "kopf.dev/v1/clusterkopfpeerings": dict(kind="ClusterKopfPeering"),
}
# Built-in kinds whose resource quantities the API server stores in canonical string form.
CANONICAL_QUANTITY_KINDS = {"jobs", "cronjobs", "persistentvolumeclaims"}


def verb_of(request) -> str | None:
    """The RBAC verb a request needs (what the API server's authorizer would check)."""
    method = str(getattr(request.method, "value", request.method)).upper()
    action = request.action
    if action == kmock.action.WATCH:
        return "watch"
    if action == kmock.action.LIST:
        return "list"
    if action == kmock.action.FETCH:
        return "get"
    if action == kmock.action.CREATE:
        return "create"
    if action == kmock.action.DELETE:
        return "delete"
    if method == "PUT":
        return "update"
    if action == kmock.action.UPDATE or method == "PATCH":
        return "patch"
    return None


def canonical_quantity(value):
    """What the API server stores for a resource quantity: always a string, decimals as milli-units."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return value
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text  # "8Gi", "500m": already canonical enough for the operator's comparison
    if number == int(number):
        return str(int(number))
    return f"{int(round(number * 1000))}m"


def canonicalize_quantities(node) -> None:
    """In place: every value under a `resources.requests`/`resources.limits` map becomes a string."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "resources" and isinstance(value, dict):
                for part in ("requests", "limits"):
                    if isinstance(value.get(part), dict):
                        value[part] = {k: canonical_quantity(v) for k, v in value[part].items()}
            canonicalize_quantities(value)
    elif isinstance(node, list):
        for item in node:
            canonicalize_quantities(item)


class Fault:
    """An error the emulator answers instead of serving a matching request (fault injection)."""

    def __init__(self, verb: str, plural: str, status: int, name: str | None = None,
                 subresource: str | None = None, times: int | None = None, namespace: str | None = None):
        self.verb, self.plural, self.status, self.name = verb, plural, status, name
        self.subresource, self.times, self.namespace = subresource, times, namespace
        self.hits = 0

    def matches(self, verb: str | None, request) -> bool:
        plural = request.resource.plural if request.resource is not None else None
        return (self.verb in (verb, "*") and self.plural in (plural, "*")
                and (self.name is None or self.name == request.name)
                and (self.namespace is None or self.namespace == request.namespace)
                and self.subresource == request.subresource
                and (self.times is None or self.hits < self.times))


class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock plus the server-set metadata the operator and kopf rely on: uid, resourceVersion, creationTimestamp and a
    generation that the API server bumps on every spec change (kmock keeps none of these)."""

    _revision = 0

    def attach(self, owner: "ApiServer") -> None:
        self.owner = owner

    async def __call__(self, raw_request):
        # kmock cannot parse /api/v1/namespaces (it takes "namespaces" for a namespace prefix); kopf lists and
        # watches namespaces when it serves named namespaces (-n). Serve them here: every namespace in use.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            await raw_request.read()
            watch = raw_request.query.get("watch") == "true"
            self.owner.record(("", "namespaces", "watch" if watch else "list", None, None, None))
            if watch:
                response = aiohttp.web.StreamResponse()
                await response.prepare(raw_request)
                await asyncio.Event().wait()  # no namespace ever changes; the client hangs up
            names = sorted({NS, "default"} | {ns for (_, ns, _) in self.objects if ns})
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"},
                "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]})
        return await super().__call__(raw_request)

    async def _handle(self, request):
        data = request.data
        verb = verb_of(request) if request.resource is not None else None
        from_operator = request.headers.get("Authorization") != f"Bearer {HARNESS_TOKEN}"
        if request.resource is not None and from_operator:
            self.owner.record((request.resource.group, request.resource.plural, verb, request.namespace,
                               request.name, request.subresource), data)
            fault = self.owner.fault_for(verb, request)
            if fault is not None:
                return await self._render_error(kmock.KubernetesError(
                    status=fault.status, reason=_REASONS.get(fault.status, "InternalError"),
                    message=f"injected fault: {fault.status} on {verb} {request.resource.plural}"))
            if request.action == kmock.action.UPDATE and isinstance(data, dict):
                expected = (data.get("metadata") or {}).get("resourceVersion")
                key = (request.resource, request.namespace, request.name)
                if expected is not None and key in self.objects and not self.objects[key].deleted:
                    current = (self.objects[key].raw.get("metadata") or {}).get("resourceVersion")
                    if str(expected) != str(current):
                        return await self._render_error(kmock.KubernetesError(
                            status=409, reason="Conflict",
                            message=f"Operation cannot be fulfilled on {request.resource.plural} "
                                    f"\"{request.name}\": the object has been modified; please apply your "
                                    f"changes to the latest version and try again"))
            if request.resource.plural in CANONICAL_QUANTITY_KINDS and isinstance(data, dict):
                canonicalize_quantities(data)
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


# The tests' own client presents this token; the operator's kubeconfig another. Faults and the call
# record concern the operator's requests only.
HARNESS_TOKEN = "harness"
_REASONS = {403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "Invalid", 500: "InternalError",
            503: "ServiceUnavailable"}


class ApiServer:
    """The emulator on its own event loop thread, so that tests and kopf can block freely.

    The operator reaches it through a TCP proxy (`proxy_url`, in the kubeconfig), so that a test can make
    the API server unreachable (connection refused) for the operator alone; tests talk to it directly.
    Every request is recorded in `calls` ((group, plural, verb, namespace, name, subresource), body), and
    `inject()` makes it answer matching requests with an error status instead."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._guard = threading.Lock()
        self.calls: list[tuple[tuple, object]] = []
        self.faults: list[Fault] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.kubeconfig = tmp_path / "kubeconfig"
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("kmock did not start")
        self.proxy = TcpProxy(self.loop, "127.0.0.1", int(self.url.rsplit(":", 1)[1]))
        self.proxy_url = f"http://127.0.0.1:{self.proxy.port}"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.proxy_url}}],
            "users": [{"name": "u", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}],
        }))
        import kubernetes
        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        cfg.api_key = {"BearerToken": f"Bearer {HARNESS_TOKEN}"}
        self.kube = k.Kube(kubernetes.client.ApiClient(cfg))

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServerEmulator() as emulator, kmock.Server(emulator) as server:
            emulator.attach(self)
            for res, info in RESOURCES.items():
                emulator.resources[res] = kmock.ResourceInfo(namespaced=True, verbs=ALL_VERBS, **info)
            for res, info in CLUSTER_RESOURCES.items():
                emulator.resources[res] = kmock.ResourceInfo(namespaced=False, verbs=ALL_VERBS, **info)
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
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    # -- fault injection and the record of calls --
    def record(self, call: tuple, body=None) -> None:
        with self._guard:
            self.calls.append((call, copy.deepcopy(body)))

    def inject(self, verb: str, plural: str, status: int, **match) -> Fault:
        """Answer `verb` on `plural` (either may be "*") with `status`; `times=None` means until cleared."""
        fault = Fault(verb, plural, status, **match)
        with self._guard:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._guard:
            self.faults.clear()

    def fault_for(self, verb: str | None, request) -> Fault | None:
        with self._guard:
            for fault in self.faults:
                if fault.matches(verb, request):
                    fault.hits += 1
                    return fault
        return None

    def writes(self, plural: str, verb: str | None = None, name: str | None = None) -> list[tuple[tuple, object]]:
        """Recorded create/patch/update/delete calls on `plural` (optionally one verb, one object)."""
        with self._guard:
            calls = list(self.calls)
        return [(c, body) for c, body in calls
                if c[1] == plural and c[2] in ("create", "patch", "update", "delete")
                and (verb is None or c[2] == verb) and (name is None or c[4] == name)]

    def refuse_connections(self) -> None:
        """The operator's API server goes away: new connections are refused, open ones (watches) cut."""
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(10)

    def accept_connections(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(10)

    # -- reading and writing through the HTTP API, as kubectl would --
    def get(self, res: k.Resource, name: str, ns: str = NS) -> dict | None:
        return self.kube.get(res, ns, name)

    def names(self, res: k.Resource, ns: str = NS) -> set[str]:
        return {o["metadata"]["name"] for o in self.kube.list(res, ns)}

    def events(self, ns: str = NS) -> list[dict]:
        return self.kube.list(EVENTS, ns)


class TcpProxy:
    """A loopback TCP proxy on a fixed port, on the emulator's loop: stop() closes the port (connection
    refused) and cuts every open connection; start() listens on the same port again."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, upstream_port: int) -> None:
        self.loop, self.host, self.upstream_port = loop, host, upstream_port
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        asyncio.run_coroutine_threadsafe(self.start(), loop).result(10)

    async def start(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.close()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
                self.writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """The real kopf operator (KopfRunner: kopf's own CLI in a thread), restartable.

    `kopf_args` replace the default `-A --standalone` (e.g. `-n serving`, or `--peering NAME` for HA);
    `env` is set when the operator starts (it reads its configuration at startup), so two operators in
    one test can differ (each starts after the previous one answered /healthz)."""

    def __init__(self, api: ApiServer, monkeypatch, kopf_args: tuple[str, ...] = ("-A", "--standalone"),
                 env: dict[str, str] | None = None) -> None:
        self.api = api
        self.monkeypatch = monkeypatch
        self.metrics_port = free_port()
        self.kopf_args = tuple(kopf_args)
        # Watches alone must drive the work: the periodic resync is a safety net, and at 60 s (its
        # production default) any wait_for below that needs it times out, so a lost event fails a test.
        self.env = {"KUBECONFIG": str(api.kubeconfig), "INDEXCACHE_OPERATOR_RESYNC_SECONDS": "60",
                    "INDEXCACHE_SERVING_IMAGE": "registry.test/indexcache-serving:test", **(env or {})}
        self.runner = None

    def start(self) -> None:
        from kopf.testing import KopfRunner
        for key, value in {**self.env, "INDEXCACHE_OPERATOR_METRICS_PORT": str(self.metrics_port)}.items():
            self.monkeypatch.setenv(key, value)
        self.runner = KopfRunner(["run", *self.kopf_args, "-m", "indexcache_operator.handlers"], timeout=30)
        self.runner.__enter__()
        wait_for(lambda: _http_ok(self.metrics_port) is not None, what="operator /healthz")

    def healthy(self) -> bool | None:
        """/healthz: True (200), False (an error status), None (nothing answers)."""
        return _http_ok(self.metrics_port)

    def metric(self, line_start: str) -> float | None:
        """The first sample of the operator's /metrics whose line starts with `line_start`."""
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return None

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


def _http_ok(port: int) -> bool | None:
    """True if /healthz answers 200, False if it answers an error, None if nothing answers."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False
    except OSError:
        return None


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


def replica_pod(api: ApiServer, rs_name: str, pod_name: str, ns: str = NS) -> dict:
    """Play KubeRay: a worker pod made from the RayService's worker group template (its labels, its
    fetch-model init container)."""
    rs = api.get(k.RAYSERVICES, rs_name, ns)
    template = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    return api.kube.create(k.PODS, ns, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": ns,
                     "labels": {**template["metadata"]["labels"], "ray.io/node-type": "worker"}},
        "spec": copy.deepcopy(template["spec"])})


def fetch_ends(api: ApiServer, pod_name: str, exit_code: int, message: str, retrying: bool = False,
               ns: str = NS) -> None:
    """Play the kubelet: the pod's fetch-model init container terminated with `message` as its termination
    message. retrying: it failed and waits to run again (CrashLoopBackOff), so the failure is lastState."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                  "message": message, "startedAt": when, "finishedAt": when}
    status = {"name": "fetch-model", "ready": exit_code == 0, "restartCount": 1 if retrying else 0,
              "image": "registry.test/indexcache-serving:test", "imageID": "", "state": {"terminated": terminated}}
    if retrying:
        status.update(state={"waiting": {"reason": "CrashLoopBackOff"}}, lastState={"terminated": terminated})
    api.kube.patch(k.PODS, ns, pod_name, {"status": {"phase": "Pending", "initContainerStatuses": [status]}},
                   subresource="status")


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
