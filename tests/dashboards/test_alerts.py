"""Alert rules: valid for Prometheus, unit-tested with promtool, each with a runbook section."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from prom_helpers import find_binary

from dashboards import alerts, build

HERE = Path(__file__).resolve().parent
RULES = build.ROOT / "dashboards" / "rules" / build.RULES_NAME
RUNBOOK = build.ROOT / "docs" / "runbook.md"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_binary("promtool"), *args], capture_output=True, text=True, cwd=HERE)


def test_rule_file_passes_promtool_check():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0 and f"SUCCESS: {len(alerts.ALERTS)} rules found" in proc.stdout, proc.stdout + proc.stderr


def test_alerts_fire_when_they_should_and_only_then():
    proc = promtool("test", "rules", "alerts.test.yaml")
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_is_unit_tested_firing():
    tests = yaml.safe_load((HERE / "alerts.test.yaml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert fired == {a.name for a in alerts.ALERTS}


def test_the_issue_alerts_exist():
    exprs = {a.name: a.expr for a in alerts.ALERTS}
    assert "indexcache_time_to_first_token_seconds_bucket" in exprs["IndexCacheTTFTHigh"]
    assert "indexcache_operator_ready_replicas" in exprs["IndexCacheReplicasNotReady"]
    assert 'result="failed"' in exprs["IndexCacheRecalibrationFailed"]
    assert 'decision="rejected"' in exprs["IndexCacheQualityGateRejected"]
    assert "indexcache_operator_reconcile_errors_total" in exprs["IndexCacheOperatorReconcileErrors"]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_summary_description_and_its_runbook_section():
    headings = {_anchor(h): h for h in re.findall(r"^## (.+)$", RUNBOOK.read_text(), flags=re.M)}
    for rule in alerts.rule_file()["groups"][0]["rules"]:
        notes = rule["annotations"]
        assert notes["summary"] and len(notes["description"]) > len(notes["summary"]), rule["alert"]
        url, anchor = notes["runbook_url"].split("#")
        assert url.endswith("docs/runbook.md") and anchor in headings, f"{rule['alert']}: no runbook section #{anchor}"
    assert set(headings) == {a.runbook_anchor for a in alerts.ALERTS}, "a runbook section without an alert"
