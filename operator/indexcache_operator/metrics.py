"""Operator metrics (names in docs/contracts.md) and the HTTP endpoint serving /metrics and /healthz.

The endpoint runs on the operator's own event loop, so /healthz answering at all means the loop
(and with it every watch and handler) is alive."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from indexcache_operator.models import CONDITION_TYPES

_KEY = ("namespace", "name")
# Every value of the bounded outcome labels, exported at 0 from a resource's first reconcile: Prometheus'
# increase() cannot count a series whose first sample is already 1, so the first recalibration of a
# deployment would otherwise show as 0 in the dashboards' "(time range)" panels.
RECALIBRATION_RESULTS = ("succeeded", "failed")
GATE_DECISIONS = ("applied", "rejected", "recommended")
# indexcache_operator_errors_total's label values (docs/contracts.md), all exported at 0 from the start for
# the same reason: the first error must show in rate()/increase(), and the dashboard panel has data.
ERROR_SOURCES = ("resync", "cleanup", "event")
ERROR_REASONS = ("ApiUnreachable", "Api403", "Api404", "Api409", "Api5xx", "Unexpected")


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter("indexcache_operator_reconciles_total", "Reconciles by result.",
                                  _KEY + ("result",), registry=r)
        self.errors = Counter("indexcache_operator_reconcile_errors_total", "Reconcile errors by reason.",
                              _KEY + ("reason",), registry=r)
        self.duration = Histogram("indexcache_operator_reconcile_duration_seconds", "Reconcile wall time.",
                                  _KEY, registry=r,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.condition = Gauge("indexcache_operator_condition",
                               "1 for the current status of each condition, 0 for the others.",
                               _KEY + ("condition", "status"), registry=r)
        self.replicas = Gauge("indexcache_operator_replicas", "Desired replicas.", _KEY, registry=r)
        self.ready_replicas = Gauge("indexcache_operator_ready_replicas", "Replicas serving.", _KEY, registry=r)
        self.full_layers = Gauge("indexcache_operator_full_layers", "F layers in the applied pattern.",
                                 _KEY, registry=r)
        self.recalibrations = Counter("indexcache_operator_recalibrations_total",
                                      "Finished recalibration jobs by result.", _KEY + ("result",), registry=r)
        self.gate_decisions = Counter("indexcache_operator_gate_decisions_total",
                                      "Quality gate decisions.", _KEY + ("decision",), registry=r)
        self.loss_delta = Gauge("indexcache_operator_recalibration_loss_delta",
                                "Loss delta (nats/token) of the last recalibration vs all-F.", _KEY, registry=r)
        # Errors of the operator itself, outside one resource's reconcile (the resync loop, deletion
        # cleanup, event handlers): bounded labels, never a resource name.
        self.operator_errors = Counter("indexcache_operator_errors_total",
                                       "Operator errors by source and reason.", ("source", "reason"), registry=r)
        self.active = Gauge("indexcache_operator_active",
                            "1 while this replica is the active one (HA: the others stand by), else 0.", registry=r)
        self.active.set(1)
        for source in ERROR_SOURCES:
            for reason in ERROR_REASONS:
                self.operator_errors.labels(source, reason)

    def observe_status(self, namespace: str, name: str, spec_replicas: int, status: dict) -> None:
        for result in RECALIBRATION_RESULTS:
            self.recalibrations.labels(namespace, name, result)
        for decision in GATE_DECISIONS:
            self.gate_decisions.labels(namespace, name, decision)
        self.replicas.labels(namespace, name).set(spec_replicas)
        self.ready_replicas.labels(namespace, name).set(status.get("readyReplicas", 0))
        if status.get("fullLayers") is not None:
            self.full_layers.labels(namespace, name).set(status["fullLayers"])
        current = {c["type"]: c["status"] for c in status.get("conditions", [])}
        for ctype in CONDITION_TYPES:
            for cstatus in ("True", "False", "Unknown"):
                self.condition.labels(namespace, name, ctype, cstatus).set(
                    1.0 if current.get(ctype, "Unknown") == cstatus else 0.0)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted resource (bounded label sets, no stale Ready=1)."""
        for metric in (self.reconciles, self.errors, self.duration, self.condition, self.replicas,
                       self.ready_replicas, self.full_layers, self.recalibrations, self.gate_decisions,
                       self.loss_delta):
            for labels in list(metric._metrics):  # prometheus_client has no prefix removal
                if labels[:2] == (namespace, name):
                    metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: OperatorMetrics, port: int, host: str = "0.0.0.0",
                problem: Callable[[], str | None] | None = None) -> web.AppRunner:
    """`problem()` says why the operator cannot work (e.g. the resync has failed for too long): /healthz
    then answers 503 with that reason, and the liveness probe restarts the pod."""
    async def handle_metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_health(_: web.Request) -> web.Response:
        await asyncio.sleep(0)
        why = problem() if problem is not None else None
        if why:
            return web.json_response({"status": "unhealthy", "reason": why}, status=503)
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
