"""Backups whose snapshot is already in the bucket: no Job, the operator adopts it.

- Uploaded (``spec.type: Uploaded``): an archive ``nightjar upload`` stored under this
  namespace's uploads; checked (its own namespace's, intact), locked until the Backup expires.
- Synced (annotation ``nightjar.dev/synced-from``): a Backup storage sync re-created from a
  snapshot in the bucket; checked (this namespace's snapshot, intact).

A problem that may pass (the BackupStorage or its Secret missing, the bucket unreachable) is
retried; one that will not (another namespace's key, a manifest that does not match, a missing
object) fails the Backup at once (:class:`UploadRefused`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from nightjar.config import OperatorConfig
from nightjar.constants import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_SYNCED_FROM,
    BACKUPS,
    STORAGES,
    UPLOADED_SOURCE,
)
from nightjar.domain.residency import Policy
from nightjar.domain.retention import format_time, parse_time
from nightjar.jobs import StorageRef
from nightjar.kube import SecretMissing
from nightjar.reconcile import preflight, replicas, status
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.backup_plan import PreflightFailed
from nightjar.reconcile.backup_status import BackupStatus
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.ports import Clock, KubeAPI
from nightjar.reconcile.snapshots import snapshot_uid
from nightjar.storage import layout
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import Manifest
from nightjar.storage.objects import Lock, ObjectMissing, ObjectStore, S3Target, StorageError


class UploadRefused(Exception):
    """A snapshot in the bucket cannot become this Backup, for good; ``reason`` is the condition's."""

    retryable = False

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def upload_prefix(storage_prefix: str, namespace: str, manifest_key: str) -> str | None:
    """The prefix of the upload ``manifest_key`` belongs to, or None unless the key is exactly
    ``<prefix>nightjar/v1/<namespace>/uploaded/<upload-id>/<snapshot-id>/manifest.json``.

    The tenancy rule of uploaded Backups: one may only ever point at its own namespace's uploads,
    never at another namespace's data (nor at a taken snapshot, which its own Backup deletes).
    """
    base = layout.source_prefix(storage_prefix, namespace, UPLOADED_SOURCE)
    if not manifest_key.startswith(base):
        return None
    parts = manifest_key[len(base) :].split("/")
    if len(parts) != 3 or parts[2] != layout.MANIFEST or not all(ID.match(p) for p in parts[:2]):
        return None
    return f"{base}{parts[0]}/"


