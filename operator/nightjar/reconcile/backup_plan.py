"""What a taken Backup's Job needs, resolved before it is made, or what is missing.

:func:`plan` reads the BackupStorage, its credentials and keys, the replicas' residency, the
database Secret, the files and the app; anything missing raises :class:`PreflightFailed`, which
names it (a retryable error: it may be there soon).
"""

from __future__ import annotations

from typing import Any

from nightjar.constants import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_MODEL_VERSION,
    BACKUPS,
    LABEL_SCHEDULE,
    LABEL_TIER,
    STORAGES,
)
from nightjar.domain.residency import Policy
from nightjar.jobs import BackupPlan, StorageRef
from nightjar.kube import SecretMissing
from nightjar.reconcile import preflight, replicas
from nightjar.reconcile.ports import KubeAPI
from nightjar.storage import layout


class PreflightFailed(Exception):
    """What the Backup needs is missing; the message names it."""

    retryable = True  # retried (a few attempts): it may be there soon


def plan(kube: KubeAPI, policy: Policy, backup: dict[str, Any]) -> BackupPlan:
    """Resolve everything the Job needs, or say what is missing."""
    meta, spec = backup["metadata"], backup["spec"]
    ns = meta["namespace"]
    storage_name = spec["storageRef"]["name"]
    storage = kube.get(STORAGES, ns, storage_name)
    if storage is None:
        raise PreflightFailed(f'BackupStorage "{storage_name}" not found in namespace {ns}')
    ref = StorageRef.from_spec(storage["spec"])
    try:
        kube.secret_keys(ns, ref.secret_name, [ref.access_key_key, ref.secret_key_key])
    except SecretMissing as e:
        raise PreflightFailed(f"BackupStorage {storage_name} credentials: {e}") from e
    refusal = replicas.residency_refusal(replicas.check_replicas(kube, policy, ns, storage), storage_name)
    if refusal:
        raise PreflightFailed(f"BackupStorage {storage_name}: {refusal}")
    try:
        preflight.keyring(kube, ns, storage["spec"])
    except preflight.Missing as e:
        raise PreflightFailed(f"BackupStorage {storage_name}: {e}") from e
    db_secret = spec["source"]["database"]["secretRef"]["name"]
    try:
        db_keys = preflight.database_keys(kube, ns, db_secret)
    except preflight.Missing as e:
        raise PreflightFailed(f"database: {e}") from e
    if (spec.get("contents") or "Full") == "Full":
        try:
            preflight.files(kube, ns, spec["source"].get("files") or {})
        except preflight.Missing as e:
            raise PreflightFailed(f"files: {e}") from e
    return BackupPlan(
        name=meta["name"],
        namespace=ns,
        uid=meta["uid"],
        backup_type=spec.get("type") or "OnDemand",
        contents=spec.get("contents") or "Full",
        source=spec["source"],
        source_id=layout.source_id(spec["source"]),
        expires=meta["annotations"][ANNOTATION_EXPIRES_AT],
        storage=ref,
        db_secret=db_secret,
        db_keys=db_keys,
        previous_manifest=previous_manifest(kube, backup, storage_name),
        model_version=model_version(kube, ns, spec["source"].get("app")),
        record={
            "spec": spec,
            "labels": {
                k: v for k, v in (meta.get("labels") or {}).items() if k in (LABEL_SCHEDULE, LABEL_TIER)
            },
        },
    )


def model_version(kube: KubeAPI, ns: str, app: dict[str, Any] | None) -> str:
    """The app's model version (its annotation, else app.kubernetes.io/version); "" without an app."""
    if not app:
        return ""
    obj = kube.read_workload(ns, app)
    if obj is None:
        kind = app.get("kind") or "Deployment"
        raise PreflightFailed(f'app: {kind} "{app["name"]}" not found in namespace {ns}')
    ann = obj.metadata.annotations or {}
    labels = obj.metadata.labels or {}
    return str(ann.get(ANNOTATION_MODEL_VERSION) or labels.get("app.kubernetes.io/version") or "")


def previous_manifest(kube: KubeAPI, backup: dict[str, Any], storage_name: str) -> str:
    """The newest Completed snapshot of the same source in the same storage (content to reuse)."""
    sid = layout.source_id(backup["spec"]["source"])
    best: tuple[str, str] | None = None
    for other in kube.list_objects(BACKUPS, backup["metadata"]["namespace"]):
        st = other.get("status") or {}
        if (
            st.get("phase") == "Completed"
            and st.get("sourceId") == sid
            and other["spec"]["storageRef"]["name"] == storage_name
            and (st.get("storage") or {}).get("manifestKey")
        ):
            cand = (st.get("createdOn") or "", st["storage"]["manifestKey"])
            if best is None or cand > best:
                best = cand
    return best[1] if best else ""
