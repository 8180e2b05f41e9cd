"""BackupSchedules and garbage collection: one periodic sweep each, never a timer per object.

The scheduler lists the schedules and their Backups (label ``nightjar.dev/schedule``, paged)
once per tick and lets :func:`nightjar.domain.schedule.decide` say what each needs. Backups get
deterministic names (``<schedule>-<yyyymmdd>``), so a restarted operator, or a second replica,
can never take the same night twice: the API server refuses the second create.

Garbage collection is split as Velero does: this sweep *decides* (expired, not pinned, not in
flight, storage reachable) and deletes the Backup; the Backup's finalizer deletes the stored
objects.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar import metrics
from nightjar.constants import (
    ANNOTATION_EXPIRES_AT,
    API_VERSION,
    BACKUPS,
    LABEL_MANAGED_BY,
    LABEL_SCHEDULE,
    LABEL_TIER,
    MANAGED_BY,
    SCHEDULES,
)
from nightjar.domain import schedule as sch
from nightjar.domain.retention import format_time, parse_time
from nightjar.reconcile import drills
from nightjar.reconcile.ports import Clock, KubeAPI, SystemClock, list_all
from nightjar.reconcile.status import StatusWriter, condition, conditions
from nightjar.storage import layout

log = logging.getLogger("nightjar.schedule")


@dataclass
class BackupInfo:
    name: str
    tier: str
    phase: str
    created: str


@dataclass
class TickReport:
    schedules: int = 0
    created: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    drills: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, kube: KubeAPI, clock: Clock | None = None) -> None:
        self.kube = kube
        self.writer = StatusWriter(kube, SCHEDULES, clock or SystemClock())

    # --- the scheduler tick ----------------------------------------------------------------

    def tick(self, now: dt.datetime) -> TickReport:
        """One pass over all Backups (paged) and all schedules: O(schedules + backups) a tick."""
        by_schedule: dict[tuple[str, str], list[BackupInfo]] = defaultdict(list)
        busy: set[tuple[str, str]] = set()
        undrilled: dict[tuple[str, str], list[drills.Candidate]] = defaultdict(list)
        for b in list_all(self.kube, BACKUPS):
            meta = b["metadata"]
            labels = meta.get("labels") or {}
            st = b.get("status") or {}
            source = b["spec"].get("source")  # none on an Uploaded Backup: it never runs a Job
            if source is not None and st.get("phase") in (None, "Queued", "Running"):
                busy.add((meta["namespace"], st.get("sourceId") or layout.source_id(source)))
            metrics.completed_backup_seen(b)  # rebuilds the "last completed" gauges after a restart
            metrics.verified_backup_seen(b)
            if (c := drills.candidate(b, now)) is not None:
                undrilled[(c.namespace, c.schedule)].append(c)
            if LABEL_SCHEDULE in labels:
                by_schedule[(meta["namespace"], labels[LABEL_SCHEDULE])].append(
                    BackupInfo(
                        name=meta["name"],
                        tier=labels.get(LABEL_TIER, ""),
                        phase=st.get("phase") or "Queued",
                        created=meta.get("creationTimestamp", ""),
                    )
                )
        report = TickReport()
        seen: list[tuple[str, str, str, bool]] = []
        for s in list_all(self.kube, SCHEDULES):
            report.schedules += 1
            key = (s["metadata"]["namespace"], s["metadata"]["name"])
            seen.append((*key, s["metadata"].get("creationTimestamp", ""), bool(s["spec"].get("suspend"))))
            try:
                self.reconcile(s, by_schedule.get(key, []), now, report, busy=busy)
                if key in undrilled:
                    report.drills += drills.start_drills(self.kube, s, undrilled[key])
            except Exception:
                log.exception("schedule %s/%s", *key)
        metrics.schedules_seen(seen)
        return report

    def reconcile_one(self, schedule: dict[str, Any], now: dt.datetime) -> None:
        """One schedule's status right away (on create/update/resume). Only the tick creates
        Backups: it knows which sources are busy without one list per schedule."""
        meta = schedule["metadata"]
        sel = f"{LABEL_SCHEDULE}={meta['name']}"
        items = list_all(self.kube, BACKUPS, sel, namespaces=(meta["namespace"],))
        mine = [
            BackupInfo(
                b["metadata"]["name"],
                (b["metadata"].get("labels") or {}).get(LABEL_TIER, ""),
                (b.get("status") or {}).get("phase") or "Queued",
                b["metadata"].get("creationTimestamp", ""),
            )
            for b in items
        ]
        self.reconcile(schedule, mine, now, TickReport(), busy=None)

    def reconcile(
        self,
        s: dict[str, Any],
        mine: list[BackupInfo],
        now: dt.datetime,
        report: TickReport,
        busy: set[tuple[str, str]] | None,
    ) -> None:
        """``busy``: (namespace, sourceId) of in-flight Backups; None means do not create now."""
        meta, spec = s["metadata"], s["spec"]
        ns, name = meta["namespace"], meta["name"]
        old = s.get("status") or {}
        status: dict[str, Any] = {"observedGeneration": meta.get("generation", 0)}
        # Skipped and missed slots are told (Event, metric, report) only once the status that
        # records them is written: a failed or lost write is decided again on the next tick.
        told: list[Callable[[], None]] = []
        try:
            plan = sch.Plan.from_spec(ns, name, spec)
        except ValueError as e:
            invalid = str(e)
            status["conditions"] = [
                *conditions(old, [condition("Ready", False, "InvalidSpec", invalid)], now)
            ]
            if _ready_cond(old) != ("False", "InvalidSpec", invalid):
                told.append(partial(self.kube.event, s, "Warning", "InvalidSpec", invalid))
            self._write(s, old, status, told)
            return
        created = parse_time(meta["creationTimestamp"])
        decision = sch.decide(plan, now, created, {b.name for b in mine})
        status.update(
            window=plan.window_text,
            offsetSeconds=int(plan.offset.total_seconds()),
            nextBackupTime=format_time(decision.next.time),
            nextTier=decision.next.tier,
        )
        ready_msg = f"next backup {format_time(decision.next.time)} ({decision.next.tier})"
        slot = decision.slot
        if spec.get("suspend"):
            ready_msg = "suspended: no backups are taken"
        elif decision.action == "create" and slot is not None and busy is not None:
            skipped = (old.get("lastSkipped") or {}).get("time") == format_time(slot.time)
            if not skipped:
                code, reason = self._skip_reason(ns, spec)
                if reason:
                    t = format_time(slot.time)
                    status["lastSkipped"] = {"time": t, "reason": reason}
                    told += [
                        partial(self.kube.event, s, "Normal", "Skipped", f"slot {t} skipped: {reason}"),
                        partial(metrics.schedule_slot_skipped, ns, name, code),
                        partial(report.skipped.append, f"{ns}/{slot.name}"),
                    ]
                elif (ns, sid := layout.source_id(spec["source"])) not in busy and self._create_backup(
                    s, plan, slot
                ):
                    busy.add((ns, sid))  # never two backups of the same source at once
                    report.created.append(f"{ns}/{slot.name}")
                    mine = [*mine, BackupInfo(slot.name, slot.tier, "Queued", format_time(now))]
        elif decision.action == "missed" and slot is not None:
            t = format_time(slot.time)
            last = max((b.name for b in mine), default="")
            already = t in (
                (old.get("lastMissed") or {}).get("time"),
                (old.get("lastSkipped") or {}).get("time"),
            )
            if not already and last < slot.name:
                reason = "the window closed before the backup could start (was the operator down?)"
                status["lastMissed"] = {"time": t, "reason": reason}
                told += [
                    partial(self.kube.event, s, "Warning", "Missed", f"slot {t} missed: {reason}"),
                    partial(metrics.schedule_slot_missed, ns, name),
                    partial(report.missed.append, f"{ns}/{slot.name}"),
                ]
        if mine:
            newest = max(mine, key=lambda b: (b.created, b.name))
            status["lastBackup"], status["lastBackupStatus"] = newest.name, newest.phase
            done = [b for b in mine if b.phase == "Completed"]
            if done:
                status["lastSuccessfulBackup"] = max(done, key=lambda b: (b.created, b.name)).name
        counts = {"nightly": 0, "weekly": 0, "monthly": 0}
        for b in mine:
            if b.tier.lower() in counts:
                counts[b.tier.lower()] += 1
        status["backups"] = counts
        status["conditions"] = conditions(old, [condition("Ready", True, "Scheduled", ready_msg)], now)
        if _ready_cond(old)[:2] == ("False", "InvalidSpec"):
            told.append(partial(self.kube.event, s, "Normal", "Scheduled", f"spec valid again: {ready_msg}"))
        self._write(s, old, status, told)

    def _write(
        self,
        s: dict[str, Any],
        old: dict[str, Any],
        status: dict[str, Any],
        told: list[Callable[[], None]] | None = None,
    ) -> None:
        """Write only what changed: 1,000 schedules must not mean 1,000 writes a tick.

        With something to tell, the write is conditional on the object as this tick read it: of
        two writers deciding the same slot (the tick and a create/update handler), one wins and
        only it tells, so an Event or a count is never doubled.
        """
        if not {k: v for k, v in status.items() if old.get(k) != v}:
            return
        seen = s["metadata"].get("resourceVersion")

        def decide(fresh: dict[str, Any]) -> dict[str, Any] | None:
            if told and fresh["metadata"].get("resourceVersion") != seen:
                log.info("schedule %s/%s changed meanwhile; the next tick decides again", *_ident(s))
                return None
            cur = fresh.get("status") or {}
            return {k: v for k, v in status.items() if cur.get(k) != v} or None

        if self.writer.write(s, decide) is None:
            return
        for tell in told or []:
            tell()

    def _skip_reason(self, ns: str, spec: dict[str, Any]) -> tuple[str, str]:
        """("", "") to take the slot, else (a reason code for metrics, a message naming why)."""
        app = spec["source"].get("app")
        only = spec.get("onlyWhenAppRunning")
        if not app or only is False:
            return "", ""
        kind, name = app.get("kind") or "Deployment", app["name"]
        obj = self.kube.read_workload(ns, app)
        if obj is None:
            return "AppMissing", f"the app's {kind} {name} does not exist"
        ready = int(obj.status.ready_replicas or 0) if obj.status else 0
        if ready > 0:
            return "", ""
        return "AppNotRunning", f"the app is not running ({kind} {name} has no ready replica)"

    def _create_backup(self, s: dict[str, Any], plan: sch.Plan, slot: sch.Slot) -> bool:
        meta, spec = s["metadata"], s["spec"]
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": "Backup",
            "metadata": {
                "name": slot.name,
                "namespace": meta["namespace"],
                # No owner reference: deleting a schedule keeps its Backups, as Mendix does.
                "labels": {LABEL_SCHEDULE: meta["name"], LABEL_TIER: slot.tier, LABEL_MANAGED_BY: MANAGED_BY},
                "annotations": {
                    ANNOTATION_EXPIRES_AT: format_time(slot.expires),
                    drills.ANNOTATION_SLOT: format_time(slot.time),
                },
            },
            "spec": {
                "storageRef": spec["storageRef"],
                # A backup its schedule will drill records its exact row counts for the drill.
                "source": {**spec["source"], "rowCounts": True}
                if sch.verify_applies(spec.get("verify"), slot.tier, slot.time)
                else spec["source"],
                "type": slot.tier,
                "contents": spec.get("contents") or "Full",
            },
        }
        if spec.get("comment"):
            body["spec"]["comment"] = spec["comment"]
        try:
            if self.kube.create_object(BACKUPS, meta["namespace"], body) is None:
                return False  # already taken (a restart, or another replica): never twice
        except ApiException as e:
            msg = f"creating Backup {slot.name} failed: {e.reason}"
            self.kube.event(s, "Warning", "CreateFailed", msg)
            raise
        log.info(
            "schedule %s/%s: created %s (%s, expires %s)",
            meta["namespace"],
            meta["name"],
            slot.name,
            slot.tier,
            format_time(slot.expires),
        )
        self.kube.event(
            s,
            "Normal",
            "BackupCreated",
            f"{slot.tier} backup {slot.name}, expires {format_time(slot.expires)}",
        )
        return True


def _ident(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def _ready_cond(old: dict[str, Any]) -> tuple[str, str, str]:
    """(status, reason, message) of the Ready condition in ``old`` status, or empty strings."""
    c: dict[str, Any] = next((c for c in old.get("conditions") or [] if c.get("type") == "Ready"), {})
    return str(c.get("status") or ""), str(c.get("reason") or ""), str(c.get("message") or "")
