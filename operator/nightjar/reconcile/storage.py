"""BackupStorage: check the bucket is reachable and its Object Lock is what the spec asks for."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar import metrics
from nightjar.constants import STORAGES
from nightjar.domain.residency import Policy, default_policy
from nightjar.domain.retention import format_time
from nightjar.jobs import StorageRef
from nightjar.kube import SecretMissing
from nightjar.reconcile import status as status_mod
from nightjar.reconcile.ports import KubeAPI
from nightjar.reconcile.replicas import check_replicas, residency_refusal
from nightjar.storage import objects
from nightjar.storage.objects import ObjectStore, S3Target, StorageError

PLURAL = STORAGES


class StorageUnavailable(Exception):
    """The storage cannot be used now; the message says why."""


def _ca_file(pem: str) -> str:
    """The PEM bundle as a file (the S3 client wants a path), one per content: written once, reused."""
    path = os.path.join(
        tempfile.gettempdir(), f"nightjar-ca-{hashlib.sha256(pem.encode()).hexdigest()[:16]}.pem"
    )
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(prefix="nightjar-ca-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        os.replace(tmp, path)
    return path


def target_for(kube: KubeAPI, namespace: str, spec: dict[str, Any]) -> S3Target:
    """An S3 client target for a BackupStorage spec, with its credentials read from the Secret."""
    ref = StorageRef.from_spec(spec)
    creds = kube.secret_keys(namespace, ref.secret_name, [ref.access_key_key, ref.secret_key_key])
    ca_bundle = None
    if ref.ca_secret:
        pem = kube.secret_keys(namespace, ref.ca_secret, [ref.ca_key])[ref.ca_key]
        ca_bundle = _ca_file(pem)
    return S3Target(
        endpoint=ref.endpoint,
        bucket=ref.bucket,
        region=ref.region,
        prefix=ref.prefix,
        access_key=creds[ref.access_key_key],
        secret_key=creds[ref.secret_key_key],
        ca_bundle=ca_bundle,
        insecure=ref.insecure,
    )


def store_of(target: S3Target) -> ObjectStore:
    """The object store behind a target: how the reconcilers reach a bucket (tests swap it)."""
    return target.store()


def unreachable(
    kube: KubeAPI,
    namespace: str,
    storage: dict[str, Any],
    open_store: Callable[[S3Target], ObjectStore] | None = None,
) -> str:
    """ "" when the BackupStorage's bucket answers with its credentials now, else why not."""
    try:
        target = target_for(kube, namespace, storage["spec"])
    except SecretMissing as e:
        return f"credentials: {e}"
    return objects.unreachable((open_store or store_of)(target))


def check(kube: KubeAPI, namespace: str, spec: dict[str, Any]) -> tuple[bool, str, bool]:
    """(ready, message, object lock enabled on the bucket)."""
    try:
        target = target_for(kube, namespace, spec)
    except SecretMissing as e:
        return False, f"credentials: {e}", False
    store = store_of(target)
    why = objects.unreachable(store)
    if why:
        return False, why, False
    try:
        lock_enabled = store.lock_mode() is not None
    except StorageError as e:  # names the bucket: "bucket <b>: reading its Object Lock configuration: ..."
        return False, str(e), False
    mode = (spec.get("objectLock") or {}).get("mode") or "None"
    if mode != "None" and not lock_enabled:
        return (
            False,
            f"objectLock.mode is {mode} but bucket {target.bucket} does not have Object Lock enabled "
            "(it can only be enabled when the bucket is created)",
            False,
        )
    lock_text = f"Object Lock {mode}" if mode != "None" else "no Object Lock"
    return True, f"bucket {target.bucket} reachable, {lock_text}", lock_enabled


