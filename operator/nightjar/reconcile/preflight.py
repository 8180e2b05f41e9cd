"""Checks shared by a Backup's source and a Restore's target: the database Secret and the files
exist in the namespace. Each raises :class:`Missing` naming what is missing (never a value)."""

from __future__ import annotations

from typing import Any

from nightjar.kube import SecretMissing
from nightjar.reconcile.ports import KubeAPI
from nightjar.storage.crypto import KeyProblem, KeyRing


class Missing(Exception):
    """Something the spec names does not exist; the message says what."""


def database_keys(kube: KubeAPI, namespace: str, secret: str) -> tuple[str, ...]:
    """The keys of the database Secret the agent gets: uri, or host/port/dbname/user/password."""
    try:
        data = kube.secret_data(namespace, secret)
    except SecretMissing as e:
        raise Missing(str(e)) from e
    if "uri" in data:
        return ("uri",)
    missing = [k for k in ("host", "dbname", "user") if k not in data]
    if missing:
        raise Missing(f'Secret "{secret}" has no key uri, nor the key(s) {", ".join(missing)}')
    return tuple(k for k in ("host", "port", "dbname", "user", "password") if k in data)


def scratch_keys(kube: KubeAPI, namespace: str, secret: str, *, host_given: bool = False) -> tuple[str, ...]:
    """The keys of a restore drill's scratch-server Secret: uri, or host/user (port, dbname,
    password when given; the drill connects to the postgres database by default). ``host_given``:
    the host comes from elsewhere (an ephemeral scratch server's Pod address)."""
    try:
        data = kube.secret_data(namespace, secret)
    except SecretMissing as e:
        raise Missing(str(e)) from e
    if "uri" in data:
        return ("uri",)
    missing = [k for k in ("host", "user") if k not in data and not (host_given and k == "host")]
    if missing:
        raise Missing(f'Secret "{secret}" has no key uri, nor the key(s) {", ".join(missing)}')
    return tuple(k for k in ("host", "port", "dbname", "user", "password") if k in data)


def files(kube: KubeAPI, namespace: str, spec: dict[str, Any]) -> None:
    """A ``files`` spec: its PersistentVolumeClaim, or its S3 credentials Secret, exists."""
    if "persistentVolumeClaim" in spec:
        claim = spec["persistentVolumeClaim"]["claimName"]
        if not kube.claim_exists(namespace, claim):
            raise Missing(f'PersistentVolumeClaim "{claim}" not found in namespace {namespace}')
    elif "s3" in spec:
        c = spec["s3"]["credentials"]
        keys = [
            c.get("accessKeyIdKey") or "AWS_ACCESS_KEY_ID",
            c.get("secretAccessKeyKey") or "AWS_SECRET_ACCESS_KEY",
        ]
        try:
            kube.secret_keys(namespace, c["secretName"], keys)
        except SecretMissing as e:
            raise Missing(str(e)) from e


def keyring(kube: KubeAPI, namespace: str, storage_spec: dict[str, Any]) -> KeyRing | None:
    """The storage's key ring when it encrypts (``spec.encryption``), checked: the Secret exists
    and holds well-formed keys with a current one. None for a storage without encryption."""
    ref = (storage_spec.get("encryption") or {}).get("keySecretRef") or {}
    if not ref.get("name"):
        return None
    try:
        data = kube.secret_data(namespace, ref["name"])
    except SecretMissing as e:
        raise Missing(f"encryption key {e}") from e
    try:
        return KeyRing.from_data(ref["name"], data)
    except KeyProblem as e:
        raise Missing(str(e)) from e
