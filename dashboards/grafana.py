"""Grafana dashboard JSON from small Python definitions (schemaVersion 39, Prometheus datasource).

Every dashboard gets a `datasource` variable (so it imports into any Grafana with a Prometheus) and a
`deployment` variable (the IndexCacheDeployment: label `deployment` on serving metrics, `name` on
operator metrics). Panels are laid out left to right, top to bottom, on Grafana's 24-column grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24


@dataclass
class Query:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    queries: list[Query]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | table
    description: str = ""
    width: int = 12
    height: int = 8
    decimals: int | None = None


@dataclass
class Row:
    title: str
    panels: list[Panel]


@dataclass
class Variable:
    name: str
    label: str
    query: str  # label_values(...) for Grafana's Prometheus variable editor
    include_all: bool = True


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    rows: list[Row]
    variables: list[Variable] = field(default_factory=list)
    tags: tuple[str, ...] = ("indexcache",)

    def queries(self) -> list[tuple[str, str]]:
        """(panel title, expr) for every query, for tests and promtool checks."""
        return [(p.title, q.expr) for r in self.rows for p in r.panels for q in p.queries]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [
        {"datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend or "__auto",
         "refId": chr(ord("A") + i), "range": panel.kind == "timeseries", "instant": panel.kind != "timeseries"}
        for i, q in enumerate(panel.queries)
    ]
    defaults: dict = {"unit": panel.unit}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    out = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {},
    }
    if panel.kind == "timeseries":
        out["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                                    "spanNulls": False, "showPoints": "never"}
        out["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    elif panel.kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    elif panel.kind == "table":
        out["options"] = {"showHeader": True}
        out["transformations"] = [{"id": "merge", "options": {}}]
    return out


def _variable_json(var: Variable) -> dict:
    return {
        "name": var.name,
        "label": var.label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": var.query,
        "query": {"query": var.query, "refId": f"{var.name}-values", "qryType": 1},
        "refresh": 2,  # on time range change: new deployments appear without a reload
        "includeAll": var.include_all,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
    }


def to_json(dash: Dashboard) -> dict:
    """The dashboard as Grafana's import JSON (`id: null` so import creates or overwrites by uid)."""
    panels: list[dict] = []
    next_id = 1
    y = 0
    for row in dash.rows:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    datasource_var = {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                      "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False,
                      "multi": False}
    return {
        "id": None,
        "uid": dash.uid,
        "title": dash.title,
        "description": dash.description,
        "tags": list(dash.tags),
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"title": "IndexCache dashboards", "type": "dashboards", "tags": ["indexcache"], "asDropdown": True}],
        "templating": {"list": [datasource_var] + [_variable_json(v) for v in dash.variables]},
        "panels": panels,
    }
