"""The metrics the chart's alert rules and Grafana dashboard use, read from the rendered chart:
shared by the promtool tests (unit tier) and the check against the operator's real /metrics
(integration tier)."""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from nightjar.devstack.stack import binary

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "nightjar"
DASHBOARD = CHART / "dashboards" / "nightjar.json"
#: Labels Prometheus adds to every scraped series (target labels), not the operator.
TARGET_LABELS = {"job", "instance", "pod"}
#: The rules' matchers of the operator's scrape target (release nj in nj-system): target labels too.
OPERATOR_SELECTOR = 'job="nj-nightjar-metrics",namespace="nj-system"'
#: Series Prometheus makes itself.
PROMETHEUS_SERIES = {"up"}

_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_NAME = re.compile(r"\b(nightjar_[a-z0-9_]+|up)\b")
_GROUPING = re.compile(r"\b(?:by|on|ignoring|without)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)")


def render(*args: str) -> list[dict[str, Any]]:
    """``helm template`` of the chart (release nj in namespace nj-system) with ``args``."""
    out = subprocess.run(
        [str(binary("helm", "helm")), "template", "nj", str(CHART), "--namespace", "nj-system", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def rule_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's groups as the chart renders them with prometheusRule.enabled."""
    docs = render("--set=prometheusRule.enabled=true")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def dashboard_exprs() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and template variables."""
    dash = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]
    for v in dash["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict) and q.get("query"):
            out.append(q["query"])
    return out


def metric_uses(expr: str) -> dict[str, set[str]]:
    """The operator metrics (sample names, e.g. ``*_bucket``) an expression reads, each with the
    labels it needs: its own matchers, ``label_values``' label, and every grouping label
    (by/on/ignoring/without), which each metric of the expression must carry. Target labels and
    Prometheus' own series are left out."""
    expr = expr.replace(OPERATOR_SELECTOR, "")
    uses: dict[str, set[str]] = defaultdict(set)
    for name in _NAME.findall(expr):
        uses[name]
    for name, matchers in _SELECTOR.findall(expr):
        uses[name].update(_MATCHER.findall(matchers))
    for name, label in _LABEL_VALUES.findall(expr):
        uses[name].add(label)
    grouping = {lab.strip() for group in _GROUPING.findall(expr) for lab in group.split(",") if lab.strip()}
    for name in uses:
        uses[name] |= grouping
    return {
        n: labels - TARGET_LABELS
        for n, labels in uses.items()
        if n not in PROMETHEUS_SERIES and not n.startswith("process_")
    }


def all_uses() -> dict[str, set[str]]:
    """Every operator metric the rules and the dashboard use, with the labels they need."""
    total: dict[str, set[str]] = defaultdict(set)
    for expr in [a["expr"] for a in alerts()] + dashboard_exprs():
        for name, labels in metric_uses(expr).items():
            total[name] |= labels
    return dict(total)
