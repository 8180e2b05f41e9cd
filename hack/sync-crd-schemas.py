#!/usr/bin/env python3
"""Copy shared schema parts between CRDs so they have one source: a BackupSchedule's
spec.source and spec.storageRef are exactly a Backup's, and a Restore's spec.target is a
Backup's spec.source (with its own description). `make crds` runs this; a unit test fails when
they drift. A file is rewritten only when its content changes.

It then copies crds/ into the Helm chart (charts/nightjar/crds/), byte for byte: the chart
installs exactly these CRDs, and a unit test fails when the copies drift."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

CRDS = Path(__file__).resolve().parent.parent / "crds"
CHART_CRDS = CRDS.parent / "charts" / "nightjar" / "crds"


def spec_props(doc: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]
    return props


#: Fields of a Backup's spec.source that mean nothing in a Restore's spec.target (how a backup is
#: taken, not where data lives): left out of the copy.
NOT_IN_TARGET = ("rowCounts",)


def sync(
    name: str, copies: dict[str, str], header: str, keep_description: bool, omit: tuple[str, ...] = ()
) -> bool:
    """Copy each Backup spec property ``copies[dst]`` to ``dst`` of the CRD ``name`` (without the
    sub-properties ``omit`` names); True when changed."""
    backup = spec_props(yaml.safe_load((CRDS / "backups.nightjar.dev.yaml").read_text()))
    path = CRDS / f"{name}.nightjar.dev.yaml"
    if not path.exists():
        return False
    text = path.read_text()
    doc = yaml.safe_load(text)
    for dst, src in copies.items():
        new = copy.deepcopy(backup[src])
        for field in omit:
            new.get("properties", {}).pop(field, None)
        if keep_description and "description" in spec_props(doc).get(dst, {}):
            new["description"] = spec_props(doc)[dst]["description"]
        spec_props(doc)[dst] = new
    out = header + yaml.safe_dump(doc, sort_keys=False, width=110, allow_unicode=True)
    if out == text:
        return False
    path.write_text(out)
    return True


def main() -> int:
    changed = [
        name
        for name, copies, header, keep, omit in (
            (
                "backupschedules",
                {"source": "source", "storageRef": "storageRef"},
                "# spec.source and spec.storageRef are copied from backups.nightjar.dev.yaml by `make crds`.\n",
                False,
                (),
            ),
            (
                "restores",
                {"target": "source"},
                "# spec.target is copied from a Backup's spec.source (backups.nightjar.dev.yaml) by "
                f"`make crds` (without {', '.join(NOT_IN_TARGET)}).\n",
                True,
                NOT_IN_TARGET,
            ),
        )
        if sync(name, copies, header, keep, omit)
    ]
    CHART_CRDS.mkdir(parents=True, exist_ok=True)
    sources = {p.name: p.read_bytes() for p in CRDS.glob("*.yaml")}
    for stale in CHART_CRDS.glob("*.yaml"):
        if stale.name not in sources:
            stale.unlink()
            changed.append(f"chart {stale.name} (removed)")
    for fname, data in sorted(sources.items()):
        dst = CHART_CRDS / fname
        if not dst.exists() or dst.read_bytes() != data:
            dst.write_bytes(data)
            changed.append(f"chart {fname}")
    print(f"updated: {', '.join(changed)}" if changed else "CRDs in sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
