"""The CRDs: one source for shared schema parts, a description on every field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

CRDS = Path(__file__).resolve().parents[2] / "crds"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((CRDS / f"{name}.nightjar.dev.yaml").read_text())
    return doc


def spec_props(doc: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]
    return props


def test_schedule_source_and_storage_ref_are_the_backups_own() -> None:
    backup, schedule = spec_props(load("backups")), spec_props(load("backupschedules"))
    assert schedule["source"] == backup["source"], "run `make crds`"
    assert schedule["storageRef"] == backup["storageRef"], "run `make crds`"


def _undocumented(schema: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, sub in (schema.get("properties") or {}).items():
        here = f"{path}.{name}"
        if name not in ("apiVersion", "kind", "metadata") and not sub.get("description"):
            missing.append(here)
        missing += _undocumented(sub, here)
    if "items" in schema:
        missing += _undocumented(schema["items"], path + "[]")
    return missing


@pytest.mark.parametrize("name", ["backups", "backupstorages", "backupschedules"])
def test_every_field_has_a_description(name: str) -> None:
    root = load(name)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _undocumented(root, name) == []


def test_the_chart_installs_exactly_the_crds_of_crds_dir() -> None:
    chart = CRDS.parent / "charts" / "nightjar" / "crds"
    ours = {p.name: p.read_bytes() for p in CRDS.glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in chart.glob("*.yaml")}
    assert sorted(copies) == sorted(ours), "charts/nightjar/crds drifted from crds/: run `make crds`"
    for name, data in ours.items():
        assert copies[name] == data, f"charts/nightjar/crds/{name} drifted from crds/: run `make crds`"
