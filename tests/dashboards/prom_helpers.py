"""A real Prometheus server for tests, and an exporter that emits every contract metric.

Prometheus (the Debian package's binary) runs on 127.0.0.1 with a temporary config and storage directory;
the exporter is prometheus_client serving /metrics on loopback, so queries run against real scrapes.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dashboards import metrics_contract

# Grafana's variables, as a user with "All" selected and a short time range would get them.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__range": "2m", "$deployment": ".*", "$namespace": ".*"}


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if not path:
        raise RuntimeError(f"{name} not found: install the Debian package `prometheus` (scripts/setup.sh does)")
    return path


class ContractExporter:
    """Serves every contract metric whose name starts with `prefix` (and not `exclude`), changing all the time."""

    def __init__(self, prefix: str, base_labels: dict[str, str], exclude: str | None = None):
        self.registry = CollectorRegistry()
        self.children = []  # (kind, child)
        for m in metrics_contract.load().values():
            if not m.name.startswith(prefix) or (exclude and m.name.startswith(exclude)):
                continue
            extra = list(m.label_values)
            name = m.name.removesuffix("_total") if m.type == "counter" else m.name
            cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[m.type]
            metric = cls(name, m.name, list(m.labels), registry=self.registry)
            if not m.labels:  # a label-less metric (the operator process's own) is its only child
                self.children.append((m.type, metric))
                continue
            for combo in itertools.product(*(m.label_values[k] for k in extra)):
                labels = {**{k: base_labels[k] for k in m.labels if k in base_labels}, **dict(zip(extra, combo))}
                self.children.append((m.type, metric.labels(**labels)))
        self.port = free_port()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tick(self) -> None:
        for kind, child in self.children:
            if kind == "counter":
                child.inc(random.uniform(1, 100))
            elif kind == "gauge":
                child.set(random.uniform(0.1, 1.0))
            else:
                child.observe(random.expovariate(2.0))

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._tick()

    def __enter__(self) -> "ContractExporter":
        self._tick()
        self.server, self._server_thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.server.shutdown()


class Prometheus:
    """`prometheus` on loopback scraping `targets` ({job: "host:port"}) every second."""

    def __init__(self, targets: dict[str, str], metrics_path: str = "/metrics"):
        self.dir = Path(tempfile.mkdtemp(prefix="prom-test-"))
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": job, "metrics_path": metrics_path,
                                      "static_configs": [{"targets": [target]}]} for job, target in targets.items()]}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Prometheus":
        self.log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [find_binary("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.dir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("prometheus not ready after 20 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        if body["status"] != "success":
            raise AssertionError(f"{expr}: {body}")
        return body["data"]["result"]

    def has_data(self, expr: str) -> bool:
        """At least one series with a finite value (NaN/Inf means no observations behind a ratio)."""
        try:
            result = self.query(expr)
        except urllib.error.HTTPError as err:  # a bad query: let the caller report it
            raise AssertionError(f"{expr}: HTTP {err.code} {err.read()[:300]!r}") from None
        return any(math.isfinite(float(s["value"][1])) for s in result)

    def wait_for(self, exprs: list[str], timeout: float) -> list[str]:
        """Poll until every expression has data; return those that still have none at the deadline."""
        deadline = time.monotonic() + timeout
        pending = list(exprs)
        while pending and time.monotonic() < deadline:
            pending = [e for e in pending if not self.has_data(e)]
            if pending:
                time.sleep(0.5)
        return pending
