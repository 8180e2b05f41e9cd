"""Secondary locations and data residency, on two real S3 servers (MinIO) of the local stack.

The primary BackupStorage is on one server, its replica on the other; stopping a server is a
real outage (connections refused), not a mock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from kubernetes import client

from nightjar.storage.crypto import new_key_text
from tests.integration.conftest import Env
from tests.integration.helpers import (
    TABLE_CHECKSUMS,
    backup_body,
    get_backup,
    psql,
    take_backup,
    wait_terminal,
)
from tests.integration.test_restore import cli, restore_body, tree, wait_restore
from tests.support import stopped_s3, wait_for

G, V = "nightjar.dev", "v1alpha1"


def s3_of(env: dict[str, str], which: str) -> Any:
    pre = "NIGHTJAR_S3_" if which == "primary" else "NIGHTJAR_S3_REPLICA_"
    return boto3.client(
        "s3",
        endpoint_url=env[f"{pre}ENDPOINT"],
        aws_access_key_id=env[f"{pre}ACCESS_KEY"],
        aws_secret_access_key=env[f"{pre}SECRET_KEY"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def storage(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    ns: str,
    name: str,
    which: str,
    jurisdiction: str,
    replicas: list[str] | None = None,
    locked: bool = True,
) -> None:
    pre = "NIGHTJAR_S3_" if which == "primary" else "NIGHTJAR_S3_REPLICA_"
    secret = f"{name}-creds"
    core.create_namespaced_secret(
        ns,
        {
            "metadata": {"name": secret},
            "stringData": {
                "AWS_ACCESS_KEY_ID": env[f"{pre}ACCESS_KEY"],
                "AWS_SECRET_ACCESS_KEY": env[f"{pre}SECRET_KEY"],
            },
        },
    )
    spec: dict[str, Any] = {
        "endpoint": env[f"{pre}ENDPOINT"],
        "bucket": env[f"{pre}BUCKET_LOCKED" if locked else f"{pre}BUCKET_PLAIN"],
        "region": "us-east-1",
        "prefix": f"{which}-{ns}",  # different prefixes: keys move between them
        "credentials": {"secretName": secret},
        "objectLock": {"mode": "Governance" if locked else "None"},
        "jurisdiction": jurisdiction,
        "allowedRestoreNamespaces": ["*"],
    }
    if replicas:
        spec["replicas"] = [{"name": r} for r in replicas]
    custom.create_namespaced_custom_object(
        G,
        V,
        ns,
        "backupstorages",
        {"apiVersion": f"{G}/{V}", "kind": "BackupStorage", "metadata": {"name": name}, "spec": spec},
    )


def storage_status(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_namespaced_custom_object(G, V, ns, "backupstorages", name)
    return obj.get("status") or {}


def replicated(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any] | None:
    b = get_backup(custom, ns, name)
    st = b.get("status") or {}
    locs = st.get("locations") or []
    return b if locs and all(loc["state"] == "Replicated" for loc in locs) else None


def pair(
    custom: client.CustomObjectsApi, core: client.CoreV1Api, env: dict[str, str], ns: str, locked: bool = True
) -> None:
    """A replica "dr" (EU, the second server) first, then the primary "s3" (EU) naming it."""
    storage(custom, core, env, ns, "dr", "replica", "EU", locked=locked)
    wait_for("dr Ready", lambda: storage_status(custom, ns, "dr").get("phase") == "Ready", 30)
    storage(custom, core, env, ns, "s3", "primary", "EU", replicas=["dr"], locked=locked)
    wait_for("s3 Ready", lambda: storage_status(custom, ns, "s3").get("phase") == "Ready", 30)


def objects_match(env: dict[str, str], backup: dict[str, Any]) -> int:
    """Every object of the snapshot is in the replica with the manifest's sha256; returns how many."""
    st = backup["status"]
    src, dst = s3_of(env, "primary"), s3_of(env, "replica")
    pb, rb = env["NIGHTJAR_S3_BUCKET_LOCKED"], env["NIGHTJAR_S3_REPLICA_BUCKET_LOCKED"]
    pp = st["storage"]["prefix"]
    rp = "replica-" + pp.removeprefix("primary-")
    manifest_body = src.get_object(Bucket=pb, Key=st["storage"]["manifestKey"])["Body"].read()
    replica_manifest = dst.get_object(Bucket=rb, Key=rp + st["storage"]["manifestKey"][len(pp) :])[
        "Body"
    ].read()
    assert replica_manifest == manifest_body
    n = 0
    for o in json.loads(manifest_body)["objects"]:
        body = dst.get_object(Bucket=rb, Key=rp + o["key"][len(pp) :])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == o["sha256"], o["key"]
        n += 1
    return n


