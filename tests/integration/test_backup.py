"""On-demand backups end to end on the real stack: the operator, the Job controller, the agent
running pg_dump against PostgreSQL, MinIO with Object Lock. Nothing mocked."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar.devstack.stack import Stack, State
from nightjar.storage.snapshot import SnapshotReader
from tests.integration.helpers import (
    TABLE_CHECKSUMS,
    G,
    V,
    backup_body,
    backup_gone,
    get_backup,
    make_storage,
    psql,
    take_backup,
    wait_terminal,
)
from tests.support import read_stream, wait_for


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_backup_of_a_seeded_app_restores_to_the_same_rows_and_files(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    s3: Any,
    tmp_path: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    client.AppsV1Api(core.api_client).create_namespaced_deployment(
        namespace,
        {
            "metadata": {
                "name": "shop",
                "annotations": {"nightjar.dev/model-version": "10.4.1.33"},
                "labels": {"app.kubernetes.io/version": "ignored-when-annotated"},
            },
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "shop"}},
                "template": {
                    "metadata": {"labels": {"app": "shop"}},
                    "spec": {"containers": [{"name": "app", "image": "shop", "command": ["true"]}]},
                },
            },
        },
    )
    first = backup_body("first", comment="before upgrade")
    first["spec"]["source"]["app"] = {"kind": "Deployment", "name": "shop"}
    custom.create_namespaced_custom_object(G, V, namespace, "backups", first)
    b = wait_terminal(custom, namespace, "first")
    st = b["status"]
    assert st["modelVersion"] == "10.4.1.33"
    # Finished: the kopf layer stops watching it (server-side selector on this label).
    assert wait_for(
        "finished label",
        lambda: (
            get_backup(custom, namespace, "first")["metadata"].get("labels", {}).get("nightjar.dev/finished")
            == "true"
        ),
        10,
    )
    assert st["phase"] == "Completed", st.get("message")
    assert st["attempts"] == 1
    assert st["snapshotId"] and st["createdOn"] and st["completedOn"]
    assert st["expiresOn"] == b["metadata"]["annotations"]["nightjar.dev/expires-at"]
    assert st["database"]["pgDumpVersion"].startswith("15.")
    assert st["database"]["serverVersion"].startswith("15.")
    assert st["files"]["count"] == 300 + 6 + 1
    assert st["sizeUncompressedBytes"] == st["database"]["bytes"] + st["files"]["bytes"]
    # No replicas: the one location holds it, so it is fully replicated (1/1).
    assert [c["type"] for c in st["conditions"] if c["status"] == "True"] == ["Completed", "Replicated"]
    assert st["replication"] == "1/1" and [loc["role"] for loc in st["locations"]] == ["Primary"]
    jobs = batch.list_namespaced_job(namespace, label_selector="nightjar.dev/backup=first").items
    assert len(jobs) == 1

    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=st["storage"]["manifestKey"])["Body"].read())
    # Every stored object is listed with its real size and sha256.
    for o in manifest["objects"]:
        data = s3.get_object(Bucket=bucket, Key=o["key"])["Body"].read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (o["bytes"], o["sha256"]), o["key"]

    # The dump restores into a scratch database with identical rows.
    reader = SnapshotReader(s3, bucket, st["storage"]["manifestKey"], st["storage"]["manifestSha256"])
    assert reader.format == 2
    dump = tmp_path / "db.dump"
    dump.write_bytes(read_stream(reader.open_dump()))
    scratch = f"scratch_{namespace.replace('-', '_')}"
    psql(env, "postgres", f"create database {scratch}")
    try:
        subprocess.run(
            [
                os.path.join(env["NIGHTJAR_PG_BINDIR"], "pg_restore"),
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                "-d",
                env["NIGHTJAR_PG_DSN"].rsplit("/", 1)[0] + f"/{scratch}",
                str(dump),
            ],
            check=True,
            capture_output=True,
        )
        assert psql(env, scratch, TABLE_CHECKSUMS) == psql(env, app_db, TABLE_CHECKSUMS)
        assert psql(env, scratch, "select count(*) from orders") == "5000"
    finally:
        psql(env, "postgres", f"drop database {scratch} with (force)")

    # Every file's stored bytes match the original by sha256; dirs and the symlink are recorded.
    entries = list(reader.entries())
    files = [e for e in entries if e.type == "f"]
    assert len(files) == st["files"]["count"]
    for e, stream in reader.contents(iter(files)):
        assert stream is not None
        stored = read_stream(stream)
        assert hashlib.sha256(stored).hexdigest() == e.sha256 == sha256_file(files_pvc / e.path), e.path
    packs = {c.pack for e in files for c in e.chunks or []}
    assert len(packs) < len(files) / 10  # small files are packed, not one object each
    kinds = {e.path: e.type for e in entries}
    assert kinds["empty-dir"] == "d"
    assert kinds["link"] == "l"
    assert "odd names/quote'and\"double.txt" in kinds
    assert "odd names/ünïcødé-файл.txt" in kinds

    # A second backup of the same source reuses every unchanged file instead of uploading it again.
    (files_pvc / "new.txt").write_text("new\n")
    st2 = take_backup(custom, namespace, backup_body("second"))
    m2 = SnapshotReader(s3, bucket, st2["storage"]["manifestKey"]).m.files
    assert m2 is not None
    assert m2.count == st["files"]["count"] + 1
    assert m2.reused_files == st["files"]["count"]
    assert m2.uploaded_bytes == 4

    # kubectl shows the details in its columns.
    out = subprocess.run(
        [
            env["NIGHTJAR_KUBECTL"],
            "--kubeconfig",
            env["KUBECONFIG"],
            "get",
            "backups",
            "-n",
            namespace,
            "-o",
            "wide",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header, row = out.splitlines()[0].split(), next(ln for ln in out.splitlines() if ln.startswith("first "))
    assert header == [
        "NAME",
        "STATUS",
        "TYPE",
        "CREATED",
        "EXPIRES",
        "SIZE(MB)",
        "MODEL",
        "COMMENT",
        "REPLICATED",
        "VERIFIED",
        "AGE",
        "SNAPSHOT",
    ]
    assert "Completed" in row and "OnDemand" in row and "before upgrade" in row and st["snapshotId"] in row
    assert st["sizeUncompressedMB"] in row
    assert "10.4.1.33" in row


def test_wrong_database_password_fails_after_exactly_three_attempts(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    make_storage(custom, core, env, namespace)
    core.patch_namespaced_secret("db", namespace, {"stringData": {"password": "not-the-password"}})
    custom.create_namespaced_custom_object(G, V, namespace, "backups", backup_body("bad-pw", files=False))
    st = wait_terminal(custom, namespace, "bad-pw", timeout=240)["status"]
    assert st["phase"] == "Failed"
    assert st["attempts"] == 3
    assert 'password authentication failed for user "' + app_db + '"' in st["message"]
    assert "not-the-password" not in json.dumps(st)
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=nightjar-backup-bad-pw").items
    assert len(pods) == 3
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=bad-pw").items
    assert {"Queued", "Running", "Failed"} <= {e.reason for e in events}


def test_missing_database_secret_fails_after_three_attempts_naming_it(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
) -> None:
    make_storage(custom, core, env, namespace)
    body = backup_body("no-secret", files=False)
    body["spec"]["source"]["database"]["secretRef"]["name"] = "nope"
    custom.create_namespaced_custom_object(G, V, namespace, "backups", body)
    st = wait_terminal(custom, namespace, "no-secret", timeout=120)["status"]
    assert st["phase"] == "Failed"
    assert st["attempts"] == 3
    assert st["message"] == f'database: Secret "nope" not found in namespace {namespace}'


def test_object_lock_compliance_refuses_deleting_or_replacing_stored_objects(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    s3: Any,
) -> None:
    make_storage(
        custom, core, env, namespace, name="locked", bucket_key="NIGHTJAR_S3_BUCKET_LOCKED", lock="Compliance"
    )
    st = take_backup(custom, namespace, backup_body("locked", files=False, storage="locked"))
    bucket = env["NIGHTJAR_S3_BUCKET_LOCKED"]
    manifest_key = st["storage"]["manifestKey"]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    for key in [manifest_key] + [o["key"] for o in manifest["objects"]]:
        versions = s3.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
        (v,) = [x for x in versions if x["Key"] == key]
        ret = s3.get_object_retention(Bucket=bucket, Key=key, VersionId=v["VersionId"])["Retention"]
        assert ret["Mode"] == "COMPLIANCE"
        with pytest.raises(ClientError):
            s3.delete_object(Bucket=bucket, Key=key, VersionId=v["VersionId"], BypassGovernanceRetention=True)
    # A PUT to the same key cannot replace the locked version: it stays, byte for byte.
    original = s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
    first_version = s3.list_object_versions(Bucket=bucket, Prefix=manifest_key)["Versions"][0]["VersionId"]
    s3.put_object(Bucket=bucket, Key=manifest_key, Body=b"tampered")
    assert s3.get_object(Bucket=bucket, Key=manifest_key, VersionId=first_version)["Body"].read() == original


def _operator(state: State) -> Any:
    return next(p for p in state.procs if p.name == "operator")


def test_operator_killed_while_a_backup_runs_still_ends_in_one_completed_backup(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    # Enough data that the agent is still working when the operator dies.
    psql(
        env,
        app_db,
        f"set role {app_db}; create table blob as select g, md5(g::text) || repeat('y', 200) v "
        "from generate_series(1, 400000) g",
    )
    stack = Stack(Path(env["NIGHTJAR_STATE_DIR"]))
    custom.create_namespaced_custom_object(G, V, namespace, "backups", backup_body("survivor"))
    wait_for(
        "backup running",
        lambda: (get_backup(custom, namespace, "survivor").get("status") or {}).get("phase") == "Running",
        60,
        interval=0.05,
    )
    state = State.load(stack.dir)
    assert state is not None
    os.kill(_operator(state).pid, signal.SIGKILL)
    stack.restart_operator()
    st = wait_terminal(custom, namespace, "survivor")["status"]
    assert st["phase"] == "Completed", st.get("message")
    assert st["attempts"] == 1
    assert len(batch.list_namespaced_job(namespace, label_selector="nightjar.dev/backup=survivor").items) == 1
    assert (
        len(core.list_namespaced_pod(namespace, label_selector="job-name=nightjar-backup-survivor").items)
        == 1
    )


def test_deleting_a_backup_removes_its_stored_objects(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    s3: Any,
) -> None:
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("doomed"))
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    prefix = f"tests/{namespace}/"
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) >= 2  # packs, manifest
    custom.delete_namespaced_custom_object(G, V, namespace, "backups", "doomed")

    wait_for("backup deleted", lambda: backup_gone(custom, namespace, "doomed"), 60)
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) == 0


def test_invalid_or_changed_specs_are_rejected_with_readable_messages(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
) -> None:
    def message(e: ApiException) -> str:
        return str(json.loads(e.body)["message"])

    no_storage = backup_body("x", files=False)
    del no_storage["spec"]["storageRef"]
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(G, V, namespace, "backups", no_storage)
    assert "spec.storageRef: Required value" in message(err.value)

    both = backup_body("y")
    both["spec"]["source"]["files"]["s3"] = {
        "endpoint": "http://x",
        "bucket": "abc",
        "credentials": {"secretName": "c"},
    }
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(G, V, namespace, "backups", both)
    assert "source.files needs exactly one of persistentVolumeClaim or s3" in message(err.value)

    make_storage(custom, core, env, namespace)
    custom.create_namespaced_custom_object(G, V, namespace, "backups", backup_body("fixed", files=False))
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(
            G,
            V,
            namespace,
            "backups",
            "fixed",
            {"spec": {"source": {"database": {"secretRef": {"name": "other"}}}}},
        )
    assert "spec.source is immutable" in message(err.value)
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(
            G, V, namespace, "backups", "fixed", {"spec": {"contents": "Bogus"}}
        )
    assert 'spec.contents: Unsupported value: "Bogus"' in message(err.value)
    custom.patch_namespaced_custom_object(
        G, V, namespace, "backups", "fixed", {"spec": {"comment": "ok to change"}}
    )
    assert get_backup(custom, namespace, "fixed")["spec"]["comment"] == "ok to change"


def test_files_from_an_s3_prefix_are_backed_up(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    s3: Any,
) -> None:
    make_storage(custom, core, env, namespace)
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    src_prefix = f"appfiles/{namespace}/"
    contents = {f"0d/3e/{uuid.uuid4()}": os.urandom(100 + i) for i in range(25)}
    for key, data in contents.items():
        s3.put_object(Bucket=bucket, Key=src_prefix + key, Body=data)
    body = backup_body("from-s3", files=False)
    body["spec"]["source"]["files"] = {
        "s3": {
            "endpoint": env["NIGHTJAR_S3_ENDPOINT"],
            "bucket": bucket,
            "prefix": src_prefix,
            "credentials": {"secretName": "s3-creds"},
        }
    }
    st = take_backup(custom, namespace, body)
    assert st["files"] == {"count": 25, "bytes": sum(len(d) for d in contents.values())}
    reader = SnapshotReader(s3, bucket, st["storage"]["manifestKey"])
    seen = 0
    for e, stream in reader.contents(reader.entries()):
        assert stream is not None
        assert read_stream(stream) == contents[e.path]
        seen += 1
    assert seen == len(contents)


def test_deleting_a_locked_backup_says_its_objects_stay_until_retention_ends(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    s3: Any,
) -> None:
    make_storage(
        custom, core, env, namespace, name="locked", bucket_key="NIGHTJAR_S3_BUCKET_LOCKED", lock="Governance"
    )
    st = take_backup(custom, namespace, backup_body("kept", files=False, storage="locked"))
    custom.delete_namespaced_custom_object(G, V, namespace, "backups", "kept")

    wait_for(
        "locked backup deleted (the finalizer never blocks forever)",
        lambda: backup_gone(custom, namespace, "kept"),
        60,
    )
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=kept").items
    (locked,) = [e for e in events if e.reason == "ObjectsLocked"]
    assert "under Object Lock" in locked.message
    assert s3.head_object(Bucket=env["NIGHTJAR_S3_BUCKET_LOCKED"], Key=st["storage"]["manifestKey"])
    # Deleted on purpose: a tombstone next to the locked snapshot, so storage sync (every 10 s on
    # this stack) never brings the Backup back.
    tombstone = st["storage"]["manifestKey"].rsplit("/", 2)[0] + "/deleted.json"
    assert s3.head_object(Bucket=env["NIGHTJAR_S3_BUCKET_LOCKED"], Key=tombstone)
    time.sleep(15)
    assert backup_gone(custom, namespace, "kept")


def test_storage_whose_bucket_lacks_object_lock_or_does_not_exist_is_unavailable(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
) -> None:
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-creds"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": env["NIGHTJAR_S3_ACCESS_KEY"],
                "AWS_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_SECRET_KEY"],
            },
        },
    )
    cases = {
        "nolock": (
            env["NIGHTJAR_S3_BUCKET_PLAIN"],
            "Compliance",
            f"objectLock.mode is Compliance but bucket {env['NIGHTJAR_S3_BUCKET_PLAIN']} does not have "
            "Object Lock enabled",
        ),
        "nobucket": ("no-such-bucket", "None", "bucket no-such-bucket at "),
    }
    for name, (bucket, mode, _) in cases.items():
        custom.create_namespaced_custom_object(
            G,
            V,
            namespace,
            "backupstorages",
            {
                "apiVersion": f"{G}/{V}",
                "kind": "BackupStorage",
                "metadata": {"name": name},
                "spec": {
                    "endpoint": env["NIGHTJAR_S3_ENDPOINT"],
                    "bucket": bucket,
                    "credentials": {"secretName": "s3-creds"},
                    "objectLock": {"mode": mode},
                    "jurisdiction": "EU",
                },
            },
        )
    for name, (_, _, expected) in cases.items():

        def phase(n: str = name) -> dict[str, Any] | None:
            st = custom.get_namespaced_custom_object(G, V, namespace, "backupstorages", n).get("status") or {}
            return st if st.get("phase") else None

        st = wait_for(f"storage {name} checked", phase, 30)
        assert st["phase"] == "Unavailable"
        assert expected in st["message"]
        assert env["NIGHTJAR_S3_SECRET_KEY"] not in json.dumps(st)
