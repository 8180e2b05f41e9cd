"""Deleting a namespace never deletes its backups' data, and never hangs (issue 14).

`kubectl delete namespace` races the namespace controller against the operator's finalizer: the
credentials Secret or the BackupStorage may go before the Backups. Whatever the order, the
Backups let go at once and every stored snapshot stays, until its own expiry, for the day the
namespace is re-created. An explicit `kubectl delete backup` still deletes its data
(``test_backup.py``).
"""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

from tests.integration.helpers import backup_body, make_storage, namespace_gone, take_backup
from tests.support import wait_for


def test_deleting_a_namespace_keeps_its_snapshots_and_finishes_within_30s(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    s3: Any,
) -> None:
    make_storage(custom, core, env, namespace)
    manifests = []
    for name in ("monday", "tuesday", "wednesday"):
        status = take_backup(custom, namespace, backup_body(name, files=False))
        manifests.append(status["storage"]["manifestKey"])
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    prefix = f"tests/{namespace}/"
    before = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert set(manifests) <= before

    started = time.monotonic()
    core.delete_namespace(namespace)
    wait_for(f"namespace {namespace} to be gone", lambda: namespace_gone(core, namespace), 30)
    print(f"namespace with 3 Completed Backups deleted in {time.monotonic() - started:.1f}s")

    after = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert after == before, f"deleting the namespace deleted {sorted(before - after)}"
