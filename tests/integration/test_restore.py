"""Restores end to end on the real stack: Backup in one namespace, Restore into another (or the
same), the restore Job running pg_restore against PostgreSQL and writing files into a PVC,
progress reported by the agent itself. Nothing mocked."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar.storage.crypto import new_key_text
from nightjar.storage.manifest import PublicManifest
from nightjar.storage.snapshot import SnapshotReader
from tests.integration.conftest import Env
from tests.integration.helpers import (
    TABLE_CHECKSUMS,
    G,
    V,
    backup_body,
    make_storage,
    psql,
    take_backup,
)
from tests.support import wait_for


def tree(root: Path) -> dict[str, Any]:
    """Everything under ``root``: files by sha256 and mode, dirs, symlink targets."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            rel = str(p.relative_to(root))
            out[rel] = ("l", os.readlink(p)) if p.is_symlink() else ("d",)
        for f in filenames:
            p = Path(dirpath) / f
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            else:
                out[rel] = ("f", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode & 0o777)
    return out


def restore_body(name: str, backup: str, backup_ns: str | None = None, **spec: Any) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": backup}
    if backup_ns:
        ref["namespace"] = backup_ns
    target: dict[str, Any] = {"database": {"secretRef": {"name": "db"}}}
    target.update(spec.pop("target", {}))
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "Restore",
        "metadata": {"name": name},
        "spec": {"backupRef": ref, "target": target, **spec},
    }


def get_restore(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_namespaced_custom_object(G, V, ns, "restores", name)
    return obj


def wait_restore(custom: client.CustomObjectsApi, ns: str, name: str, timeout: float = 180) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        st = get_restore(custom, ns, name).get("status") or {}
        return st if st.get("phase") in ("Completed", "Failed") else None

    return wait_for(f"restore {name} to finish", done, timeout)


def deployment(name: str, version: str, replicas: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "annotations": {"nightjar.dev/model-version": version}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "shop", "command": ["sleep", "3600"]}]},
            },
        },
    }


