"""Restore: Queued → Running → Completed | Failed, driven by its one Job in the target namespace.

Before the Job: the Backup must be Completed, its namespace must grant the Restore's namespace
(``allowedRestoreNamespaces`` on its BackupStorage; checked before anything of the Backup's
storage is touched), and the target (database Secret, files, app) must exist. Refusals end in
Failed at once, with a message saying what is wrong and that nothing was changed.

With ``stopApp`` the target workload is scaled to 0 (its replicas recorded in status first, so a
restarted operator scales it back), the Job runs once it has no Pods left, and the workload is
scaled back before the Restore reaches a terminal phase, whatever the outcome.

The Job reports progress itself (see ``agent.progress``); the operator derives everything else
from what exists: the Job, its Pod's termination message, the workload.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import logging
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar import metrics
from nightjar.config import OperatorConfig
from nightjar.constants import (
    ANNOTATION_MODEL_VERSION,
    API_VERSION,
    LABEL_MANAGED_BY,
    LABEL_RESTORE,
    MANAGED_BY,
)
from nightjar.domain.retention import format_time
from nightjar.jobs import (
    PRESIGNED_CA_KEY,
    PRESIGNED_KEY,
    RestorePlan,
    StorageRef,
    build_restore_access,
    build_restore_job,
    restore_access_name,
)
from nightjar.kube import Kube, SecretMissing
from nightjar.reconcile import preflight
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.backup import PLURAL as BACKUPS
from nightjar.reconcile.backup import Retry, _cond, _now
from nightjar.storage import layout
from nightjar.storage.crypto import KeyProblem
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import PublicManifest
from nightjar.storage.objects import StorageError
from nightjar.storage.snapshot import hand_over_data_keys

log = logging.getLogger("nightjar.restore")

PLURAL = "restores"
TERMINAL = ("Completed", "Failed")
#: Presigned URLs outlive the Job's deadline by this much.
PRESIGN_MARGIN = 3600
#: A Secret holds at most 1 MiB (about 2,000 presigned URLs: 30 GB of packed files).
SECRET_LIMIT = 1_000_000


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


class RestoreReconciler:
    def __init__(self, kube: Kube, config: OperatorConfig) -> None:
        self.kube = kube
        self.config = config

    # --- status -------------------------------------------------------------------------------

    def _set(
        self, restore: dict[str, Any], status: dict[str, Any], event: tuple[str, str, str] | None = None
    ) -> bool:
        """Patch status unless the Restore is terminal already (terminal phases never change).

        The one place a Restore's status, its Events and its metrics change. A write that only
        repeats the current phase (a stale body) posts no Event; a transition is counted in the
        metrics once, after the patch (conditional on the resourceVersion read) succeeded.
        """
        meta = restore["metadata"]
        for _ in range(5):
            fresh = self.kube.get(PLURAL, meta["namespace"], meta["name"])
            if fresh is None:
                return False
            st = fresh.get("status") or {}
            cur = st.get("phase")
            if cur in TERMINAL and set(status) - {"app"}:
                return False
            if status.get("phase") == "Queued" and cur:
                return False  # Queued is only ever the first phase: a stale body never moves it back
            if "conditions" in status:  # merge by type: a merge patch replaces the whole list
                merged = {c["type"]: c for c in st.get("conditions") or []}
                merged.update({c["type"]: c for c in status["conditions"]})
                status = {**status, "conditions": list(merged.values())}
            try:
                self.kube.patch_status(
                    PLURAL,
                    meta["namespace"],
                    meta["name"],
                    status,
                    resource_version=fresh["metadata"]["resourceVersion"],
                )
            except ApiException as e:
                if e.status == 409:
                    continue
                raise
            restore["status"] = {**st, **status}
            new_phase = status.get("phase")
            if event is not None and new_phase != cur:
                self.kube.event(fresh, *event)
            if new_phase is not None and new_phase != cur:
                metrics.restore_transition(fresh, cur, new_phase, status)
            return True
        return False

    def _fail(self, restore: dict[str, Any], message: str, reason: str, target_state: str) -> None:
        now = _now()
        self._set(
            restore,
            {
                "phase": "Failed",
                "message": message,
                "targetState": target_state,
                "completedAt": restore.get("status", {}).get("completedAt") or _fmt(now),
                "conditions": [_cond("Failed", True, reason, message, now)],
            },
            ("Warning", "Failed", message),
        )

    # --- entry point --------------------------------------------------------------------------

    def reconcile(self, restore: dict[str, Any]) -> None:
        """Drive one Restore one step further; idempotent. Raises Retry to be called again."""
        meta, spec = restore["metadata"], restore["spec"]
        ns, name = meta["namespace"], meta["name"]
        status = restore.get("status") or {}
        if status.get("phase") in TERMINAL:
            self._restart_app(restore)  # a crash between the two steps is finished here
            return
        contents = spec.get("contents") or "Full"
        if not status.get("phase"):
            bns = spec["backupRef"].get("namespace") or ns
            self._set(
                restore,
                {
                    "phase": "Queued",
                    "backup": f"{bns}/{spec['backupRef']['name']}",
                    "target": target_summary(ns, spec["target"], contents),
                    "message": "checking the backup and the target",
                },
                (
                    "Normal",
                    "Queued",
                    f"restore of Backup {bns}/{spec['backupRef']['name']} into "
                    f"{target_summary(ns, spec['target'], contents)} queued",
                ),
            )
        job = self.kube.read_job(ns, restore_access_name(name))
        if job is not None:
            self.sync_from_job(restore, job)
            return
        try:
            plan, storage_ns, storage_spec = self.plan(restore)
            if not self._app_stopped(restore):
                raise Retry("waiting for the app to stop", 3)
            self._start(restore, plan, storage_ns, storage_spec)
        except Refused as e:
            self._restart_app(restore)
            self._fail(restore, f"{e}; nothing was changed", "Refused", "Unchanged")

    # --- preflight ----------------------------------------------------------------------------

    def plan(self, restore: dict[str, Any]) -> tuple[RestorePlan, str, dict[str, Any]]:
        """The Job's plan, plus the Backup's namespace and its BackupStorage's spec."""
        meta, spec = restore["metadata"], restore["spec"]
        ns = meta["namespace"]
        ref = spec["backupRef"]
        bns = ref.get("namespace") or ns
        backup = self.kube.get(BACKUPS, bns, ref["name"])
        if backup is None:
            raise Refused(f'Backup "{ref["name"]}" not found in namespace {bns}')
        storage_name = backup["spec"]["storageRef"]["name"]
        storage = self.kube.get(storage_rec.PLURAL, bns, storage_name)
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
        self._model_versions(restore, ns, target.get("app"), bstatus.get("modelVersion") or "")
        st_storage = bstatus.get("storage") or {}
        manifest_key = st_storage.get("manifestKey") or ""
        if not manifest_key:
            raise Refused(f"Backup {bns}/{ref['name']} records no manifest")
        # The snapshot was encrypted with the primary's keys, wherever it is read from.
        key_secret = StorageRef.from_spec(storage["spec"]).key_secret
        storage, source = self._location(restore, backup, storage)
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
        return plan, bns, storage["spec"]

    def _location(
        self, restore: dict[str, Any], backup: dict[str, Any], primary: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The primary storage when it answers, else the first replica holding a verified copy
        that does; recorded in status.source (and told in an Event when it is a replica).

        Without a verified replica the primary is used as it always was: its Job then says
        what is wrong with it, and an outage of a few seconds does not fail the Restore here.
        """
        bns = backup["metadata"]["namespace"]
        replicas = [
            loc
            for loc in (backup.get("status") or {}).get("locations") or []
            if loc.get("role") == "Replica" and loc.get("state") == "Replicated"
        ]
        choice = (primary, _source(primary, "Primary", "the primary storage"))
        why = storage_rec.unreachable(self.kube, bns, primary) if replicas else ""
        if why:
            for loc in replicas:
                replica = self.kube.get(storage_rec.PLURAL, bns, loc["storage"])
                if replica is not None and not storage_rec.unreachable(self.kube, bns, replica):
                    reason = f"the primary {primary['metadata']['name']} cannot be reached: {why}"
                    choice = (replica, _source(replica, "Replica", reason))
                    break
            else:
                choice = (primary, _source(primary, "Primary", f"no replica answers either; {why}"))
        storage, source = choice
        if (restore.get("status") or {}).get("source") != source:
            event = (
                (
                    "Warning",
                    "UsingReplica",
                    f"reading the snapshot from replica {source['storage']}: {source['reason']}",
                )
                if source["role"] == "Replica"
                else None
            )
            self._set(restore, {"source": source}, event)
        return storage, source

    def _model_versions(
        self, restore: dict[str, Any], ns: str, app: dict[str, Any] | None, backup_version: str
    ) -> None:
        """Record both model versions; warn (and go on, as Mendix does) when they differ."""
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
        status: dict[str, Any] = {"modelVersion": backup_version, "targetModelVersion": target_version}
        event = None
        if backup_version and target_version and backup_version != target_version:
            msg = (
                f"the backup's model version {backup_version} differs from the target app's "
                f"{target_version}; the restore goes on, the app may need the matching model to start"
            )
            status["conditions"] = [_cond("ModelVersionMismatch", True, "ModelVersionMismatch", msg, _now())]
            event = ("Warning", "ModelVersionMismatch", msg)
        current = restore.get("status") or {}
        if (
            current.get("targetModelVersion") != target_version
            or current.get("modelVersion") != backup_version
        ):
            self._set(restore, status, event)

    # --- the app ------------------------------------------------------------------------------

    def _app_stopped(self, restore: dict[str, Any]) -> bool:
        """Scale the target app to 0 (recording its replicas first); True once it has no Pods."""
        spec = restore["spec"]
        app = spec["target"].get("app")
        if not app or spec.get("stopApp") is False:
            return True
        ns = restore["metadata"]["namespace"]
        obj = self.kube.read_workload(ns, app)
        if obj is None:
            raise Refused(f'target app: {app.get("kind") or "Deployment"} "{app["name"]}" not found')
        st_app = (restore.get("status") or {}).get("app") or {}
        if not st_app.get("stopped"):
            replicas = int(obj.spec.replicas if obj.spec.replicas is not None else 1)
            self._set(
                restore,
                {
                    "app": {
                        "kind": app.get("kind") or "Deployment",
                        "name": app["name"],
                        "originalReplicas": replicas,
                        "stopped": True,
                        "restarted": False,
                    },
                    "message": f"stopping the app ({replicas} replicas → 0) for the restore",
                },
                ("Normal", "StoppingApp", f"scaling {app['name']} to 0 for the restore"),
            )
        if obj.spec.replicas != 0:
            self.kube.scale_workload(ns, app, 0)
            return False
        return int(obj.status.replicas or 0) == 0

    def restart_app_on_delete(self, restore: dict[str, Any]) -> None:
        if self._scale_back(restore):
            log.info("restore %s/%s deleted; its app was scaled back", *_ident(restore))
            st_app = restore["status"]["app"]
            self.kube.event(
                restore,
                "Normal",
                "RestartedApp",
                f"scaled {st_app['name']} back to {int(st_app.get('originalReplicas') or 0)} replicas: "
                "the Restore was deleted before it finished",
            )

    def _scale_back(self, restore: dict[str, Any]) -> bool:
        st_app = (restore.get("status") or {}).get("app") or {}
        if not st_app.get("stopped") or st_app.get("restarted"):
            return False
        ns = restore["metadata"]["namespace"]
        app = {"kind": st_app.get("kind"), "name": st_app["name"]}
        try:
            self.kube.scale_workload(ns, app, int(st_app.get("originalReplicas") or 0))
        except ApiException as e:
            if e.status != 404:
                raise
        return True

    def _restart_app(self, restore: dict[str, Any]) -> None:
        if not self._scale_back(restore):
            return
        st_app = restore["status"]["app"]
        app = {"kind": st_app.get("kind"), "name": st_app["name"]}
        replicas = int(st_app.get("originalReplicas") or 0)
        self._set(
            restore,
            {"app": {**st_app, "restarted": True}},
            ("Normal", "RestartedApp", f"scaled {app['name']} back to {replicas} replicas"),
        )

    # --- the Job ------------------------------------------------------------------------------

    def _start(
        self, restore: dict[str, Any], plan: RestorePlan, storage_ns: str, storage_spec: dict[str, Any]
    ) -> None:
        if plan.presigned:
            self._presigned_secret(plan, storage_ns, storage_spec)
        for obj in build_restore_access(plan):
            self.kube.create_if_absent(obj)
        job = build_restore_job(plan, self.config)
        jname = job["metadata"]["name"]
        event = None
        if self.kube.create_job(plan.namespace, job):  # only the create that made it says so
            log.info("created Job %s/%s", plan.namespace, jname)
            st_app = (restore.get("status") or {}).get("app") or {}
            event = (
                (
                    "Normal",
                    "AppStopped",
                    f"{st_app.get('kind')} {st_app['name']} has no Pods left; created Job {jname}",
                )
                if st_app.get("stopped")
                else ("Normal", "JobCreated", f"created Job {jname}")
            )
        self._set(restore, {"jobName": jname, "message": "restore Job created"}, event)

    def _presigned_secret(self, plan: RestorePlan, storage_ns: str, storage_spec: dict[str, Any]) -> None:
        """URLs that read this one snapshot, in a Secret of the target namespace."""
        try:
            target = storage_rec.target_for(self.kube, storage_ns, storage_spec)
            store = storage_rec.store_of(target)
            raw = store.read(plan.manifest_key)
            manifest = PublicManifest.parse(raw, f"manifest {plan.manifest_key}")
        except (SecretMissing, StorageError, IntegrityError) as e:
            raise Refused(f"reading the backup's manifest: {e}") from e
        try:
            # An encrypted snapshot: the data keys of exactly its objects, never the storage's key.
            keys_of = {"encryption": {"keySecretRef": {"name": plan.storage.key_secret}}}
            ring = preflight.keyring(self.kube, storage_ns, keys_of) if plan.storage.key_secret else None
            data_keys = hand_over_data_keys(raw, ring)
        except preflight.Missing as e:
            raise Refused(f"the backup's BackupStorage: {e}") from e
        except KeyProblem as e:
            raise Refused(str(e)) from e
        keys = [o.key for o in manifest.objects]
        if plan.primary_prefix is not None:  # a replica: the same objects under its own prefix
            keys = [layout.relocate(k, target.prefix, plan.primary_prefix) for k in keys]
        expires = self.config.job_active_deadline_seconds + PRESIGN_MARGIN
        expires = min(expires, 7 * 24 * 3600)  # the longest a presigned URL may live
        try:
            urls = {k: store.presign_get(k, expires) for k in [plan.manifest_key, *keys]}
        except StorageError as e:
            raise Refused(f"signing URLs for the snapshot: {e}") from e
        handed: dict[str, Any] = {"urls": urls}
        if data_keys:
            handed["keys"] = data_keys
        payload = json.dumps(handed, separators=(",", ":")).encode()
        if len(payload) * 4 / 3 > SECRET_LIMIT:
            raise Refused(
                f"the snapshot has {len(keys)} objects, too many to hand to a restore in another "
                "namespace; restore it in its own namespace"
            )
        data = {PRESIGNED_KEY: base64.b64encode(payload).decode()}
        if target.ca_bundle:  # a private CA (public data) the Job cannot read from the other namespace
            with open(target.ca_bundle, "rb") as f:
                data[PRESIGNED_CA_KEY] = base64.b64encode(f.read()).decode()
        self.kube.create_if_absent(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": restore_access_name(plan.name),
                    "namespace": plan.namespace,
                    "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_RESTORE: plan.name},
                    "ownerReferences": [
                        {
                            "apiVersion": API_VERSION,
                            "kind": "Restore",
                            "name": plan.name,
                            "uid": plan.uid,
                            "controller": True,
                        }
                    ],
                },
                "type": "Opaque",
                "data": data,
            }
        )

    def sync_from_job(self, restore: dict[str, Any], job: dict[str, Any]) -> None:
        """Follow the Job: Running, then (app restarted) Completed or Failed."""
        status = restore.get("status") or {}
        if status.get("phase") in TERMINAL:
            self._restart_app(restore)
            return
        js = job.get("status") or {}
        conds = {c["type"]: c for c in js.get("conditions") or [] if c.get("status") == "True"}
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        if "Complete" in conds or "Failed" in conds:
            results = self.kube.job_results(ns, name)
            result = results[-1] if results else {}
            self._restart_app(restore)
            now = _now()
            if "Complete" in conds and "error" not in result:
                progress = dict(status.get("progress") or {})
                progress.update(percent=100, display="100%", stage="done")
                if "bytesTotal" in progress:
                    progress["bytesDone"] = progress["bytesTotal"]
                    progress["filesDone"] = progress.get("filesTotal", 0)
                files = (result.get("files") or {}).get("files")
                msg = f"restored snapshot {result.get('snapshotId', '')} into {status.get('target', ns)}"
                if files is not None:
                    msg += f" ({files} files)"
                self._set(
                    restore,
                    {
                        "phase": "Completed",
                        "snapshotId": result.get("snapshotId", ""),
                        "completedAt": _fmt(now),
                        "progress": progress,
                        "message": msg,
                        "conditions": [_cond("Completed", True, "Restored", msg, now)],
                    },
                    ("Normal", "Completed", msg),
                )
                return
            reason = conds.get("Failed", {}).get("reason") or "JobFailed"
            error = result.get("error") or conds.get("Failed", {}).get("message") or "the restore Job failed"
            state = result.get("targetState") or "Unknown"
            if reason == "DeadlineExceeded":
                error = (
                    f"the restore ran longer than {self.config.job_active_deadline_seconds}s and was stopped"
                )
                state = "Unknown"
            self._fail(restore, f"{error} (target state: {state})", reason, state)
            return
        if int(js.get("active") or 0) > 0 and status.get("phase") != "Running":
            self._set(
                restore,
                {
                    "phase": "Running",
                    "startedAt": js.get("startTime") or _fmt(_now()),
                    "message": "restoring",
                },
                ("Normal", "Running", f"restore Job {name} running"),
            )


def _source(storage: dict[str, Any], role: str, reason: str) -> dict[str, str]:
    return {
        "storage": storage["metadata"]["name"],
        "role": role,
        "jurisdiction": storage["spec"].get("jurisdiction") or "",
        "reason": reason,
    }


def _ident(restore: dict[str, Any]) -> tuple[str, str]:
    return restore["metadata"]["namespace"], restore["metadata"]["name"]


def _fmt(t: dt.datetime) -> str:
    return format_time(t)
