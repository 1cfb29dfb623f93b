"""Every dashboard panel answered by a real Prometheus scraping the real programs (issue 7):

- `indexcache serve --tiny` (Ray Serve, the tiny random DSA model, an IndexCache pattern with S layers and a GPU
  price, so cost and savings are non-zero) under a short streaming load from the official `openai` client;
- the real kopf operator against the kmock API emulator, driven through a create, an annotation-triggered
  recalibration, the Job's completion and the gated apply (plus a failed run and a Degraded resource).

One Prometheus (the Debian package's binary, on 127.0.0.1) scrapes both, as the chart's ServiceMonitor and
PodMonitor would. Ray boots in the background while the operator scenario runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prom_helpers import Prometheus, free_port, substitute

from dashboards import build
from dashboards.definitions import DASHBOARDS
import kube_harness as kh  # tests/operator's harness (this directory's conftest.py puts it on sys.path)

SERVE = [sys.executable, "-c", "import sys; from indexcache.cli import main; sys.exit(main())", "serve"]
GPU_HOURLY_USD = 2.5
TINY_LAYERS, SERVE_FREQ = 6, 2
SERVE_FULL_LAYERS = 4  # --freq 2 (offset 2) on the 6-layer tiny model: F at layers 0, 1, 3, 5
SERVE_DEPLOYMENT = "local"  # `indexcache serve`'s deployment label
NAME, BROKEN = "chat", "broken"
CALIBRATED = "FSSSSSSS"


def is_operator_query(expr: str) -> bool:
    return "indexcache_operator_" in expr or 'up{job="indexcache-operator"}' in expr


def panel_queries(operator: bool) -> dict[str, str]:
    """{query with Grafana's variables filled in: "dashboard: panel"}; the two halves cover every panel."""
    return {substitute(expr): f"{dash.uid}: {title}" for dash in DASHBOARDS for title, expr in dash.queries()
            if is_operator_query(expr) == operator}


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(build.ROOT / "serving"), str(build.ROOT / "operator"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


class LiveServer:
    """`indexcache serve --tiny` in a subprocess; it starts booting at construction."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w+")
        args = ["--tiny", "--host", "127.0.0.1", "--port", str(self.port), "--gpu-hourly-usd", str(GPU_HOURLY_USD),
                "--freq", str(SERVE_FREQ), "--kv-cache-tokens", "8192"]   # the paged pool: its prefix-cache panel
        self.proc = subprocess.Popen(SERVE + args, stdout=self.log, stderr=subprocess.STDOUT, env=_env())
        self._healthy = False

    def _log_tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def wait_healthy(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while not self._healthy:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"indexcache serve --tiny did not become healthy:\n{self._log_tail()}")
            try:   # /readyz: 200 once the model is loaded (/healthz answers as soon as the ingress is up)
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as r:
                    self._healthy = r.status == 200
            except OSError:
                time.sleep(0.3)
        return self.url

    def close(self) -> None:
        self.proc.terminate()  # the CLI shuts Ray Serve down on SIGTERM
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("serve") / "serve.log")
    yield live
    live.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The API emulator and the operator (resync 60 s: only watch events drive it, as in tests/operator)."""
    api = kh.ApiServer(tmp_path_factory.mktemp("kube"))
    env = pytest.MonkeyPatch()
    operator = kh.OperatorProcess(api, env)
    try:
        operator.start()
        yield api, operator
    finally:
        operator.stop()
        env.undo()
        api.close()


@pytest.fixture(scope="module")
def prom(server, cluster):
    _, operator = cluster
    with Prometheus({"indexcache-serving": f"127.0.0.1:{server.port}",
                     "indexcache-operator": f"127.0.0.1:{operator.metrics_port}"}) as p:
        yield p


def _value(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)
    assert len(result) == 1, f"{expr}: expected one series, got {result}"
    return float(result[0]["value"][1])


def _eventually(prom: Prometheus, *conditions: str, timeout: float = 15) -> None:
    """Each PromQL filter (e.g. `sum(x) == 1`) returns a series within `timeout` (a scrape or two)."""
    failing = prom.wait_for(list(conditions), timeout=timeout)
    assert not failing, "never true:\n" + "\n".join(f"  {c}  (now: {prom.query(c.rsplit(' ', 2)[0])})"
                                                     for c in failing)


def _missing(prom: Prometheus, queries: dict[str, str], timeout: float) -> str:
    empty = prom.wait_for(list(queries), timeout=timeout)
    return "panels without data:\n" + "\n".join(f"  {queries[e]}: {e}" for e in empty) if empty else ""


# ---- the operator half ---------------------------------------------------------------------------------------

def _status(api) -> dict:
    return (api.get(kh.ICDS, NAME) or {}).get("status") or {}


def _run_recalibration(api, operator, token: str, result: dict | None) -> str:
    operator.wait_idle()  # the annotation's own watch event must start the Job (resync is 60 s)
    before = api.names(kh.k.JOBS)
    api.kube.patch(kh.ICDS, kh.NS, NAME, {"metadata": {"annotations": {"indexcache.io/recalibrate": token}}})
    job = kh.wait_for(lambda: next(iter(api.names(kh.k.JOBS) - before), None), what=f"the Job for {token}")
    kh.job_finishes(api, job, result, failure_reason="DeadlineExceeded")
    kh.wait_for(lambda: (_status(api).get("recalibration", {}).get("last") or {}).get("job") == job,
                what=f"Job {job} recorded in status")
    return job


def _kuberay_heartbeat(api, stop: threading.Event) -> None:
    """KubeRay keeps re-reporting the RayService's status; each report is a child event the operator
    reconciles, so its reconcile rate and duration panels have fresh samples in their rate window."""
    while not stop.wait(0.5):
        try:
            kh.kuberay_reports_healthy(api, NAME, ready=2)
        except Exception:  # the emulator is shutting down
            return


def test_operator_and_recalibration_panels_show_the_scenario(prom, cluster, server):
    api, operator = cluster
    k = kh.k
    # A healthy deployment with a quality gate, and one whose pattern does not fit its model (Degraded).
    api.kube.create(kh.ICDS, kh.NS, kh.icd(NAME, recalibration={"autoApply": "Gated", "maxLossDelta": 0.02}))
    api.kube.create(kh.ICDS, kh.NS, kh.icd(BROKEN, indexCache={"pattern": "FFSS"}))
    kh.wait_for(lambda: api.get(k.RAYSERVICES, NAME), what="RayService")
    kh.kuberay_reports_healthy(api, NAME, ready=2)
    kh.wait_for(lambda: kh.condition(api.get(kh.ICDS, NAME), "Ready").get("status") == "True", what="Ready")
    kh.wait_for(lambda: kh.condition(api.get(kh.ICDS, BROKEN), "Degraded").get("status") == "True", what="Degraded")
    # Prometheus must have seen the outcome counters at 0 before the first run, as it would in production
    # (where hours pass in between), or increase() cannot count that run.
    zero = f'indexcache_operator_gate_decisions_total{{name="{NAME}", decision="applied"}} == 0'
    assert not prom.wait_for([zero], timeout=20), "the gate-decision counter was not scraped at 0"

    applied = _run_recalibration(api, operator, "first", kh.calibration_result(CALIBRATED, loss_delta=0.01))
    assert _status(api)["recalibration"]["last"]["decision"] == "Applied"
    failed = _run_recalibration(api, operator, "nightly", None)
    assert _status(api)["recalibration"]["last"]["result"] == "Failed" and applied != failed

    stop = threading.Event()
    heartbeat = threading.Thread(target=_kuberay_heartbeat, args=(api, stop), daemon=True)
    heartbeat.start()
    try:
        missing = _missing(prom, panel_queries(operator=True), timeout=45)
        assert not missing, missing
        # What the panels show is what happened.
        ns, me = f'namespace="{kh.NS}"', f'name="{NAME}"'
        _eventually(
            prom,
            'sum(up{job="indexcache-operator"}) == 1',
            f'sum(indexcache_operator_condition{{{ns}, condition="Ready", status="True"}}) == 1',
            f'sum(indexcache_operator_condition{{{ns}, condition="Degraded", status="True"}}) == 1',
            f'sum(indexcache_operator_condition{{{me}, condition="Calibrated", status="True"}}) == 1',
            f"sum(indexcache_operator_full_layers{{{me}}}) == {CALIBRATED.count('F')}",
            f"sum(indexcache_operator_recalibration_loss_delta{{{me}}}) == 0.01",
            # The "(time range)" panels count the first runs.
            f'sum(increase(indexcache_operator_gate_decisions_total{{{me}, decision="applied"}}[2m])) > 0',
            f'sum(increase(indexcache_operator_recalibrations_total{{{me}, result="succeeded"}}[2m])) > 0',
            f'sum(increase(indexcache_operator_recalibrations_total{{{me}, result="failed"}}[2m])) > 0',
            f'sum(increase(indexcache_operator_gate_decisions_total{{{me}, decision="rejected"}}[2m])) == 0',
            # The broken resource's error, by the reason the user must fix.
            f'indexcache_operator_reconcile_errors_total{{name="{BROKEN}", reason="PatternLengthMismatch"}} >= 1',
            # The deployment variable lists both resources.
            "count(count by (name) (indexcache_operator_replicas)) == 2",
        )
    finally:
        stop.set()
        heartbeat.join(5)


# ---- the serving half ----------------------------------------------------------------------------------------

def _load(url: str, stop: threading.Event) -> int:
    from openai import OpenAI
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    model = client.models.list().data[0].id
    done = 0

    def one(i: int) -> None:
        stream = client.completions.create(model=model, prompt=f"Request {i}: the quick brown fox", max_tokens=8,
                                           temperature=0, stream=True)
        assert sum(1 for _ in stream) > 0

    with ThreadPoolExecutor(max_workers=3) as pool:
        while not stop.is_set():
            list(pool.map(one, range(done, done + 3)))
            done += 3
    return done


def test_serving_and_cost_panels_show_a_live_server_under_load(prom, server):
    url = server.wait_healthy()
    stop = threading.Event()
    result: dict = {}
    loader = threading.Thread(target=lambda: result.setdefault("requests", _load(url, stop)), daemon=True)
    loader.start()
    sel = f'{{deployment="{SERVE_DEPLOYMENT}"}}'
    try:
        queries = panel_queries(operator=False)
        missing = _missing(prom, queries, timeout=60)
        assert not missing, missing
        per_million = next(e for e, where in queries.items() if where.endswith(": Cost per million tokens"))
        # Cost comes from the price given on the command line, savings from the S layers of --freq 2.
        _eventually(prom, f"{per_million} > 0", f"sum(increase(indexcache_cost_saved_usd_total{sel}[2m])) > 0")
    finally:
        stop.set()
        loader.join(timeout=120)
    assert result.get("requests", 0) > 0, "the load generator finished no request"
    _eventually(
        prom,
        f"indexcache_gpu_hourly_usd{sel} == {GPU_HOURLY_USD}",
        f"indexcache_full_layers{sel} == {SERVE_FULL_LAYERS}",
        f"indexcache_layers{sel} == {TINY_LAYERS}",
        # Every request the client finished is counted (the next scrape or two brings the last ones in).
        f'sum(indexcache_requests_total{{deployment="{SERVE_DEPLOYMENT}", finish_reason=~"stop|length"}})'
        f' >= {result["requests"]}',
    )
