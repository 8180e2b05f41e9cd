"""Schedules that verify: a restore drill (Verification) of each backup ``spec.verify`` applies to.

The scheduler tick hands over the schedules' recently completed Backups that show no drill yet
(``status.verification``); for each one the schedule's ``verify`` applies to (its tier, or every
Nth slot: :func:`nightjar.domain.schedule.verify_applies`), a Verification named
``<backup>-verify`` is created on the schedule's scratch server. The name is deterministic, so a
restarted operator, or a second tick, never makes a second drill of one backup. Only backups
completed in the last ``RECENT`` are considered: turning ``verify`` on does not start a drill of
every old backup at once.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar.constants import (
    API_VERSION,
    GROUP,
    LABEL_BACKUP,
    LABEL_MANAGED_BY,
    LABEL_SCHEDULE,
    LABEL_TIER,
    MANAGED_BY,
    VERIFICATIONS,
)
from nightjar.domain.retention import parse_time
from nightjar.domain.schedule import verify_applies
from nightjar.reconcile.ports import KubeAPI

log = logging.getLogger("nightjar.schedule")

#: Completed backups older than this are never drilled because of a schedule.
RECENT = dt.timedelta(hours=48)
#: The annotation a scheduled Backup carries with its slot's time.
ANNOTATION_SLOT = f"{GROUP}/slot"


@dataclass(frozen=True)
class Candidate:
    """A schedule's Completed Backup without a drill yet."""

    namespace: str
    schedule: str
    name: str
    tier: str
    slot: dt.datetime | None


def candidate(backup: dict[str, Any], now: dt.datetime) -> Candidate | None:
    """The Backup as a drill candidate: scheduled, Completed recently, no drill recorded."""
    meta, st = backup["metadata"], backup.get("status") or {}
    labels = meta.get("labels") or {}
    if LABEL_SCHEDULE not in labels or st.get("phase") != "Completed" or st.get("verification"):
        return None
    try:
        done = parse_time(st.get("completedOn") or "")
    except ValueError:
        return None
    if now - done > RECENT or meta.get("deletionTimestamp"):
        return None
    raw = (meta.get("annotations") or {}).get(ANNOTATION_SLOT)
    try:
        slot = parse_time(raw) if raw else None
    except ValueError:
        slot = None
    return Candidate(
        meta["namespace"], labels[LABEL_SCHEDULE], meta["name"], labels.get(LABEL_TIER, ""), slot
    )


def verification_name(backup: str) -> str:
    return f"{backup}-verify"


def drill_body(schedule: dict[str, Any], c: Candidate) -> dict[str, Any]:
    verify = schedule["spec"]["verify"]
    spec: dict[str, Any] = {"backupName": c.name}
    if verify.get("scratch"):
        spec["scratch"] = verify["scratch"]
    return {
        "apiVersion": API_VERSION,
        "kind": "Verification",
        "metadata": {
            "name": verification_name(c.name),
            "namespace": c.namespace,
            "labels": {
                LABEL_SCHEDULE: schedule["metadata"]["name"],
                LABEL_BACKUP: c.name,
                LABEL_MANAGED_BY: MANAGED_BY,
            },
        },
        "spec": spec,
    }


def start_drills(kube: KubeAPI, schedule: dict[str, Any], candidates: list[Candidate]) -> list[str]:
    """Create the Verification of each candidate of ``schedule`` that its ``verify`` applies to;
    returns the ones created (``ns/name``). Never twice: the name is the Backup's."""
    verify = (schedule.get("spec") or {}).get("verify")
    created = []
    for c in candidates:
        if not verify_applies(verify, c.tier, c.slot):
            continue
        try:
            made = kube.create_object(VERIFICATIONS, c.namespace, drill_body(schedule, c))
        except ApiException as e:
            log.warning(
                "schedule %s/%s: creating the drill of %s: %s", c.namespace, c.schedule, c.name, e.reason
            )
            continue
        if made is not None:
            created.append(f"{c.namespace}/{verification_name(c.name)}")
            kube.event(
                schedule, "Normal", "DrillCreated", f"restore drill {verification_name(c.name)} of {c.name}"
            )
    return created
