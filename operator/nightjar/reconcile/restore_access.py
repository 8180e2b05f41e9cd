"""A Restore into another namespace reads the snapshot through presigned URLs: the Job there
gets no credentials of the Backup's storage, only URLs for exactly this snapshot's objects and,
when it is encrypted, the data keys of exactly those objects (never the storage's key)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from nightjar.config import OperatorConfig
from nightjar.constants import API_VERSION, LABEL_MANAGED_BY, LABEL_RESTORE, MANAGED_BY
from nightjar.jobs import PRESIGNED_CA_KEY, PRESIGNED_KEY, RestorePlan, restore_access_name
from nightjar.reconcile import preflight
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.ports import KubeAPI
from nightjar.reconcile.restore_plan import Refused
from nightjar.storage import layout
from nightjar.storage.crypto import KeyProblem
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import PublicManifest
from nightjar.storage.objects import ObjectStore, S3Target, StorageError
from nightjar.storage.snapshot import hand_over_data_keys

#: Presigned URLs outlive the Job's deadline by this much.
PRESIGN_MARGIN = 3600
#: A Secret holds at most 1 MiB (about 2,000 presigned URLs: 30 GB of packed files).
SECRET_LIMIT = 1_000_000


def presigned_secret(
    kube: KubeAPI,
    config: OperatorConfig,
    plan: RestorePlan,
    storage_ns: str,
    storage_spec: dict[str, Any],
    open_store: Callable[[S3Target], ObjectStore],
) -> None:
    """URLs that read this one snapshot, in a Secret of the target namespace."""
    try:
        target = storage_rec.target_for(kube, storage_ns, storage_spec)
        store = open_store(target)
        raw = store.read(plan.manifest_key)
        manifest = PublicManifest.parse(raw, f"manifest {plan.manifest_key}")
    except IntegrityError as e:  # a storage or Secret that does not answer *now* is retried
        raise Refused(f"reading the backup's manifest: {e}") from e
    try:
        # An encrypted snapshot: the data keys of exactly its objects, never the storage's key.
        keys_of = {"encryption": {"keySecretRef": {"name": plan.storage.key_secret}}}
        ring = preflight.keyring(kube, storage_ns, keys_of) if plan.storage.key_secret else None
        data_keys = hand_over_data_keys(raw, ring)
    except preflight.Missing as e:
        raise Refused(f"the backup's BackupStorage: {e}") from e
    except KeyProblem as e:
        raise Refused(str(e)) from e
    keys = [o.key for o in manifest.objects]
    if plan.primary_prefix is not None:  # a replica: the same objects under its own prefix
        keys = [layout.relocate(k, target.prefix, plan.primary_prefix) for k in keys]
    expires = config.job_active_deadline_seconds + PRESIGN_MARGIN
    expires = min(expires, 7 * 24 * 3600)  # the longest a presigned URL may live
    try:
        urls = {k: store.presign_get(k, expires) for k in [plan.manifest_key, *keys]}
    except StorageError as e:
        if e.retryable:
            raise
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
    kube.create_if_absent(
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