class Adoption:
    def __init__(
        self,
        kube: KubeAPI,
        config: OperatorConfig,
        clock: Clock,
        state: BackupStatus,
        policy: Policy,
        open_store: Callable[[S3Target], ObjectStore],
    ) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock
        self.state = state
        self.policy = policy
        self.open_store = open_store

    def reconcile_uploaded(self, backup: dict[str, Any]) -> None:
        """Adopt a snapshot ``nightjar upload`` stored: check it is this namespace's and intact,
        lock it until the Backup expires, and complete the Backup. No Job: the data is there.

        A problem that may pass (the BackupStorage or its Secret missing, the bucket unreachable)
        is retried like a taken backup's preflight; one that will not (another namespace's key,
        a manifest that does not match, a missing object) fails the Backup at once.
        """
        st = backup.get("status") or {}
        expires = backup["metadata"]["annotations"][ANNOTATION_EXPIRES_AT]
        if not st.get("phase"):
            self.state.queued(
                backup,
                {
                    "expiresOn": expires,
                    "sourceId": UPLOADED_SOURCE,
                    "message": "checking the uploaded snapshot",
                },
                ("Normal", "Queued", "uploaded backup queued for verification"),
            )
        attempts = int(st.get("attempts") or 0) + 1
        try:
            done = self._adopt_upload(backup, attempts)
        except UploadRefused as e:
            self.state.fail(backup, str(e), attempts, reason=e.reason)
            return
        except PreflightFailed as e:
            if attempts >= self.config.attempts:
                self.state.fail(backup, str(e), attempts, reason="PreflightFailed")
                return
            self.state.apply(
                backup,
                status.update(
                    attempts=attempts, message=f"attempt {attempts} of {self.config.attempts}: {e}"
                ),
                ("Warning", "Retrying", f"{e} (attempt {attempts} of {self.config.attempts}, retrying)"),
            )
            raise Retry(str(e), 10.0 * 2 ** (attempts - 1)) from e
        self.state.complete(
            backup,
            done,
            (
                "Normal",
                "Completed",
                f"uploaded snapshot {done.fields['snapshotId']}, {done.fields['sizeUncompressedMB']} MB",
            ),
        )

    def _adopt_upload(self, backup: dict[str, Any], attempts: int) -> status.Update:
        """Check and lock the uploaded snapshot; returns the Completed status."""
        meta, spec = backup["metadata"], backup["spec"]
        ns = meta["namespace"]
        key = (spec.get("upload") or {}).get("manifestKey") or ""
        want_sha = (spec.get("upload") or {}).get("manifestSha256") or ""
        storage_name = spec["storageRef"]["name"]
        storage = self.kube.get(STORAGES, ns, storage_name)
        if storage is None:
            raise PreflightFailed(f'BackupStorage "{storage_name}" not found in namespace {ns}')
        lock_mode = StorageRef.from_spec(storage["spec"]).lock_mode
        refusal = replicas.residency_refusal(
            replicas.check_replicas(self.kube, self.policy, ns, storage), storage_name
        )
        if refusal:
            raise UploadRefused(f"BackupStorage {storage_name}: {refusal}", "ResidencyRefused")
        try:
            target = storage_rec.target_for(self.kube, ns, storage["spec"])
        except SecretMissing as e:
            raise PreflightFailed(f"BackupStorage {storage_name} credentials: {e}") from e
        mine = upload_prefix(target.prefix, ns, key)
        if mine is None:
            base = layout.source_prefix(target.prefix, ns, UPLOADED_SOURCE)
            raise UploadRefused(
                f"spec.upload.manifestKey {key!r} is not allowed: an uploaded Backup may only use an "
                f"upload of its own namespace ({base}<upload-id>/<snapshot-id>/{layout.MANIFEST})",
                "NotAllowed",
            )
        other = self.claimed_by(backup, key, older_only=True)
        if other:
            raise UploadRefused(
                f"the uploaded snapshot {key} already belongs to Backup {other}", "AlreadyUsed"
            )
        store = self.open_store(target)
        try:
            raw = store.read(key)
        except ObjectMissing as e:
            raise UploadRefused(
                f"the uploaded manifest {key} is not in bucket {target.bucket}", "ManifestMissing"
            ) from e
        except StorageError as e:  # names the key: "reading <key>: ..."
            raise PreflightFailed(f"storage: {e}") from e
        except Exception as e:
            raise PreflightFailed(f"storage: reading {key}: {type(e).__name__}: {e}") from e
        if hashlib.sha256(raw).hexdigest() != want_sha:
            raise UploadRefused(
                f"the uploaded manifest {key} does not match spec.upload.manifestSha256", "VerificationFailed"
            )
        try:
            manifest = Manifest.parse(
                raw, preflight.keyring(self.kube, ns, storage["spec"]), f"uploaded manifest {key}"
            )
            objects = {o.key: o.bytes for o in manifest.objects}
            parts = manifest.part_keys()
            files = manifest.files
        except preflight.Missing as e:
            raise PreflightFailed(f"BackupStorage {storage_name}: {e}") from e
        except IntegrityError as e:
            raise UploadRefused(f"{e}", "VerificationFailed") from e
        if manifest.database is None:
            raise UploadRefused(
                f"the uploaded manifest {key} is not a snapshot manifest", "VerificationFailed"
            )
        outside = sorted(k for k in objects if not k.startswith(mine))
        if outside:
            raise UploadRefused(
                f"the uploaded manifest lists {outside[0]}, outside its own upload {mine}: not allowed",
                "NotAllowed",
            )
        if not parts or not parts <= set(objects):
            raise UploadRefused(
                f"the uploaded manifest {key} does not list its own parts", "VerificationFailed"
            )
        check_objects(store, objects)
        expires = meta["annotations"][ANNOTATION_EXPIRES_AT]
        lock = Lock.of(lock_mode, parse_time(expires))
        if lock is not None:
            for k in [*sorted(objects), key]:
                try:
                    store.extend_retention(k, lock)
                except StorageError as e:  # "setting Object Lock retention on <key>: ..."
                    raise PreflightFailed(f"storage: {e}") from e
        now = self.clock.now()
        size = manifest.size_uncompressed
        return status.completed(
            "UploadVerified",
            f"uploaded snapshot {manifest.snapshot_id} verified "
            f"({len(objects)} object{'' if len(objects) == 1 else 's'})",
            **{
                "snapshotId": manifest.snapshot_id or key.rsplit("/", 2)[-2],
                "createdOn": manifest.created_on or format_time(now),
                "completedOn": format_time(now),
                "expiresOn": expires,
                "modelVersion": manifest.model_version,
                "sizeUncompressedBytes": size,
                "sizeUncompressedMB": f"{size / 1e6:.2f}",
                "database": manifest.database.summary(),
                "files": {"count": files.count, "bytes": files.bytes} if files else {"count": 0, "bytes": 0},
                "attempts": attempts,
                "sourceId": UPLOADED_SOURCE,
                "storage": {
                    "storageName": storage_name,
                    "endpoint": target.endpoint,
                    "bucket": target.bucket,
                    "manifestKey": key,
                    "manifestSha256": want_sha,
                },
            },
        )

    def reconcile_synced(self, backup: dict[str, Any]) -> None:
        """A Backup storage sync re-created: its snapshot is already in the bucket (the key in
        ``nightjar.dev/synced-from``). Check it is intact and complete the Backup; no Job.

        Retried while the storage cannot be reached; failed at once when the manifest is not
        this namespace's snapshot, does not parse, or lists a missing or short object.
        """
        st = backup.get("status") or {}
        expires = backup["metadata"]["annotations"].get(ANNOTATION_EXPIRES_AT, "")
        if not st.get("phase"):
            self.state.queued(
                backup,
                {"expiresOn": expires, "message": "checking the snapshot found in the bucket"},
                ("Normal", "Queued", "re-created from the bucket; checking its snapshot"),
            )
        attempts = int(st.get("attempts") or 0) + 1
        try:
            done = self._adopt_synced(backup, attempts)
        except UploadRefused as e:
            self.state.fail(backup, str(e), attempts, reason=e.reason)
            return
        except PreflightFailed as e:
            self.state.apply(backup, status.update(attempts=attempts, message=f"{e}; retrying"))
            raise Retry(str(e), min(300.0, 10.0 * 2 ** min(attempts - 1, 5))) from e
        self.state.complete(
            backup,
            done,
            ("Normal", "Completed", f"snapshot {done.fields['snapshotId']} found in the bucket and verified"),
        )

    def _adopt_synced(self, backup: dict[str, Any], attempts: int) -> status.Update:
        meta, spec = backup["metadata"], backup["spec"]
        ns = meta["namespace"]
        key = meta["annotations"][ANNOTATION_SYNCED_FROM]
        storage_name = spec["storageRef"]["name"]
        storage = self.kube.get(STORAGES, ns, storage_name)
        if storage is None:
            raise PreflightFailed(f'BackupStorage "{storage_name}" not found in namespace {ns}')
        try:
            target = storage_rec.target_for(self.kube, ns, storage["spec"])
        except SecretMissing as e:
            raise PreflightFailed(f"BackupStorage {storage_name} credentials: {e}") from e
        where = layout.parse_key(key, target.prefix)
        if where is None or not where.is_manifest or where.source == UPLOADED_SOURCE:
            raise UploadRefused(
                f"{ANNOTATION_SYNCED_FROM} {key!r} is not a snapshot manifest of "
                f"BackupStorage {storage_name}",
                "NotAllowed",
            )
        if where.namespace not in (ns, (storage["spec"].get("sync") or {}).get("fromNamespace")):
            raise UploadRefused(
                f"{key} is a snapshot of namespace {where.namespace}: not one BackupStorage {storage_name} "
                "serves here",
                "NotAllowed",
            )
        other = next(
            (
                b["metadata"]["name"]
                for b in self.kube.list_objects(BACKUPS, ns)
                if b["metadata"].get("uid") != meta.get("uid") and snapshot_uid(b) == where.backup_uid
            ),
            "",
        )
        if other:
            # Two Backups must never stand for one snapshot: deleting one would delete the other's.
            raise UploadRefused(f"the snapshot {key} already belongs to Backup {other}", "AlreadyUsed")
        store = self.open_store(target)
        try:
            raw = store.read(key)
            keyring = preflight.keyring(self.kube, ns, storage["spec"])
            manifest = Manifest.parse(raw, keyring, f"manifest {key}")
        except ObjectMissing as e:
            raise UploadRefused(
                f"the manifest {key} is not in bucket {target.bucket}", "ManifestMissing"
            ) from e
        except preflight.Missing as e:
            raise PreflightFailed(f"BackupStorage {storage_name}: {e}") from e
        except IntegrityError as e:
            raise UploadRefused(f"{e}", "VerificationFailed") from e
        except StorageError as e:
            raise PreflightFailed(f"storage: {e}") from e
        if manifest.database is None:
            raise UploadRefused(f"{key} is not a snapshot manifest", "VerificationFailed")
        check_objects(store, {o.key: o.bytes for o in manifest.objects})
        now = self.clock.now()
        size, files = manifest.size_uncompressed, manifest.files
        return status.completed(
            "SyncedFromStorage",
            f"snapshot {manifest.snapshot_id} found in the bucket and verified "
            f"({len(manifest.objects)} objects)",
            **{
                "snapshotId": manifest.snapshot_id,
                "createdOn": manifest.created_on,
                "completedOn": format_time(now),
                "expiresOn": manifest.expires_on,
                "modelVersion": manifest.model_version,
                "sizeUncompressedBytes": size,
                "sizeUncompressedMB": f"{size / 1e6:.2f}",
                "database": manifest.database.summary(),
                "files": {"count": files.count, "bytes": files.bytes} if files else {"count": 0, "bytes": 0},
                "attempts": attempts,
                "sourceId": where.source,
                "storage": {
                    "storageName": storage_name,
                    "endpoint": target.endpoint,
                    "bucket": target.bucket,
                    "manifestKey": key,
                    "manifestSha256": hashlib.sha256(raw).hexdigest(),
                },
            },
        )

    def claimed_by(self, backup: dict[str, Any], key: str, older_only: bool) -> str:
        """Another live Backup of the namespace pointing at the same upload (the older one owns
        it), or "". Two Backups must never own one upload: deleting one would delete the other's."""
        meta = backup["metadata"]
        me = (meta.get("creationTimestamp") or "", meta["name"])
        for other in self.kube.list_objects(BACKUPS, meta["namespace"]):
            om = other["metadata"]
            if (
                om.get("uid") == meta.get("uid")
                or om.get("deletionTimestamp")
                or ((other.get("spec") or {}).get("upload") or {}).get("manifestKey") != key
            ):
                continue
            if not older_only or (om.get("creationTimestamp") or "", om["name"]) < me:
                return str(om["name"])
        return ""


def check_objects(store: ObjectStore, objects: dict[str, int]) -> None:
    """Every object is in the bucket with the size the manifest says."""
    for k, size in sorted(objects.items()):
        try:
            head = store.head(k)
        except StorageError as e:  # "checking <key>: ..."
            raise PreflightFailed(f"storage: {e}") from e
        if head is None:
            raise UploadRefused(f"{k} is missing from the bucket", "VerificationFailed")
        if head.size != size:
            raise UploadRefused(f"{k} has {head.size} bytes, the manifest says {size}", "VerificationFailed")
