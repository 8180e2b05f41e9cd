"""The chart's alert rules with promtool: ``check rules`` on the rendered PrometheusRule, and
``test rules`` with charts/nightjar/tests/alerts_test.yaml (input series for every alert, firing and
not firing). Also: every alert carries what a pager needs, and its runbook anchor exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nightjar.devstack.stack import StackError, binary
from tests.chartmetrics import CHART, ROOT, alerts, all_uses, render, rule_groups

TESTS = CHART / "tests" / "alerts_test.yaml"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        return binary("helm", "helm")
    except StackError as e:  # `make test` builds it first (make binaries)
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def promtool(helm: Path) -> Path:
    try:
        return binary("prometheus", "promtool")
    except StackError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory, promtool: Path) -> Path:
    d = tmp_path_factory.mktemp("rules")
    (d / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    shutil.copy(TESTS, d / TESTS.name)
    return d


def run(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, cwd=cwd, check=False)


def test_promtool_check_rules_accepts_the_rendered_rules(promtool: Path, rules: Path) -> None:
    out = run(promtool, "check", "rules", "rules.yaml", cwd=rules)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout + out.stderr


def test_promtool_unit_tests_of_every_alert_pass(promtool: Path, rules: Path) -> None:
    out = run(promtool, "test", "rules", TESTS.name, cwd=rules)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_not_firing(helm: Path) -> None:
    tests = yaml.safe_load(TESTS.read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    names = {a["alert"] for a in alerts()}
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert firing == names and quiet == names


def test_every_alert_has_a_summary_description_severity_and_a_runbook_that_exists(helm: Path) -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in TROUBLESHOOTING.read_text().splitlines()
        if line.startswith("#")
    }
    for a in alerts():
        ann = a["annotations"]
        assert ann["summary"] and ann["description"] and a["labels"]["severity"], a["alert"]
        base, _, anchor = ann["runbook_url"].partition("#")
        assert base.endswith("docs/troubleshooting.md") and anchor in headings, (a["alert"], anchor)
        # The description names what is wrong: a namespace/object, or the release.
        assert "$labels.namespace" in ann["description"] or "nj-system/nj" in ann["description"], a["alert"]


def test_the_rules_and_the_dashboard_are_off_by_default_and_the_dashboard_is_labelled(helm: Path) -> None:
    kinds = {d["kind"] for d in render()}
    assert "PrometheusRule" not in kinds and "ConfigMap" not in kinds
    docs = render("--set=grafanaDashboard.enabled=true", "--set=grafanaDashboard.namespace=monitoring")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert '"uid": "nightjar-backups"' in cm["data"]["nightjar.json"]


def test_the_rules_and_the_dashboard_use_only_metrics_the_operator_defines(helm: Path) -> None:
    """Names and labels against the operator's registry; the integration tier checks the same
    against its real /metrics after real backups."""
    from nightjar import metrics

    collectors = [
        v
        for v in vars(metrics).values()
        if hasattr(v, "_labelnames") and hasattr(v, "_name") and str(v._name).startswith("nightjar_")
    ]
    by_name = {str(c._name): set(c._labelnames) for c in collectors}
    for name, labels in all_uses().items():
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        family = next((n for n in (name, base) if n in by_name), None)
        assert family is not None, f"{name} is not a metric of nightjar.metrics"
        extra = labels - by_name[family] - ({"le"} if name.endswith("_bucket") else set())
        assert not extra, f"{name} has no label(s) {sorted(extra)}"
