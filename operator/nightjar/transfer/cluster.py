"""The command's view of the cluster: which namespace, which client, and the storage a Backup
lives in (its BackupStorage and the credentials in that storage's Secret)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightjar.jobs import StorageRef
from nightjar.kube import Kube, SecretMissing
from nightjar.storage.crypto import KeyRing
from nightjar.storage.objects import S3Target
from nightjar.transfer import CommandError

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
BACKUPS = "backups"
STORAGES = "backupstorages"
RESTORES = "restores"


def _kubeconfig() -> str | None:
    """$KUBECONFIG as it is now (the client library reads it once, at import)."""
    return os.environ.get("KUBECONFIG") or None


def current_namespace() -> str:
    """The kubeconfig's current context namespace; in a Pod its own; else ``default``."""
    from kubernetes import config

    try:
        _, active = config.list_kube_config_contexts(config_file=_kubeconfig())
        ns = ((active or {}).get("context") or {}).get("namespace")
        if ns:
            return str(ns)
    except (config.ConfigException, OSError):
        if SA_NAMESPACE.is_file():
            return SA_NAMESPACE.read_text().strip() or "default"
    return "default"


def connect() -> Kube:
    """A client from $KUBECONFIG (or ~/.kube/config, or the Pod's service account)."""
    from kubernetes import client, config

    try:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=_kubeconfig())
        return Kube(client.ApiClient())
    except (config.ConfigException, OSError) as e:
        raise CommandError(
            f"no Kubernetes configuration: set KUBECONFIG or create ~/.kube/config ({e})"
        ) from e


def api_message(err: Exception) -> str:
    """The API server's own sentence for an ApiException (its body's message), else its reason."""
    body = getattr(err, "body", None)
    if body:
        try:
            msg = json.loads(body).get("message")
            if msg:
                return str(msg)
        except (ValueError, AttributeError):
            pass
    return str(getattr(err, "reason", "") or err)


def get_backup(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    backup = kube.get(BACKUPS, namespace, name)
    if backup is None:
        raise CommandError(f'Backup "{name}" not found in namespace {namespace}')
    return backup


@dataclass(frozen=True)
class Storage:
    """A BackupStorage resolved for direct use: where, and how to get in."""

    name: str
    target: S3Target
    lock_mode: str
    #: The key ring when the storage encrypts (spec.encryption), else None.
    keyring: KeyRing | None = None


def storage(kube: Kube, namespace: str, name: str) -> Storage:
    """The BackupStorage ``name`` and its credentials (the Secret's keys, never printed)."""
    from nightjar.reconcile.storage import target_for

    obj = kube.get(STORAGES, namespace, name)
    if obj is None:
        raise CommandError(f'BackupStorage "{name}" not found in namespace {namespace}')
    try:
        target = target_for(kube, namespace, obj["spec"])
    except SecretMissing as e:
        raise CommandError(f"BackupStorage {name} credentials: {e}") from e
    from nightjar.reconcile import preflight

    try:
        ring = preflight.keyring(kube, namespace, obj["spec"])
    except preflight.Missing as e:
        raise CommandError(f"BackupStorage {name}: {e}") from e
    return Storage(name, target, StorageRef.from_spec(obj["spec"]).lock_mode, ring)


def residency_refusal(kube: Kube, namespace: str, name: str) -> str:
    """The operator's residency verdict on a BackupStorage ("" unless it refused it): the CLI
    writes nothing to a storage whose replicas break the policy."""
    obj = kube.get(STORAGES, namespace, name) or {}
    conditions: list[dict[str, Any]] = (obj.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), {})
    return str(ready.get("message") or "") if ready.get("reason") == "ResidencyRefused" else ""