def replicas_status(
    kube: KubeAPI, policy: Policy, body: dict[str, Any]
) -> tuple[list[dict[str, Any]], str, str]:
    """(each replica's state, the printer summary, the residency refusal or "")."""
    ns = body["metadata"]["namespace"]
    checks = check_replicas(kube, policy, ns, body)
    out = []
    for c in checks:
        if c.storage is None:
            out.append(
                {"name": c.name, "state": "Unavailable", "message": f'BackupStorage "{c.name}" not found'}
            )
        elif c.refused and c.verdict is not None:
            out.append(
                {
                    "name": c.name,
                    "jurisdiction": c.jurisdiction,
                    "state": "Refused",
                    "message": c.verdict.message,
                }
            )
        else:
            entry = {"name": c.name, "jurisdiction": c.jurisdiction, "state": "Ready"}
            mine = (body["spec"].get("objectLock") or {}).get("mode") or "None"
            theirs = (c.storage["spec"].get("objectLock") or {}).get("mode") or "None"
            if mine != "None" and theirs == "None":
                entry["message"] = (
                    f"copies keep this storage's Object Lock ({mine}): the replica's bucket must have "
                    "Object Lock enabled"
                )
            phase = (c.storage.get("status") or {}).get("phase")
            if phase == "Unavailable":
                entry.update(state="Unavailable", message=(c.storage.get("status") or {}).get("message", ""))
            out.append(entry)
    summary = ", ".join(f"{r['name']} ({r.get('jurisdiction') or '?'})" for r in out)
    return out, summary, residency_refusal(checks, body["metadata"]["name"])


def reconcile_storage(
    kube: KubeAPI, body: dict[str, Any], now: dt.datetime, policy: Policy | None = None
) -> dict[str, Any]:
    """Check the storage (and its replicas against the residency policy) and write its status;
    returns the status written."""
    meta = body["metadata"]
    ready, message, lock = check(kube, meta["namespace"], body["spec"])
    replicas, replica_summary, refusal = replicas_status(kube, policy or default_policy(), body)
    if refusal:
        ready, message = False, refusal
    phase = "Ready" if ready else "Unavailable"
    reason = "BucketReachable" if ready else ("ResidencyRefused" if refusal else "CheckFailed")
    cond = {
        **status_mod.condition("Ready", ready, reason, message),
        "observedGeneration": meta.get("generation", 0),
    }
    status = {
        "phase": phase,
        "message": message,
        "lastCheckedAt": format_time(now),
        "objectLockEnabled": lock,
        "replicas": replicas,
        "replicaSummary": replica_summary,
        "observedGeneration": meta.get("generation", 0),
    }

    def decide(fresh: dict[str, Any]) -> dict[str, Any]:
        return {**status, "conditions": status_mod.conditions(fresh.get("status") or {}, [cond], now)}

    done = status_mod.StatusWriter(kube, PLURAL).write(body, decide)
    if done is None:
        return status  # deleted while it was checked: nothing to write, nothing to tell
    metrics.storage_checked(meta["namespace"], meta["name"], ready)
    # One Event per transition, where the phase written changes (Ready <-> Unavailable).
    if done.transition:
        kube.event(body, "Normal" if ready else "Warning", phase, message)
    return done.patch


def reconcile_dependents(kube: KubeAPI, body: dict[str, Any], now: dt.datetime, policy: Policy) -> list[str]:
    """Storages of the namespace that name ``body`` as a replica see it change (created, its
    jurisdiction moved) at once, not at their next check; returns their names."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    out = []
    for other in kube.list_objects(PLURAL, ns):
        if other["metadata"]["name"] != name and any(
            r.get("name") == name for r in other["spec"].get("replicas") or []
        ):
            reconcile_storage(kube, other, now, policy)
            out.append(other["metadata"]["name"])
    return out


def sweep(kube: KubeAPI, storages: Iterable[dict[str, Any]], now: dt.datetime, policy: Policy) -> int:
    """Re-check every storage (one pass, no timer per object): a bucket that went down shows
    Unavailable, one that came back shows Ready, without a spec change or a restart."""
    n = 0
    for body in storages:
        if body["metadata"].get("deletionTimestamp"):
            continue
        try:
            reconcile_storage(kube, body, now, policy)
        except ApiException as e:
            if e.status != 404:
                raise
        n += 1
    return n
