"""Dashboards: generated, importable, on the metric contract, and every query valid and answered by Prometheus."""
from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from prom_helpers import ContractExporter, Prometheus, find_binary, substitute

from dashboards import metrics_contract
from dashboards import build, definitions, grafana
from dashboards.definitions import DASHBOARDS

# What the issue asks each dashboard to show; the titles are what users look for.
REQUIRED_PANELS = {
    "indexcache-serving": {"Time to first token", "Time per output token", "End-to-end latency", "Tokens per second",
                           "Finished requests per second", "Requests running and waiting", "KV cache usage"},
    "indexcache-cost": {"Cost per million tokens", "Money saved by IndexCache (time range)", "F layers active",
                        "Indexer FLOPs skipped"},
    "indexcache-recalibration": {"Recalibrations finished", "Last loss delta vs all-F", "Gate decisions (time range)",
                                 "F layers in the applied pattern", "Pattern version served"},
    "indexcache-operator": {"Operator up", "Reconciles per second", "Reconcile errors per second",
                            "Reconcile duration", "Replicas desired and ready", "Conditions"},
}


def test_generated_dashboards_and_rules_are_current():
    stale = build.stale_files()
    assert not stale, f"run `python -m dashboards.build`: stale {[str(p) for p in stale]}"


def test_drift_check_notices_an_edited_definition(monkeypatch):
    monkeypatch.setattr(DASHBOARDS[0], "title", "IndexCache / Serving (edited)")
    stale = {p.name for p in build.stale_files()}
    assert stale == {"indexcache-serving.json"}  # both copies: dashboards/json and the chart's files/


def test_queries_use_only_contract_metrics():
    build.check_contract()  # raises SystemExit naming the query otherwise


def test_a_metric_outside_the_contract_is_refused(monkeypatch):
    bogus = grafana.Panel("typo", [grafana.Query("rate(indexcache_time_to_first_token_second_bucket[5m])")])
    monkeypatch.setattr(DASHBOARDS[0].rows[0], "panels", DASHBOARDS[0].rows[0].panels + [bogus])
    with pytest.raises(SystemExit, match="indexcache_time_to_first_token_second_bucket"):
        build.check_contract()


def _process_level(expr: str) -> bool:
    """The query reads only metrics of the operator process (no deployment or name label to filter by)."""
    contract = metrics_contract.load()
    names = metrics_contract.metric_names_in(expr)
    return bool(names) and all(not {"name", "deployment"} & set(contract[n].labels) for n in names)


@pytest.mark.parametrize("dash", DASHBOARDS, ids=lambda d: d.uid)
def test_dashboard_json_is_importable(dash):
    doc = json.loads((build.ROOT / "dashboards" / "json" / f"{dash.uid}.json").read_text())
    assert doc["uid"] == dash.uid and doc["id"] is None and doc["schemaVersion"] >= 36
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["deployment"]["includeAll"] and variables["deployment"]["allValue"] == ".*"
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        # Every query goes to the chosen datasource, never to a uid that exists only on the author's Grafana.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"])
        assert all("$deployment" in t["expr"] or t["expr"] == 'sum(up{job="indexcache-operator"})'
                   or _process_level(t["expr"]) for t in panel["targets"]), f"{panel['title']} ignores the deployment variable"
    # No two panels overlap on the 24-column grid.
    cells = set()
    for panel in doc["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    titles = {p["title"] for p in panels}
    assert REQUIRED_PANELS[dash.uid] <= titles, REQUIRED_PANELS[dash.uid] - titles


def test_latency_panels_show_p50_p95_p99():
    serving = {p.title: p for r in definitions.SERVING_DASHBOARD.rows for p in r.panels}
    for title in ("Time to first token", "Time per output token", "End-to-end latency"):
        exprs = [q.expr for q in serving[title].queries]
        assert [e.split(",")[0] for e in exprs] == [f"histogram_quantile({q}" for q in (0.5, 0.95, 0.99)]


def test_every_dashboard_query_parses_with_promtool(tmp_path):
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(expr)}
             for i, (_, expr) in enumerate(build.all_queries())]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = subprocess.run([find_binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_every_panel_query_returns_data_from_a_real_prometheus():
    serving = ContractExporter("indexcache_", {"model": "tiny", "deployment": "demo"}, exclude="indexcache_operator_")
    operator = ContractExporter("indexcache_operator_", {"namespace": "default", "name": "demo"})
    with serving, operator, Prometheus({"indexcache-serving": f"127.0.0.1:{serving.port}",
                                        "indexcache-operator": f"127.0.0.1:{operator.port}"}) as prom:
        queries = {substitute(expr): where for dash in DASHBOARDS for where, expr in
                   [(f"{dash.uid}: {t}", e) for t, e in dash.queries()]}
        empty = prom.wait_for(list(queries), timeout=45)
        assert not empty, "panels without data:\n" + "\n".join(f"  {queries[e]}: {e}" for e in empty)
        # The variables' own queries list the deployment, so the dropdowns are not empty either.
        assert prom.query("count by (deployment) (indexcache_layers)")[0]["metric"] == {"deployment": "demo"}
