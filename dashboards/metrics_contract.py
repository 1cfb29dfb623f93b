"""The metric names, types and labels fixed in docs/contracts.md, read from that file.

Dashboards and alert rules may only query metrics listed there (the build refuses anything else), and the
tests' fake exporter emits exactly these, so a renamed metric breaks the build instead of a dashboard.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CONTRACTS = Path(__file__).resolve().parent.parent / "docs" / "contracts.md"

# Label values the contract does not spell out in parentheses.
_DEFAULT_VALUES = {"status": ("True", "False"), "reason": ("ApiError", "InvalidSpec")}


@dataclass(frozen=True)
class Metric:
    name: str
    type: str  # counter | gauge | histogram
    labels: tuple[str, ...]  # base labels of its table plus the extra ones its row names
    label_values: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def series_names(self) -> set[str]:
        """Names this metric exposes on /metrics (histograms as _bucket/_sum/_count)."""
        if self.type == "histogram":
            return {self.name + s for s in ("_bucket", "_sum", "_count")}
        return {self.name}


def load(path: Path = CONTRACTS) -> dict[str, Metric]:
    metrics: dict[str, Metric] = {}
    base: tuple[str, ...] = ()
    for line in path.read_text().splitlines():
        heading = re.match(r"^#+ .*metrics.*\(prefix `[a-z_]+`, labels (.*)\)", line)
        if heading:
            base = tuple(re.findall(r"`([a-z_]+)`", heading.group(1)))
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`indexcache"):
            continue
        names = re.findall(r"`(indexcache_[a-z0-9_]+)`", cells[0])
        mtype = cells[1]
        if mtype not in ("counter", "gauge", "histogram"):
            raise ValueError(f"{path}: metric {names} has unknown type {mtype!r}")
        extra: dict[str, tuple[str, ...]] = {}
        for m in re.finditer(r"`([a-z_]+)`(?:\s*\(([^)]*)\))?", cells[2]):
            label, values = m.group(1), m.group(2)
            if label.startswith("indexcache"):
                continue
            extra[label] = (tuple(v.strip() for v in values.split(",")) if values
                            else _DEFAULT_VALUES.get(label, ("other",)))
        for name in names:
            metrics[name] = Metric(name, mtype, base + tuple(extra), extra)
    if not metrics:
        raise ValueError(f"{path}: no metric tables found")
    return metrics


def exposed_series(metrics: dict[str, Metric]) -> set[str]:
    return set().union(*(m.series_names() for m in metrics.values()))


# PromQL words that look like metric names but are functions, keywords or our template variables.
_NOT_METRICS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile", "by",
    "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
    "clamp_min", "clamp_max", "vector", "scalar", "absent", "time", "changes", "resets", "bool",
    "label_replace", "max_over_time", "min_over_time", "avg_over_time", "last_over_time", "topk",
}


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (good enough for our own expressions)."""
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_matchers = re.sub(r"\{[^}]*\}", "{}", no_strings)
    no_grouping = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", no_matchers)
    no_ranges = re.sub(r"\[[^\]]*\]", "[]", no_grouping)
    words = re.findall(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?=\s*[\{\[\)\s,]|$)", no_ranges)
    return {w for w in words if w not in _NOT_METRICS and not re.fullmatch(r"[0-9e]+", w)}
