"""Garbage collection, deciding: which Backups expired and may go now.

Split as Velero does: this sweep *decides* (expired, not pinned, not in flight, every location
reachable) and deletes the Backup object; the Backup's finalizer (:mod:`nightjar.reconcile.deletion`)
deletes the stored objects. One sweep over all Backups, a page at a time: never a timer per object.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar import metrics
from nightjar.constants import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_KEEP,
    BACKUPS,
    FINALIZER,
    LABEL_SCHEDULE,
    SCHEDULES,
    STORAGES,
)
from nightjar.domain.retention import format_time, parse_time
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.ports import KubeAPI, list_all
from nightjar.storage.objects import ObjectStore, S3Target

log = logging.getLogger("nightjar.gc")


@dataclass
class SweepReport:
    examined: int = 0
    deleted: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    finalized: list[str] = field(default_factory=list)


#: A Backup still being deleted after this long had its finalizer event lost or stuck.
STUCK_DELETION = dt.timedelta(minutes=5)


def gc_sweep(
    kube: KubeAPI,
    now: dt.datetime,
    finalize: Callable[[dict[str, Any]], bool] | None = None,
    open_store: Callable[[S3Target], ObjectStore] | None = None,
) -> SweepReport:
    """Delete every Backup whose ``nightjar.dev/expires-at`` has passed, unless pinned.

    In-flight Backups wait for their end. A Backup whose storage cannot be reached now is left for
    a later sweep (its finalizer could not delete the objects), so nothing is lost. A Backup whose
    deletion has hung on our finalizer for ``STUCK_DELETION`` is finished here by ``finalize``
    (the same deletion path), so no Backup stays Terminating forever.
    """
    report = SweepReport()
    reachable: dict[tuple[str, str], bool] = {}
    expired_by_schedule: dict[tuple[str, str], list[str]] = defaultdict(list)
    for b in list_all(kube, BACKUPS):
        report.examined += 1
        meta = b["metadata"]
        ann = meta.get("annotations") or {}
        if meta.get("deletionTimestamp"):
            since = parse_time(meta["deletionTimestamp"])
            stuck = now - since > STUCK_DELETION and FINALIZER in (meta.get("finalizers") or [])
            try:
                if stuck and finalize is not None and finalize(b):
                    report.finalized.append(f"{meta['namespace']}/{meta['name']}")
            except Exception:  # one stuck deletion never stops the sweep of the others
                log.exception("gc: finishing the deletion of %s/%s", meta["namespace"], meta["name"])
            continue
        if (ann.get(ANNOTATION_KEEP) or "").lower() == "true":
            continue
        try:
            expires = parse_time(ann[ANNOTATION_EXPIRES_AT])
        except (KeyError, ValueError):
            continue
        if expires > now or (b.get("status") or {}).get("phase") not in ("Completed", "Failed"):
            continue
        ns = meta["namespace"]
        # Every location must answer: deleting now would strand the objects of one that does not.
        names = [b["spec"]["storageRef"]["name"]] + [
            loc["storage"]
            for loc in (b.get("status") or {}).get("locations") or []
            if loc.get("role") == "Replica" and (loc.get("state") == "Replicated" or loc.get("attempts"))
        ]
        for name in names:
            if (ns, name) not in reachable:
                reachable[(ns, name)] = _storage_reachable(kube, ns, name, open_store)
        if not all(reachable[(ns, name)] for name in names):
            report.deferred.append(f"{ns}/{meta['name']}")
            metrics.gc_deferred(ns)
            continue
        try:
            if not kube.delete_object(BACKUPS, ns, meta["name"]):
                continue  # gone already
        except ApiException as e:
            log.warning("gc: deleting %s/%s failed: %s", ns, meta["name"], e.reason)
            continue
        metrics.gc_deleted(ns)
        kube.event(
            b, "Normal", "Expired", f"expired at {format_time(expires)}; deleting it and its stored objects"
        )
        sched = (meta.get("labels") or {}).get(LABEL_SCHEDULE)
        if sched:
            expired_by_schedule[(ns, sched)].append(meta["name"])
        log.info("gc: deleted expired backup %s/%s (expired %s)", ns, meta["name"], format_time(expires))
        report.deleted.append(f"{ns}/{meta['name']}")
    _tell_schedules(kube, expired_by_schedule)
    if report.deferred:
        log.warning("gc: %d expired backups wait for their storage to be reachable", len(report.deferred))
    return report


def _tell_schedules(kube: KubeAPI, expired: dict[tuple[str, str], list[str]]) -> None:
    """One Event per schedule per sweep on the Backups of it that expired: ``kubectl describe
    backupschedule`` shows its retention at work, and 5,000 expiries cost a few Events, not 5,000."""
    for (ns, name), backups in sorted(expired.items()):
        try:
            sched = kube.get(SCHEDULES, ns, name)
        except ApiException as e:
            log.warning("gc: reading schedule %s/%s: %s", ns, name, e.reason)
            continue
        if sched is None:
            continue
        shown = ", ".join(sorted(backups)[:10]) + (
            f" and {len(backups) - 10} more" if len(backups) > 10 else ""
        )
        kube.event(
            sched,
            "Normal",
            "BackupExpired",
            f"{len(backups)} backup{'' if len(backups) == 1 else 's'} expired and deleted with their stored "
            f"objects: {shown}",
        )


def _storage_reachable(
    kube: KubeAPI, ns: str, name: str, open_store: Callable[[S3Target], ObjectStore] | None
) -> bool:
    storage = kube.get(STORAGES, ns, name)
    if storage is None:
        return True  # nothing stored anywhere we could reach: the Backup can go
    # Missing Secret, network, refused: not reachable now, the next sweep tries again.
    return not storage_rec.unreachable(kube, ns, storage, open_store)
