"""Storage is the source of truth: a BackupStorage's bucket is listed, and what it holds decides.

For each snapshot of the namespace (one Backup's keys: every attempt, and a tombstone if any):

* a live Backup stands for it (by the uid in its keys): nothing to do, garbage collection and
  deletion go through that Backup;
* its manifest's expiry has passed: it is deleted, keeping content another snapshot of the
  source still lists, and leaving Object-Locked objects to their lock (the *orphan sweep*);
* no manifest (an attempt that never finished), and its newest object is older than the grace
  period: the leftovers are deleted;
* otherwise, unless a tombstone says its Backup was deleted on purpose, the Backup is re-created
  from the manifest's record (spec, labels, expiry), labelled ``nightjar.dev/synced=true`` and
  annotated with the manifest key; the Backup reconciler verifies the snapshot and completes it
  without a Job (``BackupReconciler.reconcile_synced``).

A storage that is another's replica is swept, never synced (its snapshots are the primary's).
The listing is one paged pass; memory holds one Backup's keys at a time and the namespace's
Backup uids. Keys that are not Nightjar snapshots and manifests that do not parse are skipped
with a Warning Event naming the key: never a crash, never a deletion.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar.config import OperatorConfig
from nightjar.constants import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_SYNCED_FROM,
    API_VERSION,
    BACKUPS,
    LABEL_SCHEDULE,
    LABEL_SYNCED,
    LABEL_TIER,
    STORAGES,
    UPLOADED_SOURCE,
)
from nightjar.domain.retention import parse_time
from nightjar.kube import SecretMissing
from nightjar.reconcile import preflight
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.ports import KubeAPI
from nightjar.reconcile.snapshots import delete_snapshot, snapshot_uid
from nightjar.reconcile.status import StatusWriter
from nightjar.reconcile.sync_plan import (
    Action,
    Snapshot,
    Stray,
    SyncReport,
    decide,
    is_replica,
    snapshots,
)
from nightjar.storage import layout
from nightjar.storage.crypto import KeyRing
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import Manifest, PublicManifest
from nightjar.storage.objects import ObjectStore, S3Target, StorageError

log = logging.getLogger("nightjar.sync")

#: Warning Events per sync for keys that are not snapshots (the rest are counted).
MAX_WARNINGS = 5


class StorageSync:
    """Syncs one BackupStorage with its bucket; writes only ``status.sync`` and Events."""

    def __init__(
        self,
        kube: KubeAPI,
        config: OperatorConfig,
        open_store: Callable[[S3Target], ObjectStore] = storage_rec.store_of,
    ) -> None:
        self.kube = kube
        self.config = config
        self.open_store = open_store
        self.writer = StatusWriter(kube, STORAGES)
        #: The key ring of the storage being synced, once read in this pass (a 1-tuple: None is a
        #: storage without encryption).
        self._keys: tuple[KeyRing | None] | None = None

    def due(self, storage: dict[str, Any], now: dt.datetime) -> bool:
        last = ((storage.get("status") or {}).get("sync") or {}).get("lastSyncTime")
        try:
            return not last or now - parse_time(last) >= dt.timedelta(
                seconds=self.config.sync_interval_seconds
            )
        except ValueError:
            return True

    def sweep(self, storages: Iterable[dict[str, Any]], now: dt.datetime) -> list[SyncReport]:
        """Every storage whose sync is due (the periodic path)."""
        reports = []
        for storage in storages:
            if self.due(storage, now):
                reports.append(self.run(storage, now))
        return reports

    def run(self, storage: dict[str, Any], now: dt.datetime) -> SyncReport:
        """Sync one storage; never raises (what failed is in the report and the status)."""
        meta = storage["metadata"]
        ns, name = meta["namespace"], meta["name"]
        report = SyncReport()
        try:
            self._run(storage, now, report)
        except (StorageError, SecretMissing, preflight.Missing) as e:
            report.error = f"sync failed: {e}"
        except Exception as e:
            log.exception("sync of BackupStorage %s/%s failed", ns, name)
            report.error = f"sync failed: {type(e).__name__}: {e}"
        if report.error:
            log.warning("BackupStorage %s/%s: %s", ns, name, report.error)
        elif report.created or report.expired_deleted or report.leftovers_deleted:
            log.info("BackupStorage %s/%s: %s", ns, name, report.status(now)["message"])
        try:
            self.writer.write(storage, lambda _: {"sync": report.status(now)})
        except Exception as e:
            log.warning("BackupStorage %s/%s: writing the sync status: %s", ns, name, e)
        return report

    def _run(self, storage: dict[str, Any], now: dt.datetime, report: SyncReport) -> None:
        self._keys = None
        meta, spec = storage["metadata"], storage["spec"]
        ns = meta["namespace"]
        opts = spec.get("sync") or {}
        storages = self.kube.list_objects(STORAGES, ns)
        sync = bool(opts.get("enabled", True)) and not is_replica(storage, storages)
        target = storage_rec.target_for(self.kube, ns, spec)
        store = self.open_store(target)
        # The Backups first, the bucket second: a Backup deleted in between still counts as live
        # (its deletion is under way), so a stale list errs towards not re-creating.
        backups = self.kube.list_objects(BACKUPS, ns)
        live = {snapshot_uid(b) for b in backups}
        names = {b["metadata"]["name"] for b in backups}
        grace = dt.timedelta(seconds=self.config.orphan_grace_seconds)
        scopes = [(ns, True)]
        from_ns = opts.get("fromNamespace")
        if sync and from_ns and from_ns != ns:
            # Re-created here, swept by its own namespace; never one a Backup there stands for.
            try:
                live |= {snapshot_uid(b) for b in self.kube.list_objects(BACKUPS, from_ns)}
                scopes.append((from_ns, False))
            except ApiException as e:
                report.skipped += 1
                self.kube.event(
                    storage,
                    "Warning",
                    "CannotRecreate",
                    f"spec.sync.fromNamespace {from_ns}: cannot tell which of its snapshots its own "
                    f"Backups stand for ({e.reason}); none adopted",
                )
        warned = 0
        for scope_ns, own in scopes:
            for item in snapshots(
                store.list(layout.namespace_prefix(target.prefix, scope_ns)), target.prefix
            ):
                if isinstance(item, Stray):
                    report.skipped += 1
                    if warned < MAX_WARNINGS:
                        warned += 1
                        self.kube.event(
                            storage, "Warning", "NotASnapshot", f"{item.key} is not a Nightjar snapshot key"
                        )
                    continue
                if item.where.source == UPLOADED_SOURCE:
                    continue  # an upload becomes a Backup only when someone creates one for it
                report.snapshots += 1
                if item.uid in live:
                    continue
                try:
                    self._one(storage, store, target.prefix, item, names, now, grace, sync, own, report)
                except IntegrityError as e:  # one snapshot's problem: the others go on
                    report.skipped += 1
                    self.kube.event(
                        storage, "Warning", "BadManifest", f"skipped {item.where.backup_prefix}: {e}"
                    )

    def _one(
        self,
        storage: dict[str, Any],
        store: ObjectStore,
        prefix: str,
        snap: Snapshot,
        names: set[str],
        now: dt.datetime,
        grace: dt.timedelta,
        sync: bool,
        own: bool,
        report: SyncReport,
    ) -> None:
        expires: dt.datetime | None = None
        raw = b""
        if snap.manifests:
            try:
                raw = store.read(snap.manifest)
                expires = parse_time(PublicManifest.parse(raw, snap.manifest).expires_on)
            except (IntegrityError, ValueError) as e:
                report.skipped += 1
                self.kube.event(storage, "Warning", "BadManifest", f"skipped {snap.manifest}: {e}")
                return
        action = decide(snap, False, expires, now, grace, sync)
        if action in (Action.DELETE_EXPIRED, Action.DELETE_LEFTOVERS) and not own:
            return  # another namespace's snapshots are its own storage's to sweep
        if action in (Action.DELETE_EXPIRED, Action.DELETE_LEFTOVERS):
            deleted, _, locked = delete_snapshot(
                store, snap.where.backup_prefix, snap.where.source_prefix, prefix
            )
            what = "expired snapshot" if action is Action.DELETE_EXPIRED else "leftovers of an attempt"
            if action is Action.DELETE_EXPIRED:
                report.expired_deleted += 1
            else:
                report.leftovers_deleted += 1
            self.kube.event(
                storage,
                "Normal",
                "OrphanDeleted",
                f"deleted the {what} under {snap.where.backup_prefix} that no Backup stands for "
                f"({deleted} object versions)" + (f"; {len(locked)} locked objects stay" if locked else ""),
            )
            return
        if action is Action.RECREATE:
            self._recreate(storage, store, snap, raw, names, report)

    def _recreate(
        self,
        storage: dict[str, Any],
        store: ObjectStore,
        snap: Snapshot,
        raw: bytes,
        names: set[str],
        report: SyncReport,
    ) -> None:
        meta = storage["metadata"]
        ns = meta["namespace"]
        if report.key_problem:
            report.skipped += 1
            return
        if self._keys is None:  # read once per pass, and only when a snapshot needs it
            try:
                self._keys = (preflight.keyring(self.kube, ns, storage["spec"]),)
            except preflight.Missing as e:
                report.key_problem = str(e)
                report.skipped += 1
                self.kube.event(
                    storage,
                    "Warning",
                    "CannotRecreate",
                    f"snapshots no Backup stands for are not re-created while the storage's {e} "
                    "(the next sync tries again)",
                )
                return
        try:
            manifest = Manifest.parse(raw, self._keys[0], snap.manifest)
        except IntegrityError as e:
            report.skipped += 1
            self.kube.event(storage, "Warning", "BadManifest", f"skipped {snap.manifest}: {e}")
            return
        record = manifest.backup or {}
        spec = record.get("spec")
        if not isinstance(spec, dict) or not spec.get("source"):
            report.skipped += 1
            self.kube.event(
                storage,
                "Warning",
                "CannotRecreate",
                f"{snap.manifest} was written before Nightjar kept the Backup's spec in the manifest: "
                "restore it with nightjar download/upload",
            )
            return
        if record.get("namespace") != snap.where.namespace or record.get("uid") != snap.uid:
            # The keys say one namespace, the manifest another: not this storage's to serve.
            report.skipped += 1
            self.kube.event(
                storage,
                "Warning",
                "NotThisNamespace",
                f"skipped {snap.manifest}: its manifest names Backup {record.get('namespace')}/"
                f"{record.get('name')}, not a snapshot of namespace {snap.where.namespace}",
            )
            return
        name = str(record.get("name") or f"synced-{snap.uid[:8]}")
        if name in names:
            name = f"{name[:53]}-{snap.uid[:8]}"
        if name in names:
            return
        labels = {k: v for k, v in (record.get("labels") or {}).items() if k in (LABEL_SCHEDULE, LABEL_TIER)}
        body = {
            "apiVersion": API_VERSION,
            "kind": "Backup",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {**labels, LABEL_SYNCED: "true"},
                "annotations": {
                    ANNOTATION_EXPIRES_AT: manifest.expires_on,
                    ANNOTATION_SYNCED_FROM: snap.manifest,
                },
            },
            "spec": {**spec, "storageRef": {"name": meta["name"]}},
        }
        try:
            created = self.kube.create_object(BACKUPS, ns, body)
        except ApiException as e:
            report.skipped += 1
            self.kube.event(
                storage,
                "Warning",
                "CannotRecreate",
                f"re-creating Backup {name} from {snap.manifest}: {e.reason}",
            )
            return
        if created is None:
            return  # made meanwhile (another sync, or the user): the next sync sees it
        names.add(name)
        report.created.append(name)
        self.kube.event(
            created,
            "Normal",
            "Synced",
            f"re-created from snapshot {manifest.snapshot_id} in BackupStorage {meta['name']} "
            f"({snap.manifest})",
        )