def test_restore_into_another_namespace_gives_identical_rows_and_files(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    acceptance: Env,
) -> None:
    apps = client.AppsV1Api(core.api_client)
    apps.create_namespaced_deployment(namespace, deployment("shop", "2.0.0", 0))
    storage = make_storage(custom, core, env, namespace)
    custom.patch_namespaced_custom_object(
        G,
        V,
        namespace,
        "backupstorages",
        storage["metadata"]["name"],
        {"spec": {"allowedRestoreNamespaces": [acceptance.ns]}},
    )
    body = backup_body("prod")
    body["spec"]["source"]["app"] = {"name": "shop"}
    take_backup(custom, namespace, body)
    (files_pvc / "after-backup.txt").write_text("not in the backup")

    # Acceptance runs an older model with two replicas: stopped for the restore, then back.
    apps.create_namespaced_deployment(acceptance.ns, deployment("shop", "1.9.0", 2))
    wait_for(
        "acceptance app up",
        lambda: (apps.read_namespaced_deployment("shop", acceptance.ns).status.replicas or 0) == 2,
        60,
    )
    before_files = tree(files_pvc)
    custom.create_namespaced_custom_object(
        G,
        V,
        acceptance.ns,
        "restores",
        restore_body(
            "from-prod",
            "prod",
            namespace,
            target={
                "files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}},
                "app": {"name": "shop"},
            },
        ),
    )
    saw_stopped = wait_for(
        "the app stopped for the restore",
        lambda: apps.read_namespaced_deployment("shop", acceptance.ns).spec.replicas == 0 or None,
        60,
    )
    assert saw_stopped
    st = wait_restore(custom, acceptance.ns, "from-prod")
    assert st["phase"] == "Completed", st.get("message")
    assert st["backup"] == f"{namespace}/prod"
    assert st["startedAt"] and st["completedAt"]
    assert st["progress"]["percent"] == 100
    assert st["progress"]["filesTotal"] == st["progress"]["filesDone"] == 300 + 6 + 1

    # Identical rows, and the stale acceptance row is gone.
    assert psql(env, acceptance.db, TABLE_CHECKSUMS) == psql(env, app_db, TABLE_CHECKSUMS)
    # Identical files: every path, byte, mode, empty dir and symlink; what only acceptance had is gone.
    expected = {k: v for k, v in before_files.items() if k != "after-backup.txt"}
    assert tree(acceptance.files) == expected

    # The model versions differ: a warning condition, and the restore still ran.
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["ModelVersionMismatch"]["status"] == "True"
    assert (
        "2.0.0" in conds["ModelVersionMismatch"]["message"]
        and "1.9.0" in conds["ModelVersionMismatch"]["message"]
    )
    assert conds["Completed"]["status"] == "True"

    # The app is back at its two replicas.
    assert apps.read_namespaced_deployment("shop", acceptance.ns).spec.replicas == 2
    assert st["app"] == {
        "kind": "Deployment",
        "name": "shop",
        "originalReplicas": 2,
        "stopped": True,
        "restarted": True,
    }

    # The Job read the snapshot through presigned URLs: prod's storage credentials never
    # reached acceptance.
    secrets = {s.metadata.name for s in core.list_namespaced_secret(acceptance.ns).items}
    assert "s3-creds" not in secrets
    job = batch.read_namespaced_job("nightjar-restore-from-prod", acceptance.ns)
    env_names = {e.name for e in job.spec.template.spec.containers[0].env or []}
    assert "NIGHTJAR_S3_ACCESS_KEY_ID" not in env_names

    out = subprocess.run(
        [env["NIGHTJAR_KUBECTL"], "--kubeconfig", env["KUBECONFIG"], "get", "rst", "-n", acceptance.ns],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print(out)  # the README shows this
    print(json.dumps(st, indent=1))
    header, row = out.splitlines()[0].split(), out.splitlines()[1]
    assert header == ["NAME", "BACKUP", "STATUS", "PROGRESS", "TARGET", "AGE"]
    assert f"{namespace}/prod" in row and "Completed" in row and "100%" in row


def test_database_only_restore_leaves_files_as_they_were(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("nightly"))
    checksums = psql(env, app_db, TABLE_CHECKSUMS)
    psql(env, app_db, "delete from orders where id > 10; update customers set name = 'changed'")
    (files_pvc / "new-since.txt").write_text("keep me")
    (files_pvc / "big.bin").unlink()
    files_before = tree(files_pvc)
    custom.create_namespaced_custom_object(
        G,
        V,
        namespace,
        "restores",
        restore_body(
            "db-only",
            "nightly",
            contents="DatabaseOnly",
            target={"files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}},
        ),
    )
    st = wait_restore(custom, namespace, "db-only")
    assert st["phase"] == "Completed", st.get("message")
    assert psql(env, app_db, TABLE_CHECKSUMS) == checksums
    assert tree(files_pvc) == files_before
    assert "files untouched" in st["target"]


def test_cross_namespace_restore_without_a_grant_is_refused_and_reads_nothing(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    acceptance: Env,
) -> None:
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("prod", files=False))
    before = psql(env, acceptance.db, "select name from customers")
    custom.create_namespaced_custom_object(
        G, V, acceptance.ns, "restores", restore_body("sneaky", "prod", namespace)
    )
    st = wait_restore(custom, acceptance.ns, "sneaky", 60)
    assert st["phase"] == "Failed"
    assert "not allowed" in st["message"] and "allowedRestoreNamespaces" in st["message"]
    assert st["targetState"] == "Unchanged"
    assert batch.list_namespaced_job(acceptance.ns).items == []
    assert [s.metadata.name for s in core.list_namespaced_secret(acceptance.ns).items] == ["db"]
    assert psql(env, acceptance.db, "select name from customers") == before


def test_refusals_name_what_is_wrong(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("ok"))
    bad = backup_body("broken", files=False)
    bad["spec"]["source"]["database"]["secretRef"]["name"] = "no-such-secret"
    custom.create_namespaced_custom_object(G, V, namespace, "backups", bad)
    db_only = backup_body("db-only")  # its source names files, but it holds the database only
    db_only["spec"]["contents"] = "DatabaseOnly"
    take_backup(custom, namespace, db_only)
    files_target = {"files": {"persistentVolumeClaim": {"claimName": "files"}}}

    cases = {
        "of-missing": (restore_body("of-missing", "nope"), 'Backup "nope" not found'),
        "of-unfinished": (restore_body("of-unfinished", "broken"), "not Completed"),
        "no-target-db": (
            restore_body("no-target-db", "ok", target={"database": {"secretRef": {"name": "gone"}}}),
            'target database: Secret "gone" not found',
        ),
        "no-target-app": (
            restore_body("no-target-app", "ok", contents="DatabaseOnly", target={"app": {"name": "ghost"}}),
            'target app: Deployment "ghost" not found',
        ),
        "no-target-pvc": (
            restore_body(
                "no-target-pvc", "ok", target={"files": {"persistentVolumeClaim": {"claimName": "nope"}}}
            ),
            f'target files: PersistentVolumeClaim "nope" not found in namespace {namespace}',
        ),
        "full-of-db-only": (
            restore_body("full-of-db-only", "db-only", target=files_target),
            "holds a database only: restore it with contents DatabaseOnly",
        ),
    }
    for body, _ in cases.values():
        custom.create_namespaced_custom_object(G, V, namespace, "restores", body)
    for name, (_, expected) in cases.items():
        st = wait_restore(custom, namespace, name, 60)
        assert st["phase"] == "Failed", name
        assert expected in st["message"], (name, st["message"])
        assert "nothing was changed" in st["message"]

    # A files-only restore does not exist; the schema says so.
    with pytest.raises(ApiException) as e:
        custom.create_namespaced_custom_object(
            G, V, namespace, "restores", restore_body("files-only", "ok", contents="FilesOnly")
        )
    assert "files-only restore is not supported" in e.value.body
    # And a Restore's spec cannot change once created.
    with pytest.raises(ApiException) as e:
        custom.patch_namespaced_custom_object(
            G, V, namespace, "restores", "of-missing", {"spec": {"backupRef": {"name": "ok"}}}
        )
    assert "immutable" in e.value.body


def test_progress_is_visible_while_a_larger_restore_runs(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    psql(
        env,
        app_db,
        f"set role {app_db}; create table blobs (id int primary key, body text);"
        " insert into blobs select g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text)"
        " from generate_series(1, 3000000) g;",
    )
    make_storage(custom, core, env, namespace)
    status = take_backup(custom, namespace, backup_body("big", files=False), timeout=300)
    assert status["database"]["bytes"] > 100_000_000
    custom.create_namespaced_custom_object(G, V, namespace, "restores", restore_body("big", "big"))
    seen: list[dict[str, Any]] = []

    def partial() -> bool | None:
        st = get_restore(custom, namespace, "big").get("status") or {}
        p = st.get("progress") or {}
        if p:
            seen.append(p)
        if st.get("phase") == "Running" and 0 < p.get("bytesDone", 0) < p.get("bytesTotal", 0):
            return True
        assert st.get("phase") not in ("Completed", "Failed"), (
            f"finished before any partial progress: {seen[-3:]}"
        )
        return None

    wait_for("partial progress in status", partial, 180, interval=0.2)
    p = seen[-1]
    assert p["bytesTotal"] == status["database"]["bytes"]
    assert 0 <= p["percent"] < 100 and p["stage"] == "database"
    st = wait_restore(custom, namespace, "big", 300)
    assert st["phase"] == "Completed", st.get("message")
    assert psql(env, app_db, "select count(*) from blobs") == "3000000"


def test_a_damaged_snapshot_fails_and_leaves_the_target_unchanged(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    s3: Any,
) -> None:
    make_storage(custom, core, env, namespace)
    st = take_backup(custom, namespace, backup_body("tampered"))
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    reader = SnapshotReader(s3, bucket, st["storage"]["manifestKey"])
    assert reader.m.database is not None
    last = reader.m.database.dump.chunks[-1]  # the dump's last chunk: pg_restore has run the rest
    pack = bytearray(s3.get_object(Bucket=bucket, Key=last.pack)["Body"].read())
    pack[last.offset + last.stored // 2] ^= 0xFF  # one flipped byte
    s3.put_object(Bucket=bucket, Key=last.pack, Body=bytes(pack))
    psql(env, app_db, "update customers set name = 'current'")
    checksums = psql(env, app_db, TABLE_CHECKSUMS)
    files_before = tree(files_pvc)

    custom.create_namespaced_custom_object(
        G,
        V,
        namespace,
        "restores",
        restore_body(
            "from-tampered",
            "tampered",
            target={"files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}},
        ),
    )
    rst = wait_restore(custom, namespace, "from-tampered")
    assert rst["phase"] == "Failed"
    assert "database dump: blob" in rst["message"], rst["message"]  # names the damaged object
    assert "is unchanged" in rst["message"] and rst["targetState"] == "Unchanged"
    assert psql(env, app_db, TABLE_CHECKSUMS) == checksums  # rolled back
    assert tree(files_pvc) == files_before


def test_deleting_a_running_restore_gives_the_app_its_replicas_back(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    apps = client.AppsV1Api(core.api_client)
    apps.create_namespaced_deployment(namespace, deployment("shop", "1.0", 3))
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("b", files=False))
    custom.create_namespaced_custom_object(
        G, V, namespace, "restores", restore_body("r", "b", target={"app": {"name": "shop"}})
    )
    wait_for(
        "the app stopped",
        lambda: apps.read_namespaced_deployment("shop", namespace).spec.replicas == 0 or None,
        60,
    )
    custom.delete_namespaced_custom_object(G, V, namespace, "restores", "r")
    wait_for(
        "the Restore gone",
        lambda: (
            "r"
            not in [
                o["metadata"]["name"]
                for o in custom.list_namespaced_custom_object(G, V, namespace, "restores")["items"]
            ]
        ),
        60,
    )
    assert apps.read_namespaced_deployment("shop", namespace).spec.replicas == 3


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``nightjar`` command, as a user runs it."""
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "nightjar"), *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
        timeout=300,
    )


def regular_files(root: Path) -> dict[str, str]:
    return {k: v[1] for k, v in tree(root).items() if v[0] == "f"}


def uploaded_backup(custom: client.CustomObjectsApi, ns: str, known: set[str]) -> dict[str, Any] | None:
    for b in custom.list_namespaced_custom_object(G, V, ns, "backups")["items"]:
        if (
            b["spec"].get("type") == "Uploaded"
            and b["metadata"]["name"] not in known
            and (b.get("status") or {}).get("phase") in ("Completed", "Failed")
        ):
            return b
    return None


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_download_upload_restore_round_trip_gives_identical_data(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    tmp_path: Path,
    s3: Any,
    encrypted: bool,
) -> None:
    make_storage(custom, core, env, namespace)
    if encrypted:  # download decrypts with the storage's key; the upload is encrypted again
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": "backup-keys"}, "stringData": {"key-7": new_key_text()}}
        )
        enc = {"spec": {"encryption": {"keySecretRef": {"name": "backup-keys"}}}}
        custom.patch_namespaced_custom_object(G, V, namespace, "backupstorages", "s3", enc)
    take_backup(custom, namespace, backup_body("orig"))
    checksums = psql(env, app_db, TABLE_CHECKSUMS)
    files = regular_files(files_pvc)
    archive = tmp_path / "orig.tar.gz"
    r = cli(env, "download", "orig", "-n", namespace, "--full", "-o", str(archive))
    assert r.returncode == 0, r.stderr
    r = cli(env, "upload", str(archive), "--storage", "s3", "-n", namespace, "--comment", "round trip")
    assert r.returncode == 0, r.stderr
    up = wait_for("the uploaded Backup", lambda: uploaded_backup(custom, namespace, set()), 60)
    assert up["status"]["phase"] == "Completed", up["status"].get("message")
    if encrypted:
        raw = s3.get_object(
            Bucket=env["NIGHTJAR_S3_BUCKET_PLAIN"], Key=up["status"]["storage"]["manifestKey"]
        )
        assert PublicManifest.parse(raw["Body"].read()).key_ids() == {"7"}  # the upload is encrypted too

    # The app's data changes; restoring the uploaded copy brings back exactly what was downloaded.
    psql(env, app_db, "delete from orders; update customers set name = 'changed'")
    for p in list(files_pvc.rglob("*.bin"))[:20]:
        p.write_bytes(b"changed")
    (files_pvc / "new.txt").write_text("new")
    custom.create_namespaced_custom_object(
        G,
        V,
        namespace,
        "restores",
        restore_body(
            "from-upload",
            up["metadata"]["name"],
            target={"files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}},
        ),
    )
    st = wait_restore(custom, namespace, "from-upload")
    assert st["phase"] == "Completed", st.get("message")
    assert psql(env, app_db, TABLE_CHECKSUMS) == checksums
    assert regular_files(files_pvc) == files


def test_a_hand_built_mendix_archive_uploads_and_restores(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    acceptance: Env,
    tmp_path: Path,
) -> None:
    """The documented layout: .metadata, db/db.backup (pg_dump -Fc -O -x), tree/<aa>/<bb>/<uuid>."""
    make_storage(custom, core, env, namespace)
    build = tmp_path / "mendix"
    (build / "db").mkdir(parents=True)
    subprocess.run(
        [
            os.path.join(env["NIGHTJAR_PG_BINDIR"], "pg_dump"),
            "-Fc",
            "-O",
            "-x",
            "-f",
            str(build / "db" / "db.backup"),
            env["NIGHTJAR_PG_DSN"].rsplit("/", 1)[0] + f"/{app_db}",
        ],
        check=True,
    )
    documents: dict[str, bytes] = {}
    for i in range(25):
        u = str(uuid.uuid4())
        documents[f"{u[0:2]}/{u[2:4]}/{u}"] = os.urandom(100 + i * 37)
    for rel, data in documents.items():
        (build / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (build / "tree" / rel).write_bytes(data)
    meta = {
        "duration": "0",
        "dumpSize": str((build / "db" / "db.backup").stat().st_size),
        "modelVersion": "1.0.0.40",
        "databaseSize": "9730584",
        "filesSize": str(sum(len(d) for d in documents.values())),
    }
    (build / ".metadata").write_text(json.dumps(meta))
    archive = tmp_path / "mendix-backup.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in (".metadata", "db", "tree"):
            tar.add(build / name, arcname=name)
    r = cli(env, "upload", str(archive), "--storage", "s3", "-n", namespace)
    assert r.returncode == 0, r.stderr
    up = wait_for("the uploaded Backup", lambda: uploaded_backup(custom, namespace, set()), 60)
    assert up["status"]["phase"] == "Completed", up["status"].get("message")
    assert up["status"]["modelVersion"] == "1.0.0.40"

    storage = custom.get_namespaced_custom_object(G, V, namespace, "backupstorages", "s3")
    custom.patch_namespaced_custom_object(
        G,
        V,
        namespace,
        "backupstorages",
        storage["metadata"]["name"],
        {"spec": {"allowedRestoreNamespaces": ["*"]}},
    )
    custom.create_namespaced_custom_object(
        G,
        V,
        acceptance.ns,
        "restores",
        restore_body(
            "from-mendix",
            up["metadata"]["name"],
            namespace,
            target={"files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}},
        ),
    )
    st = wait_restore(custom, acceptance.ns, "from-mendix")
    assert st["phase"] == "Completed", st.get("message")
    assert psql(env, acceptance.db, TABLE_CHECKSUMS) == psql(env, app_db, TABLE_CHECKSUMS)
    assert regular_files(acceptance.files) == {k: hashlib.sha256(v).hexdigest() for k, v in documents.items()}


def test_a_restore_pod_killed_mid_way_is_replaced_and_the_restore_completes_identically(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    """Found by make chaos: a restore whose Pod was deleted mid-way ended Failed with target state
    Unknown. The restore is idempotent, so a killed Pod (no result) gets a new one; only a failure
    the agent reports ends the Job."""
    psql(
        env,
        app_db,
        f"set role {app_db}; create table blobs (id int primary key, body text);"
        " insert into blobs select g, md5(g::text) || md5((g * 7)::text) from generate_series(1, 1500000) g;",
    )
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("big", files=False), timeout=300)
    want = psql(env, app_db, TABLE_CHECKSUMS)
    psql(env, app_db, "delete from orders where id > 10; delete from blobs where id % 3 = 0")
    custom.create_namespaced_custom_object(G, V, namespace, "restores", restore_body("again", "big"))

    def restoring() -> Any:
        st = get_restore(custom, namespace, "again").get("status") or {}
        p = st.get("progress") or {}
        return (st.get("phase") == "Running" and 0 < p.get("bytesDone", 0) < p.get("bytesTotal", 0)) or None

    wait_for("the restore to be part way", restoring, 180, interval=0.1)
    (pod,) = core.list_namespaced_pod(namespace, label_selector="job-name=nightjar-restore-again").items
    core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
    st = wait_restore(custom, namespace, "again", 300)
    assert st["phase"] == "Completed", st.get("message")
    assert psql(env, app_db, TABLE_CHECKSUMS) == want
    assert psql(env, app_db, "select count(*) from blobs") == "1500000"
    job = batch.read_namespaced_job("nightjar-restore-again", namespace)
    # The killed Pod is gone and the Job succeeded (how the killed one is counted depends on when
    # the kubelet saw the deletion, so that count is not asserted).
    assert job.status.succeeded == 1
    left = core.list_namespaced_pod(namespace, label_selector="job-name=nightjar-restore-again").items
    assert all(p.metadata.uid != pod.metadata.uid for p in left)
