"""Operator metrics as Prometheus reads them: outcome counters exist at 0 before their first increment
(so a dashboard's increase() counts the first recalibration), and a deleted resource leaves no series."""
from prometheus_client.parser import text_string_to_metric_families

from indexcache_operator.metrics import GATE_DECISIONS, RECALIBRATION_RESULTS, OperatorMetrics

STATUS = {"readyReplicas": 1, "fullLayers": 3, "conditions": [{"type": "Ready", "status": "True"}]}


def samples(metrics: OperatorMetrics) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_outcome_counters_start_at_zero_once_a_resource_is_reconciled():
    metrics = OperatorMetrics()
    metrics.observe_status("serving", "chat", 2, STATUS)
    got = samples(metrics)
    key = (("name", "chat"), ("namespace", "serving"))
    for decision in GATE_DECISIONS:
        assert got[("indexcache_operator_gate_decisions_total", tuple(sorted(key + (("decision", decision),))))] == 0
    for result in RECALIBRATION_RESULTS:
        assert got[("indexcache_operator_recalibrations_total", tuple(sorted(key + (("result", result),))))] == 0
    # The bounded label values are the ones docs/contracts.md names.
    assert set(GATE_DECISIONS) == {"applied", "rejected", "recommended"}
    assert set(RECALIBRATION_RESULTS) == {"succeeded", "failed"}


def test_forget_drops_every_series_of_a_deleted_resource():
    metrics = OperatorMetrics()
    metrics.observe_status("serving", "chat", 2, STATUS)
    metrics.observe_status("serving", "other", 1, STATUS)
    metrics.gate_decisions.labels("serving", "chat", "applied").inc()
    metrics.forget("serving", "chat")
    names = {dict(labels).get("name") for (_, labels) in samples(metrics)}
    assert "chat" not in names and "other" in names
