"""What a Restore needs before its Job, read and checked; refusals say why and change nothing.

The Backup must be Completed, its namespace must grant the Restore's namespace
(``allowedRestoreNamespaces`` on its BackupStorage; checked before anything of the Backup's
storage is touched), and the target (database Secret, files, app) must exist. The snapshot is
read from the primary storage when it answers, else from a replica holding a verified copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nightjar.constants import ANNOTATION_MODEL_VERSION, BACKUPS, STORAGES
from nightjar.jobs import RestorePlan, StorageRef
from nightjar.reconcile import preflight
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.ports import KubeAPI
from nightjar.storage import layout
from nightjar.storage.objects import ObjectStore, S3Target


class Refused(Exception):
    """The restore cannot start; the message says why. Nothing was changed."""

    retryable = False  # a refusal by policy or by what exists: the same answer next time


def target_summary(namespace: str, target: dict[str, Any], contents: str) -> str:
    parts = [f"{namespace}: database {target['database']['secretRef']['name']}"]
    files = target.get("files") or {}
    if contents == "DatabaseOnly":
        parts.append("files untouched")
    elif "persistentVolumeClaim" in files:
        pvc = files["persistentVolumeClaim"]
        sub = (pvc.get("path") or "").strip("/")
        parts.append(f"files pvc/{pvc['claimName']}" + (f"/{sub}" if sub else ""))
    elif "s3" in files:
        parts.append(f"files s3://{files['s3']['bucket']}/{files['s3'].get('prefix') or ''}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Planned:
    plan: RestorePlan
    storage_namespace: str
    storage_spec: dict[str, Any]
    #: Where the snapshot is read from (status.source).
    source: dict[str, str]
    #: The backup's and the target app's model versions (status fields).
    versions: dict[str, Any]
    #: Said when the model versions differ ("" when they do not).
    version_warning: str


class RestorePlanner:
    def __init__(self, kube: KubeAPI, open_store: Callable[[S3Target], ObjectStore]) -> None:
        self.kube = kube
        self.open_store = open_store

    def plan(self, restore: dict[str, Any]) -> Planned:
        """The Job's plan, the Backup's namespace and its BackupStorage's spec, where the snapshot
        is read from, and both model versions. Reads only; raises Refused."""
        meta, spec = restore["metadata"], restore["spec"]
        ns = meta["namespace"]
        ref = spec["backupRef"]
        bns = ref.get("namespace") or ns
        backup = self.kube.get(BACKUPS, bns, ref["name"])
        if backup is None:
            raise Refused(f'Backup "{ref["name"]}" not found in namespace {bns}')
        storage_name = backup["spec"]["storageRef"]["name"]
        storage = self.kube.get(STORAGES, bns, storage_name)
        if bns != ns:
            allowed = (storage or {}).get("spec", {}).get("allowedRestoreNamespaces") or []
            if ns not in allowed and "*" not in allowed:
                raise Refused(
                    f"restoring Backup {bns}/{ref['name']} into namespace {ns} is not allowed: "
                    f'namespace {bns} does not grant it (BackupStorage "{storage_name}" would list '
                    f"{ns} in spec.allowedRestoreNamespaces)"
                )
        bstatus = backup.get("status") or {}
        if bstatus.get("phase") != "Completed":
            raise Refused(
                f"Backup {bns}/{ref['name']} is {bstatus.get('phase') or 'not started'}, not Completed: "
                "only a Completed backup can be restored"
            )
        if storage is None:
            raise Refused(f'the Backup\'s BackupStorage "{storage_name}" no longer exists in {bns}')
        contents = spec.get("contents") or "Full"
        bfiles = bstatus.get("files") or {}
        target = spec["target"]
        backup_has_files = (backup["spec"].get("contents") or "Full") == "Full" and bool(
            (backup["spec"].get("source") or {}).get("files") or bfiles.get("count")
        )
        if contents == "Full" and target.get("files") and not backup_has_files:
            raise Refused(
                f"Backup {bns}/{ref['name']} holds a database only: restore it with contents DatabaseOnly"
            )
        try:
            preflight.keyring(self.kube, bns, storage["spec"])
        except preflight.Missing as e:
            raise Refused(f'the Backup\'s BackupStorage "{storage_name}": {e}') from e
        db_secret = target["database"]["secretRef"]["name"]
        try:
            db_keys = preflight.database_keys(self.kube, ns, db_secret)
        except preflight.Missing as e:
            raise Refused(f"target database: {e}") from e
        if contents == "Full":
            try:
                preflight.files(self.kube, ns, target.get("files") or {})
            except preflight.Missing as e:
                raise Refused(f"target files: {e}") from e
        versions = self.model_versions(ns, target.get("app"), bstatus.get("modelVersion") or "")
        st_storage = bstatus.get("storage") or {}
        manifest_key = st_storage.get("manifestKey") or ""
        if not manifest_key:
            raise Refused(f"Backup {bns}/{ref['name']} records no manifest")
        # The snapshot was encrypted with the primary's keys, wherever it is read from.
        key_secret = StorageRef.from_spec(storage["spec"]).key_secret
        storage, source = self.location(backup, storage)
        primary_prefix = None
        if source["role"] == "Replica":
            primary_prefix = st_storage.get("prefix") or ""
            manifest_key = layout.relocate(manifest_key, storage["spec"].get("prefix") or "", primary_prefix)
        plan = RestorePlan(
            name=meta["name"],
            namespace=ns,
            uid=meta["uid"],
            storage=dataclasses.replace(StorageRef.from_spec(storage["spec"]), key_secret=key_secret),
            manifest_key=manifest_key,
            primary_prefix=primary_prefix,
            manifest_sha256=st_storage.get("manifestSha256")
            or (backup["spec"].get("upload") or {}).get("manifestSha256")
            or "",
            contents=contents,
            target=target,
            db_secret=db_secret,
            db_keys=db_keys,
            presigned=bns != ns,
        )
        return Planned(plan, bns, storage["spec"], source, *versions)

    def location(
        self, backup: dict[str, Any], primary: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The primary storage when it answers, else the first replica holding a verified copy
        that does (the reconciler records it in status.source, and tells when it is a replica).

        Without a verified replica the primary is used as it always was: its Job then says
        what is wrong with it, and an outage of a few seconds does not fail the Restore here.
        """
        bns = backup["metadata"]["namespace"]
        replicas = [
            loc
            for loc in (backup.get("status") or {}).get("locations") or []
            if loc.get("role") == "Replica" and loc.get("state") == "Replicated"
        ]
        choice = (primary, source_of(primary, "Primary", "the primary storage"))
        why = storage_rec.unreachable(self.kube, bns, primary, self.open_store) if replicas else ""
        if why:
            for loc in replicas:
                replica = self.kube.get(STORAGES, bns, loc["storage"])
                if replica is not None and not storage_rec.unreachable(
                    self.kube, bns, replica, self.open_store
                ):
                    reason = f"the primary {primary['metadata']['name']} cannot be reached: {why}"
                    choice = (replica, source_of(replica, "Replica", reason))
                    break
            else:
                choice = (primary, source_of(primary, "Primary", f"no replica answers either; {why}"))
        return choice

    def model_versions(
        self, ns: str, app: dict[str, Any] | None, backup_version: str
    ) -> tuple[dict[str, Any], str]:
        """Both model versions, and a warning when they differ (the restore goes on, as Mendix
        does)."""
        target_version = ""
        if app:
            obj = self.kube.read_workload(ns, app)
            if obj is None:
                kind = app.get("kind") or "Deployment"
                raise Refused(f'target app: {kind} "{app["name"]}" not found in namespace {ns}')
            ann, labels = obj.metadata.annotations or {}, obj.metadata.labels or {}
            target_version = str(
                ann.get(ANNOTATION_MODEL_VERSION) or labels.get("app.kubernetes.io/version") or ""
            )
        versions = {"modelVersion": backup_version, "targetModelVersion": target_version}
        if backup_version and target_version and backup_version != target_version:
            return versions, (
                f"the backup's model version {backup_version} differs from the target app's "
                f"{target_version}; the restore goes on, the app may need the matching model to start"
            )
        return versions, ""


def source_of(storage: dict[str, Any], role: str, reason: str) -> dict[str, str]:
    return {
        "storage": storage["metadata"]["name"],
        "role": role,
        "jurisdiction": storage["spec"].get("jurisdiction") or "",
        "reason": reason,
    }
