#!/usr/bin/env python3
"""Copy shared schema parts between CRDs so they have one source: a BackupSchedule's
spec.source and spec.storageRef are exactly a Backup's. `make crds` runs this; a unit test
fails when they drift."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

CRDS = Path(__file__).resolve().parent.parent / "crds"
SHARED = ("source", "storageRef")


def spec_props(doc: dict) -> dict:  # type: ignore[type-arg]
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def main() -> int:
    backup = yaml.safe_load((CRDS / "backups.nightjar.dev.yaml").read_text())
    path = CRDS / "backupschedules.nightjar.dev.yaml"
    text = path.read_text()
    schedule = yaml.safe_load(text)
    for key in SHARED:
        spec_props(schedule)[key] = spec_props(backup)[key]
    header = "# spec.source and spec.storageRef are copied from backups.nightjar.dev.yaml by `make crds`.\n"
    body = yaml.safe_dump(schedule, sort_keys=False, width=110, allow_unicode=True)
    path.write_text(header + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