def test_a_backup_ends_replicated_in_both_locations_and_the_objects_match(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
) -> None:
    pair(custom, core, env, namespace)
    status = take_backup(custom, namespace, backup_body("b1"))
    assert status["replication"] in ("1/2", "2/2")
    backup = wait_for("b1 replicated", lambda: replicated(custom, namespace, "b1"), 120)
    st = backup["status"]
    assert st["replication"] == "2/2"
    assert [(loc["storage"], loc["role"], loc["state"]) for loc in st["locations"]] == [
        ("s3", "Primary", "Replicated"),
        ("dr", "Replica", "Replicated"),
    ]
    cond = next(c for c in st["conditions"] if c["type"] == "Replicated")
    assert cond["status"] == "True"
    n = objects_match(env, backup)
    assert n >= 2 and st["locations"][1]["copiedObjects"] == n + 1  # + the manifest
    # Object Lock retention in the replica as in the primary: until the Backup expires.
    dst = s3_of(env, "replica")
    key = "replica-" + st["storage"]["manifestKey"].removeprefix("primary-")
    ret = dst.get_object_retention(Bucket=env["NIGHTJAR_S3_REPLICA_BUCKET_LOCKED"], Key=key)["Retention"]
    assert ret["Mode"] == "GOVERNANCE"
    assert ret["RetainUntilDate"] >= dt.datetime.fromisoformat(st["expiresOn"].replace("Z", "+00:00"))

    # A second backup of unchanged files: content already in the replica is not copied again.
    take_backup(custom, namespace, backup_body("b2"))
    b2 = wait_for("b2 replicated", lambda: replicated(custom, namespace, "b2"), 120)
    dr = b2["status"]["locations"][1]
    assert dr["skippedObjects"] >= 1
    assert dr["copiedBytes"] < st["locations"][1]["copiedBytes"]
    objects_match(env, b2)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_with_the_primary_server_stopped_a_restore_reads_the_replica_and_gives_identical_data(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    acceptance: Env,
    tmp_path: Path,
    encrypted: bool,
) -> None:
    pair(custom, core, env, namespace)
    if encrypted:  # the replica holds ciphertext and needs no key; the primary's key opens it
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": "backup-keys"}, "stringData": {"key-1": new_key_text()}}
        )
        custom.patch_namespaced_custom_object(
            G,
            V,
            namespace,
            "backupstorages",
            "s3",
            {"spec": {"encryption": {"keySecretRef": {"name": "backup-keys"}}}},
        )
    take_backup(custom, namespace, backup_body("b1"))
    wait_for("b1 replicated", lambda: replicated(custom, namespace, "b1"), 120)
    with stopped_s3("primary"):
        body = restore_body(
            "r1",
            "b1",
            namespace,
            target={"files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}},
        )
        custom.create_namespaced_custom_object(G, V, acceptance.ns, "restores", body)
        st = wait_restore(custom, acceptance.ns, "r1", 240)
        # nightjar download reads the replica too, and says so.
        out = cli(env, "download", "b1", "-n", namespace, "-o", str(tmp_path / "b1.tar.gz"))
        assert out.returncode == 0, out.stderr
        assert "note: read from replica dr (EU): the primary s3 cannot be reached" in out.stderr
        assert (tmp_path / "b1.tar.gz").stat().st_size > 1000
    assert st["phase"] == "Completed", st.get("message")
    assert st["source"]["storage"] == "dr" and st["source"]["role"] == "Replica"
    assert "cannot be reached" in st["source"]["reason"]
    assert psql(env, acceptance.db, TABLE_CHECKSUMS) == psql(env, app_db, TABLE_CHECKSUMS)
    assert tree(acceptance.files) == tree(files_pvc)
    events = core.list_namespaced_event(acceptance.ns, field_selector="involvedObject.name=r1").items
    assert any(e.reason == "UsingReplica" for e in events)


def test_an_eu_primary_with_a_uk_replica_is_refused_and_uk_to_eu_is_accepted(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    tmp_path: Path,
) -> None:
    storage(custom, core, env, namespace, "london", "replica", "UK")
    storage(custom, core, env, namespace, "frankfurt", "primary", "EU", replicas=["london"])
    st = wait_for(
        "frankfurt Unavailable",
        lambda: (s := storage_status(custom, namespace, "frankfurt")).get("phase") == "Unavailable" and s,
        30,
    )
    assert "eu-stays-in-eu" in st["message"] and "london (UK)" in st["message"]
    assert [r["state"] for r in st["replicas"]] == ["Refused"]
    # No data goes there: a Backup to it fails before its Job, naming the rule.
    custom.create_namespaced_custom_object(
        G, V, namespace, "backups", backup_body("refused", files=False, storage="frankfurt")
    )
    b = wait_terminal(custom, namespace, "refused", 120)
    assert b["status"]["phase"] == "Failed" and "eu-stays-in-eu" in b["status"]["message"]
    listed = s3_of(env, "primary").list_objects_v2(
        Bucket=env["NIGHTJAR_S3_BUCKET_LOCKED"], Prefix=f"primary-{namespace}/"
    )
    assert listed.get("KeyCount", 0) == 0
    # Nor does nightjar upload write there.
    archive = tmp_path / "any.tar.gz"
    archive.write_bytes(b"not read: refused before")
    out = cli(env, "upload", str(archive), "--storage", "frankfurt", "-n", namespace)
    assert out.returncode == 1 and "storage frankfurt: replica london (UK) refused" in out.stderr
    assert "eu-stays-in-eu" in out.stderr
    listed = s3_of(env, "primary").list_objects_v2(Bucket=env["NIGHTJAR_S3_BUCKET_LOCKED"], Prefix="primary-")
    assert not [o for o in listed.get("Contents", []) if namespace in o["Key"]]

    # UK data is backed up in the EU: accepted.
    storage(custom, core, env, namespace, "dublin", "replica", "EU")
    storage(custom, core, env, namespace, "uk", "primary", "UK", replicas=["dublin"])
    st = wait_for(
        "uk Ready", lambda: (s := storage_status(custom, namespace, "uk")).get("phase") == "Ready" and s, 30
    )
    assert st["replicas"] == [{"name": "dublin", "jurisdiction": "EU", "state": "Ready"}]
    assert st["replicaSummary"] == "dublin (EU)"


def test_a_replica_down_during_the_backup_catches_up_when_it_returns(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
) -> None:
    pair(custom, core, env, namespace)
    with stopped_s3("replica"):
        status = take_backup(custom, namespace, backup_body("b1"))
        assert status["phase"] == "Completed"  # the primary has it: the backup is done
        waiting = wait_for(
            "the replica location to say why it waits",
            lambda: (
                (b := get_backup(custom, namespace, "b1"))["status"]["locations"][1]
                .get("message", "")
                .startswith("waiting:")
                and b
            ),
            60,
        )
        dr = waiting["status"]["locations"][1]
        assert dr["state"] == "Pending" and "cannot connect" in dr["message"]
        assert waiting["status"]["replication"] == "1/2"
    backup = wait_for(
        "b1 replicated after the replica returned", lambda: replicated(custom, namespace, "b1"), 120
    )
    assert objects_match(env, backup) >= 2  # packs (dump, files, index share them)


def test_gc_removes_an_expired_snapshot_from_both_locations(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    pair(custom, core, env, namespace, locked=False)
    take_backup(custom, namespace, backup_body("old", files=False))
    wait_for("old replicated", lambda: replicated(custom, namespace, "old"), 120)
    buckets = {
        "primary": (env["NIGHTJAR_S3_BUCKET_PLAIN"], f"primary-{namespace}/"),
        "replica": (env["NIGHTJAR_S3_REPLICA_BUCKET_PLAIN"], f"replica-{namespace}/"),
    }

    def count(which: str) -> int:
        bucket, prefix = buckets[which]
        return int(s3_of(env, which).list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0))

    assert count("primary") >= 2 and count("replica") >= 2
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    custom.patch_namespaced_custom_object(
        G, V, namespace, "backups", "old", {"metadata": {"annotations": {"nightjar.dev/expires-at": past}}}
    )
    wait_for("GC to delete the Backup", lambda: not _exists(custom, namespace, "old"), 120)
    wait_for("both locations empty", lambda: count("primary") == 0 and count("replica") == 0, 60)


def _exists(custom: client.CustomObjectsApi, ns: str, name: str) -> bool:
    try:
        get_backup(custom, ns, name)
    except client.ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def test_a_replica_added_later_receives_the_existing_backups(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    storage(custom, core, env, namespace, "dr", "replica", "EU")
    storage(custom, core, env, namespace, "s3", "primary", "EU")
    wait_for("s3 Ready", lambda: storage_status(custom, namespace, "s3").get("phase") == "Ready", 30)
    status = take_backup(custom, namespace, backup_body("before", files=False))
    assert status["replication"] == "1/1"
    custom.patch_namespaced_custom_object(
        G, V, namespace, "backupstorages", "s3", {"spec": {"replicas": [{"name": "dr"}]}}
    )
    backup = wait_for(
        "the older backup copied to the new replica",
        lambda: (b := get_backup(custom, namespace, "before"))["status"]["replication"] == "2/2" and b,
        120,
    )
    assert backup["status"]["replication"] == "2/2"
    assert objects_match(env, backup) >= 1


def test_storage_status_follows_its_server_down_and_back(
    custom: client.CustomObjectsApi, core: client.CoreV1Api, env: dict[str, str], namespace: str
) -> None:
    pair(custom, core, env, namespace)
    with stopped_s3("replica"):
        st = wait_for(
            "dr Unavailable while its server is down",
            lambda: (s := storage_status(custom, namespace, "dr")).get("phase") == "Unavailable" and s,
            90,
        )
        assert "cannot connect" in st["message"]
        wait_for(
            "the primary to show its replica down",
            lambda: (
                [r["state"] for r in storage_status(custom, namespace, "s3").get("replicas", [])]
                == ["Unavailable"]
            ),
            90,
        )
    wait_for("dr Ready again", lambda: storage_status(custom, namespace, "dr").get("phase") == "Ready", 90)
