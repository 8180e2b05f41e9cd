"""The backup Job builder: deterministic, least privilege, secrets only by reference."""

from __future__ import annotations

import json
from typing import Any

from nightjar.config import OperatorConfig
from nightjar.jobs import BackupPlan, StorageRef, build_backup_job, job_name

STORAGE = StorageRef.from_spec(
    {
        "endpoint": "https://s3.example",
        "bucket": "bk",
        "region": "eu-west-1",
        "prefix": "p",
        "credentials": {"secretName": "s3creds"},
        "objectLock": {"mode": "Compliance"},
        "tls": {"caSecret": {"name": "ca"}},
    }
)


def plan(**kw: Any) -> BackupPlan:
    base: dict[str, Any] = dict(
        name="nightly-20261124",
        namespace="shop",
        uid="uid-1",
        backup_type="Nightly",
        contents="Full",
        source={
            "database": {"secretRef": {"name": "db"}},
            "files": {"persistentVolumeClaim": {"claimName": "docs", "path": "/files/"}},
        },
        source_id="abc",
        expires="2026-12-08T02:10:00Z",
        storage=STORAGE,
        db_secret="db",
        db_keys=("host", "dbname", "user", "password"),
        previous_manifest="x/manifest.json",
        model_version="1.2",
    )
    base.update(kw)
    return BackupPlan(**base)


def container(job: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return c


def test_job_is_deterministic_owned_and_retried_twice() -> None:
    job = build_backup_job(plan(), OperatorConfig())
    assert job == build_backup_job(plan(), OperatorConfig())
    assert job["metadata"]["name"] == "nightjar-backup-nightly-20261124"
    (owner,) = job["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "nightjar.dev/v1alpha1",
        "kind": "Backup",
        "name": "nightly-20261124",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 6 * 3600
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["labels"]["nightjar.dev/backup"] == "nightly-20261124"


def test_long_names_are_shortened_with_a_hash_and_stay_unique() -> None:
    a, b = job_name("backup", "x" * 80), job_name("backup", "x" * 79 + "y")
    assert len(a) <= 63
    assert a != b


def test_pod_runs_non_root_with_no_token_and_a_read_only_root() -> None:
    job = build_backup_job(plan(), OperatorConfig())
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container(job)["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container(job)["resources"]["limits"]["memory"]


def test_credentials_come_only_from_secret_refs_and_never_appear_in_args() -> None:
    job = build_backup_job(plan(), OperatorConfig())
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["NIGHTJAR_S3_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3creds",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["NIGHTJAR_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "password"}
    assert "NIGHTJAR_DB_URI" not in env
    for e in container(job)["env"]:
        if e["name"].startswith(("NIGHTJAR_S3_", "NIGHTJAR_DB_")):
            assert "value" not in e
    assert "command" not in container(job)  # the image's entrypoint is `nightjar`


def test_args_are_separate_argv_entries_with_the_files_mount_and_attempt_from_the_pod_uid() -> None:
    args = container(build_backup_job(plan(), OperatorConfig()))["args"]
    assert args[:2] == ["agent", "backup"]
    assert args[args.index("--files-dir") + 1] == "/nightjar/files/files"
    assert args[args.index("--attempt") + 1] == "$(NIGHTJAR_POD_UID)"
    assert args[args.index("--lock-mode") + 1] == "Compliance"
    assert args[args.index("--ca-file") + 1] == "/nightjar/storage-ca/ca.crt"
    assert args[args.index("--previous-manifest") + 1] == "x/manifest.json"
    mounts = {
        m["mountPath"]: m for m in container(build_backup_job(plan(), OperatorConfig()))["volumeMounts"]
    }
    assert mounts["/nightjar/files"]["readOnly"] is True


def test_a_hostile_comment_or_name_never_reaches_a_shell() -> None:
    job = build_backup_job(plan(model_version="1; rm -rf / #"), OperatorConfig())
    args = container(job)["args"]
    assert "1; rm -rf / #" in args  # one argv entry, passed verbatim to the agent
    assert "sh" not in json.dumps(job["spec"]["template"]["spec"]["containers"][0].get("command", []))


def test_database_only_mounts_no_files_and_uri_secrets_use_one_key() -> None:
    job = build_backup_job(plan(contents="DatabaseOnly", db_keys=("uri",)), OperatorConfig())
    assert "--files-dir" not in container(job)["args"]
    assert not [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "files"]
    names = [e["name"] for e in container(job)["env"]]
    assert "NIGHTJAR_DB_URI" in names
    assert "NIGHTJAR_DB_HOST" not in names


def test_s3_files_source_gets_its_own_secret_refs() -> None:
    src = {
        "database": {"secretRef": {"name": "db"}},
        "files": {
            "s3": {
                "endpoint": "http://m",
                "bucket": "docs",
                "prefix": "app/",
                "credentials": {"secretName": "files-creds"},
            }
        },
    }
    job = build_backup_job(plan(source=src), OperatorConfig())
    args = container(job)["args"]
    assert args[args.index("--files-s3-bucket") + 1] == "docs"
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["NIGHTJAR_FILES_S3_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "files-creds"


def test_an_encrypting_storage_mounts_its_key_secret_read_only_never_as_env_or_args() -> None:
    enc = StorageRef.from_spec(
        {
            "endpoint": "https://s3.example",
            "bucket": "bk",
            "credentials": {"secretName": "s3creds"},
            "encryption": {"keySecretRef": {"name": "backup-keys"}},
        }
    )
    job = build_backup_job(plan(storage=enc), OperatorConfig())
    c = container(job)
    pod = job["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "keys"]
    assert vol["secret"] == {"secretName": "backup-keys", "defaultMode": 0o400}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "keys"]
    assert mount["readOnly"] is True
    assert c["args"][c["args"].index("--keys-dir") + 1] == mount["mountPath"]
    assert not any(
        e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "backup-keys" for e in c["env"]
    )
    # without encryption: no keys volume, no --keys-dir
    plain = build_backup_job(plan(), OperatorConfig())
    assert "--keys-dir" not in container(plain)["args"]
    assert not [v for v in plain["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys"]


def test_the_backup_job_hands_the_agent_the_record_that_storage_sync_recreates_from() -> None:
    import json

    record = {
        "spec": {"comment": "before $(upgrade); `x`", "type": "Weekly"},
        "labels": {"nightjar.dev/tier": "Weekly"},
    }
    args = build_backup_job(plan(record=record), OperatorConfig())["spec"]["template"]["spec"]["containers"][
        0
    ]["args"]
    # One argv element, never through a shell: a comment with shell syntax is just text, and `$`
    # is escaped from the kubelet's $(VAR) expansion (which turns `$$` back into `$`).
    assert json.loads(args[args.index("--record") + 1].replace("$$", "$")) == record
    assert (
        "--record"
        not in build_backup_job(plan(), OperatorConfig())["spec"]["template"]["spec"]["containers"][0]["args"]
    )
