"""Backup: the entry points the kopf layer calls, each handed to the module of its concern.

- taken backups (a Job): :mod:`nightjar.reconcile.backup_taken`, planned by
  :mod:`~nightjar.reconcile.backup_plan`;
- uploaded and synced backups (the snapshot is already in the bucket):
  :mod:`nightjar.reconcile.adoption`;
- deletion (doing): :mod:`nightjar.reconcile.deletion`; expiry (deciding): :mod:`nightjar.reconcile.gc`;
- status, Events and metrics, written one way: :mod:`nightjar.reconcile.backup_status`.

The clock, the Kubernetes client and the object store are injected (typed protocols), so the
unit tests drive every phase transition with the one fake of ``tests/fakes.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

from nightjar.config import OperatorConfig
from nightjar.constants import ANNOTATION_EXPIRES_AT, ANNOTATION_SYNCED_FROM, BACKUPS, UPLOADED
from nightjar.domain import residency
from nightjar.domain.retention import default_expiry, format_time, parse_time
from nightjar.reconcile import status
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.adoption import Adoption
from nightjar.reconcile.backup_status import BackupStatus
from nightjar.reconcile.backup_taken import TakenBackups
from nightjar.reconcile.deletion import Deletion
from nightjar.reconcile.ports import Clock, KubeAPI, SystemClock
from nightjar.reconcile.replication import Replicator
from nightjar.storage.objects import ObjectStore, S3Target


class BackupReconciler:
    def __init__(
        self,
        kube: KubeAPI,
        config: OperatorConfig,
        replicator: Replicator | None = None,
        clock: Clock | None = None,
        open_store: Callable[[S3Target], ObjectStore] = storage_rec.store_of,
    ) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock or SystemClock()
        self.replicator = replicator or Replicator(
            kube, config, residency.load(config.residency_policy_file), self.clock, open_store
        )
        policy = self.replicator.policy
        self.state = BackupStatus(kube, self.clock, self.replicator)
        self.taken = TakenBackups(kube, config, self.clock, self.state, policy, open_store)
        self.adoption = Adoption(kube, config, self.clock, self.state, policy, open_store)
        self.deletion = Deletion(kube, self.clock, open_store)

    def reconcile(self, backup: dict[str, Any]) -> None:
        """Drive one Backup one step further; idempotent. Raises Retry to be called again later."""
        if status.is_terminal(backup):
            self.state.mark_finished(backup)
            return
        if ANNOTATION_SYNCED_FROM in (backup["metadata"].get("annotations") or {}):
            self.adoption.reconcile_synced(backup)
            return
        backup = self.ensure_expiry(backup)
        if (backup.get("spec") or {}).get("type") == UPLOADED:
            self.adoption.reconcile_uploaded(backup)
        else:
            self.taken.reconcile(backup)

    def ensure_expiry(self, backup: dict[str, Any]) -> dict[str, Any]:
        """The Backup carries ``nightjar.dev/expires-at`` (its type's default retention unless set)."""
        meta = backup["metadata"]
        if ANNOTATION_EXPIRES_AT in (meta.get("annotations") or {}):
            return backup
        created = parse_time(meta["creationTimestamp"])
        btype = backup["spec"].get("type") or "OnDemand"
        expires = format_time(default_expiry(created, btype, self.config.default_retention))
        return self.kube.patch_meta(
            BACKUPS, meta["namespace"], meta["name"], {"annotations": {ANNOTATION_EXPIRES_AT: expires}}
        )

    def sync_from_job(self, backup: dict[str, Any], job: dict[str, Any]) -> None:
        self.taken.sync_from_job(backup, job)

    def retry_sweep(self, backups: Iterable[dict[str, Any]]) -> list[str]:
        return self.taken.retry_sweep(backups)

    def delete_stored(self, backup: dict[str, Any]) -> str:
        return self.deletion.delete_stored(backup)

    def finish_deletion(self, backup: dict[str, Any], give_up_after: dt.timedelta | None = None) -> bool:
        return self.deletion.finish_deletion(backup, give_up_after)
