"""Helpers shared by the integration tests of Nightjar's resources (real stack, nothing mocked)."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.support import wait_for

G, V = "nightjar.dev", "v1alpha1"


def psql(env: dict[str, str], db: str, sql: str) -> str:
    dsn = env["NIGHTJAR_PG_DSN"].rsplit("/", 1)[0] + f"/{db}"
    return subprocess.run(
        [os.path.join(env["NIGHTJAR_PG_BINDIR"], "psql"), dsn, "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


TABLE_CHECKSUMS = (
    "select string_agg(t || ':' || c, ',' order by t) from ("
    " select 'customers' t, md5(string_agg(c::text, '|' order by c.id)) c from customers c"
    " union all select 'orders', md5(string_agg(o::text, '|' order by o.id)) from orders o) x"
)


def make_storage(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    ns: str,
    name: str = "s3",
    bucket_key: str = "NIGHTJAR_S3_BUCKET_PLAIN",
    lock: str = "None",
) -> dict[str, Any]:
    try:
        core.create_namespaced_secret(
            ns,
            {
                "metadata": {"name": "s3-creds"},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": env["NIGHTJAR_S3_ACCESS_KEY"],
                    "AWS_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_SECRET_KEY"],
                },
            },
        )
    except ApiException as e:
        if e.status != 409:
            raise
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": "BackupStorage",
        "metadata": {"name": name},
        "spec": {
            "endpoint": env["NIGHTJAR_S3_ENDPOINT"],
            "bucket": env[bucket_key],
            "region": "us-east-1",
            "prefix": f"tests/{ns}",
            "credentials": {"secretName": "s3-creds"},
            "objectLock": {"mode": lock},
            "jurisdiction": "EU",
        },
    }
    custom.create_namespaced_custom_object(G, V, ns, "backupstorages", body)
    return wait_for(f"BackupStorage {name} Ready", lambda: _ready(custom, ns, name), 30)


def _ready(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any] | None:
    obj = custom.get_namespaced_custom_object(G, V, ns, "backupstorages", name)
    return obj if (obj.get("status") or {}).get("phase") == "Ready" else None


def backup_body(name: str, *, files: bool = True, comment: str = "", storage: str = "s3") -> dict[str, Any]:
    source: dict[str, Any] = {"database": {"secretRef": {"name": "db"}}}
    if files:
        source["files"] = {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}
    spec: dict[str, Any] = {"storageRef": {"name": storage}, "source": source}
    if comment:
        spec["comment"] = comment
    return {"apiVersion": f"{G}/{V}", "kind": "Backup", "metadata": {"name": name}, "spec": spec}


def backup_gone(custom: client.CustomObjectsApi, ns: str, name: str) -> bool:
    try:
        custom.get_namespaced_custom_object(G, V, ns, "backups", name)
    except ApiException as e:
        return e.status == 404
    return False


def namespace_gone(core: client.CoreV1Api, ns: str) -> bool:
    try:
        core.read_namespace(ns)
    except ApiException as e:
        return e.status == 404
    return False


def get_backup(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_namespaced_custom_object(G, V, ns, "backups", name)
    return obj


def wait_terminal(
    custom: client.CustomObjectsApi, ns: str, name: str, timeout: float = 180
) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        b = get_backup(custom, ns, name)
        return b if (b.get("status") or {}).get("phase") in ("Completed", "Failed") else None

    return wait_for(f"backup {name} to finish", done, timeout)


def take_backup(
    custom: client.CustomObjectsApi, ns: str, body: dict[str, Any], timeout: float = 180
) -> dict[str, Any]:
    """Create a Backup, wait for it to finish, require Completed; returns its status."""
    custom.create_namespaced_custom_object(G, V, ns, "backups", body)
    status: dict[str, Any] = wait_terminal(custom, ns, body["metadata"]["name"], timeout)["status"]
    assert status["phase"] == "Completed", status.get("message")
    return status


SCRATCH_SECRET = "scratch-pg"


def temp_databases(env: dict[str, str]) -> list[str]:
    out = psql(
        env,
        "postgres",
        r"select datname from pg_database where datname like 'nightjar\_verify\_%' order by 1",
    )
    return [ln for ln in out.splitlines() if ln]
