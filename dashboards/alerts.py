"""Prometheus alert rules for IndexCache: the one source of the promtool rule file and the chart's
PrometheusRule. Every alert has a section of the same name in docs/runbook.md (a test checks).

Thresholds are the defaults users should start from; change them here and run `python -m dashboards.build`.
"""
from __future__ import annotations

from dataclasses import dataclass

RUNBOOK_URL = "https://github.com/indexcache/indexcache/blob/main/docs/runbook.md"

# TTFT p95 above this (seconds) for TTFT_FOR is slow enough that users notice. Long prompts (100K+ tokens)
# prefill for seconds even with IndexCache, so the default is generous; tighten it for chat traffic.
TTFT_P95_SECONDS = 5
TTFT_FOR = "10m"
# How long a failed recalibration or a rejected pattern stays firing: the Job runs rarely (a schedule),
# so one event must be visible long enough for someone to see it.
EVENT_WINDOW = "1h"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    @property
    def runbook_anchor(self) -> str:
        return self.name.lower()  # GitHub's anchor of the heading "## <name>"

    def rule(self) -> dict:
        rule = {"alert": self.name, "expr": self.expr}
        if self.for_ != "0m":
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity}
        rule["annotations"] = {"summary": self.summary, "description": self.description,
                               "runbook_url": f"{RUNBOOK_URL}#{self.runbook_anchor}"}
        return rule


def _new_or_increased(counter: str, window: str) -> str:
    """True for `window` after the counter went up, including its first appearance: a counter created at 1
    (an operator that does not pre-create label values) has no increase() but is new vs `window` ago."""
    return (f"(increase({counter}[{window}]) > 0) or ({counter} > 0 unless {counter} offset {window})")


ALERTS = (
    Alert(
        name="IndexCacheTTFTHigh",
        expr=(f"histogram_quantile(0.95, sum by (deployment, le) "
              f"(rate(indexcache_time_to_first_token_seconds_bucket[5m]))) > {TTFT_P95_SECONDS}"),
        for_=TTFT_FOR, severity="warning",
        summary="TTFT p95 of {{ $labels.deployment }} is {{ $value | humanizeDuration }}",
        description=(f"95 % of requests to IndexCacheDeployment {{{{ $labels.deployment }}}} waited more than "
                     f"{TTFT_P95_SECONDS}s for their first token over the last {TTFT_FOR}: replicas are saturated, "
                     "prompts got longer, or the active pattern runs more indexer layers than before."),
    ),
    Alert(
        name="IndexCacheReplicasNotReady",
        expr="indexcache_operator_ready_replicas < indexcache_operator_replicas",
        for_="15m", severity="warning",
        summary="{{ $labels.namespace }}/{{ $labels.name }} has fewer ready replicas than desired",
        description=("IndexCacheDeployment {{ $labels.namespace }}/{{ $labels.name }} has had "
                     "only {{ $value }} ready replicas, fewer than .spec.replicas, for 15 minutes: pods pending on GPUs, "
                     "crash-looping, or the RayService serve app is unhealthy."),
    ),
    Alert(
        name="IndexCacheRecalibrationFailed",
        expr=_new_or_increased('indexcache_operator_recalibrations_total{result="failed"}', EVENT_WINDOW),
        for_="0m", severity="warning",
        summary="Recalibration of {{ $labels.namespace }}/{{ $labels.name }} failed",
        description=("A recalibration Job of IndexCacheDeployment {{ $labels.namespace }}/{{ $labels.name }} failed "
                     f"or timed out within the last {EVENT_WINDOW}. The current pattern stays in use; "
                     ".status.lastRecalibration and the Job's events say why."),
    ),
    Alert(
        name="IndexCacheQualityGateRejected",
        expr=_new_or_increased('indexcache_operator_gate_decisions_total{decision="rejected"}', EVENT_WINDOW),
        for_="0m", severity="info",
        summary="Quality gate rejected a new pattern for {{ $labels.namespace }}/{{ $labels.name }}",
        description=("The quality gate kept the current IndexCache pattern of {{ $labels.namespace }}/{{ $labels.name }} "
                     "because the recalibrated pattern's loss delta exceeded .spec.recalibration.maxLossDelta "
                     f"(within the last {EVENT_WINDOW}). The candidate is kept in status as a recommendation."),
    ),
    Alert(
        name="IndexCacheOperatorReconcileErrors",
        expr="sum by (namespace, name) (rate(indexcache_operator_reconcile_errors_total[5m])) > 0",
        for_="15m", severity="warning",
        summary="Reconciling {{ $labels.namespace }}/{{ $labels.name }} keeps failing",
        description=("The operator has failed to reconcile IndexCacheDeployment {{ $labels.namespace }}/{{ $labels.name }} "
                     "in every 5-minute window for 15 minutes; changes to the resource are not reaching the cluster."),
    ),
    Alert(
        name="IndexCacheOperatorErrors",
        expr="sum by (source, reason) (rate(indexcache_operator_errors_total[5m])) > 0",
        for_="15m", severity="warning",
        summary="The IndexCache operator keeps failing in {{ $labels.source }} ({{ $labels.reason }})",
        description=("The operator's {{ $labels.source }} has failed with {{ $labels.reason }} in every 5-minute window "
                     "for 15 minutes: the periodic resync, deletion cleanup or event handling is not getting through "
                     "to the API server, so drift and missed events are not repaired."),
    ),
)


def rule_file() -> dict:
    """The rule file promtool reads; the chart's PrometheusRule spec is this same object."""
    return {"groups": [{"name": "indexcache", "rules": [a.rule() for a in ALERTS]}]}
