"""The one place a Backup's status, its Events and its metrics change.

Every Backup reconciler (taken, uploaded, synced; replication writes its locations through the
same :class:`~nightjar.reconcile.status.StatusWriter`) writes through :class:`BackupStatus`:
a terminal phase is never changed, ``Queued`` is only ever the first phase, an Event is posted
only when the write changed something worth saying, and a transition is counted in the metrics
once, after the conditional write succeeded.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar import metrics
from nightjar.constants import BACKUPS, LABEL_FINISHED, STORAGES
from nightjar.reconcile import replicas, status
from nightjar.reconcile.ports import Clock, KubeAPI
from nightjar.reconcile.replication import Replicator

log = logging.getLogger("nightjar.backup")

Event = tuple[str, str, str]


class BackupStatus:
    def __init__(self, kube: KubeAPI, clock: Clock, replicator: Replicator) -> None:
        self.kube = kube
        self.clock = clock
        self.replicator = replicator
        self.writer = status.StatusWriter(kube, BACKUPS, clock)

    def apply(self, backup: dict[str, Any], change: status.Update, event: Event | None = None) -> bool:
        """Write ``change`` unless the Backup is terminal (then nothing changes). ``event`` is
        posted only when the write set a new phase or a new attempt, or set no phase at all (the
        caller decided). Returns False when nothing was written on purpose (terminal, or gone);
        raises StatusConflict when the writes kept conflicting, so a write is never lost."""
        done = self.writer.apply(backup, change)
        if done is None:
            return False
        fresh, old = done.before, done.old
        new_attempt = "attempts" in done.patch and done.patch["attempts"] != old.get("attempts")
        if event is not None and (not done.new_phase or done.transition or new_attempt):
            self.kube.event(fresh, *event)
        if done.transition:
            metrics.backup_transition(fresh, done.old_phase or None, done.new_phase, done.patch)
        if done.new_phase in status.TERMINAL:
            self.mark_finished(fresh)
        return True

    def queued(self, backup: dict[str, Any], fields: dict[str, Any], event: Event) -> None:
        self.apply(backup, status.update(phase=status.Phase.QUEUED.value, attempts=0, **fields), event)

    def fail(self, backup: dict[str, Any], message: str, attempts: int, reason: str) -> None:
        self.apply(backup, status.failed(reason, message, attempts=attempts), ("Warning", "Failed", message))

    def complete(self, backup: dict[str, Any], change: status.Update, event: Event) -> bool:
        """Complete the Backup: its locations (the primary verified, each replica Pending) and
        the Replicated condition join the status, and the copies start. Returns whether this
        write completed it."""
        change = self.with_locations(backup, change)
        if not self.apply(backup, change, event):
            return False
        self.replicate(backup)
        return True

    def mark_finished(self, backup: dict[str, Any]) -> None:
        """Label a terminal Backup so the kopf layer stops watching it (see LABEL_FINISHED)."""
        meta = backup["metadata"]
        if (meta.get("labels") or {}).get(LABEL_FINISHED) == "true" or meta.get("deletionTimestamp"):
            return
        try:
            self.kube.patch_meta(
                BACKUPS, meta["namespace"], meta["name"], {"labels": {LABEL_FINISHED: "true"}}
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def with_locations(self, backup: dict[str, Any], change: status.Update) -> status.Update:
        """A Completed status gains its locations: the primary (verified) and each replica
        (Pending), the n/m summary, the Replicated condition and the primary's key prefix."""
        ns = backup["metadata"]["namespace"]
        storage = self.kube.get(STORAGES, ns, backup["spec"]["storageRef"]["name"])
        if storage is None:
            return change
        checks = replicas.check_replicas(self.kube, self.replicator.policy, ns, storage)
        locs = replicas.initial_locations(storage, checks, self.clock.now())
        fields = change.fields
        where = {**fields.get("storage", {}), "prefix": replicas.primary_prefix(fields)}
        placed = replicas.location_update(locs)
        return status.Update(
            {**fields, "storage": where, **placed.fields}, change.add + placed.add, change.drop
        )

    def replicate(self, backup: dict[str, Any]) -> None:
        """Start the copies of a just-Completed Backup (the sweep retries what cannot start)."""
        fresh = self.kube.get(BACKUPS, backup["metadata"]["namespace"], backup["metadata"]["name"])
        if fresh is None:
            return
        try:
            self.replicator.start(fresh)
        except Exception:
            log.exception(
                "starting the replication of %s/%s", fresh["metadata"]["namespace"], fresh["metadata"]["name"]
            )
