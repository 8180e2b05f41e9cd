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


def _schema(name: str) -> dict[str, Any]:
    root: dict[str, Any] = load(name)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root


def _columns(name: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in load(name)["spec"]["versions"][0]["additionalPrinterColumns"]}


def test_verification_is_a_namespaced_nightjar_kind_with_short_names() -> None:
    doc = load("verifications")
    assert doc["spec"]["group"] == "nightjar.dev" and doc["spec"]["scope"] == "Namespaced"
    names = doc["spec"]["names"]
    assert names["kind"] == "Verification" and names["plural"] == "verifications"
    assert set(names["shortNames"]) == {"nver", "verif"} and names["categories"] == ["nightjar"]
    (version,) = doc["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    others = {n: load(n)["spec"]["names"].get("shortNames", []) for n in ("backups", "restores")}
    assert not set(names["shortNames"]) & {s for v in others.values() for s in v}


def test_verification_spec_names_a_backup_and_a_scratch_secret_and_is_immutable() -> None:
    spec = _schema("verifications")["properties"]["spec"]
    assert spec["required"] == ["backupName"]
    assert spec["properties"]["backupName"]["minLength"] == 1
    secret = spec["properties"]["scratch"]["properties"]["database"]["properties"]["secretRef"]
    # the shape of a Backup's database Secret reference
    backup_db = spec_props(load("backups"))["source"]["properties"]["database"]["properties"]["secretRef"]
    assert secret == backup_db
    rules = {r["rule"]: r["message"] for r in spec["x-kubernetes-validations"]}
    assert rules["self == oldSelf"].startswith("spec is immutable")


def test_verification_status_has_the_phases_measurements_and_columns() -> None:
    status = _schema("verifications")["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Queued", "Running", "Passed", "Failed"]
    for field in ("progress", "restoreSeconds", "tablesChecked", "rowsChecked", "filesChecked", "message"):
        assert field in status, field
    for field in ("conditions", "startedAt", "finishedAt"):
        assert field in status, field
    assert status["restoreSeconds"]["type"] == "number"
    cols = _columns("verifications")
    assert cols["Status"]["jsonPath"] == ".status.phase"
    assert cols["Restore(s)"]["jsonPath"] == ".status.restoreSeconds"
    assert {"Backup", "Progress", "Tables", "Rows", "Files", "Age"} <= set(cols)


def test_backup_shows_its_last_verification_and_may_record_row_counts() -> None:
    backup = _schema("backups")
    assert (
        backup["properties"]["spec"]["properties"]["source"]["properties"]["rowCounts"]["type"] == "boolean"
    )
    last = backup["properties"]["status"]["properties"]["verification"]["properties"]
    assert set(last) == {"result", "time", "restoreSeconds", "name"}
    assert last["result"]["enum"] == ["Passed", "Failed"]
    assert _columns("backups")["Verified"]["jsonPath"] == ".status.verification.result"
    # a Restore's target is where data goes: how a backup is taken has no meaning there
    target = spec_props(load("restores"))["target"]["properties"]
    assert "rowCounts" not in target and "database" in target


def test_schedule_verify_chooses_tiers_or_every_nth_and_a_scratch_server() -> None:
    verify = spec_props(load("backupschedules"))["verify"]
    props = verify["properties"]
    assert props["tiers"]["items"]["enum"] == ["Nightly", "Weekly", "Monthly"]
    assert props["everyNth"]["minimum"] == 1
    assert props["scratch"]["properties"]["database"]["required"] == ["secretRef"]
    (rule,) = verify["x-kubernetes-validations"]
    assert rule["rule"] == "has(self.tiers) || has(self.everyNth)"


@pytest.mark.parametrize("name", ["verifications", "restores"])
def test_new_kinds_have_a_description_on_every_field(name: str) -> None:
    assert _undocumented(_schema(name), name) == []
