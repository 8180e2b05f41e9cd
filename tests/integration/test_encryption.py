"""Client-side encryption on the real stack: nothing readable in the bucket, identical restores
(also across namespaces, where the Job gets the data keys of one snapshot and never the key),
key rotation, wrong and missing keys."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from kubernetes import client

from nightjar.storage.crypto import KeyRing, new_key_text
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
    wait_terminal,
)
from tests.integration.test_restore import cli, restore_body, tree, wait_restore

MARKER = "NJ-MARKER-4f1c9e2a"
FILE_NAME = "contract-of-acme-NJ-NAME-77b1.pdf"


def encrypted_storage(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    ns: str,
    keys: dict[str, str],
    allow: list[str] | None = None,
) -> None:
    core.create_namespaced_secret(ns, {"metadata": {"name": "backup-keys"}, "stringData": keys})
    storage = make_storage(custom, core, env, ns)
    patch: dict[str, Any] = {"encryption": {"keySecretRef": {"name": "backup-keys"}}}
    if allow:
        patch["allowedRestoreNamespaces"] = allow
    custom.patch_namespaced_custom_object(
        G, V, ns, "backupstorages", storage["metadata"]["name"], {"spec": patch}
    )


def raw_objects(s3: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def set_keys(core: client.CoreV1Api, ns: str, keys: dict[str, str]) -> None:
    core.replace_namespaced_secret(
        "backup-keys", ns, {"metadata": {"name": "backup-keys"}, "stringData": keys}
    )


def test_encrypted_backups_hide_everything_and_restore_identically_across_namespaces(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    acceptance: Env,
    s3: Any,
) -> None:
    key1 = new_key_text()
    encrypted_storage(custom, core, env, namespace, {"key-1": key1}, allow=[acceptance.ns])
    psql(env, app_db, f"update customers set name = '{MARKER}' where id = 1")
    (files_pvc / FILE_NAME).write_text(f"the content is {MARKER}\n" * 100)
    st = take_backup(custom, namespace, backup_body("enc"))

    # Every stored object, read raw: no row, no file content, no file name.
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    stored = raw_objects(s3, bucket, f"tests/{namespace}/")
    assert len(stored) >= 2
    for key, data in stored.items():
        assert MARKER.encode() not in data, key
        assert FILE_NAME.encode() not in data and b"contract-of-acme" not in data, key
        assert base64.b64decode(key1) not in data, key
    public = PublicManifest.parse(stored[st["storage"]["manifestKey"]])
    assert public.key_ids() == {"1"}

    # Restored across namespaces: identical rows and files; the Job never had the key Secret.
    expected_files = tree(files_pvc)
    custom.create_namespaced_custom_object(
        G,
        V,
        acceptance.ns,
        "restores",
        restore_body(
            "from-enc",
            "enc",
            namespace,
            target={"files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}},
        ),
    )
    rst = wait_restore(custom, acceptance.ns, "from-enc")
    assert rst["phase"] == "Completed", rst.get("message")
    assert psql(env, acceptance.db, TABLE_CHECKSUMS) == psql(env, app_db, TABLE_CHECKSUMS)
    assert tree(acceptance.files) == expected_files
    job = batch.read_namespaced_job("nightjar-restore-from-enc", acceptance.ns)
    pod = job.spec.template.spec
    assert not any((v.secret and v.secret.secret_name == "backup-keys") for v in pod.volumes or [])
    secrets = {s.metadata.name for s in core.list_namespaced_secret(acceptance.ns).items}
    assert "backup-keys" not in secrets

    # Rotation: key 2 becomes current; the next backup uses it; both snapshots restore while the
    # Secret holds both keys; without key 1 the old one fails naming the key id.
    key2 = new_key_text()
    set_keys(core, namespace, {"key-1": key1, "key-2": key2, "current": "2"})
    (files_pvc / "after-rotation.txt").write_text("new")
    st2 = take_backup(custom, namespace, backup_body("enc2"))
    ids2 = PublicManifest.parse(
        s3.get_object(Bucket=bucket, Key=st2["storage"]["manifestKey"])["Body"].read()
    )
    assert "2" in ids2.key_ids()  # new objects under key 2 (unchanged content still under key 1)
    for name, backup in (("r1", "enc"), ("r2", "enc2")):
        custom.create_namespaced_custom_object(G, V, namespace, "restores", restore_body(name, backup))
        done = wait_restore(custom, namespace, name)
        assert done["phase"] == "Completed", (name, done.get("message"))
    # Which keys live snapshots still need: both (the second shares content stored under key 1).
    out = cli(env, "keys", "status", "--storage", "s3", "-n", namespace)
    assert out.returncode == 0, out.stderr
    rows = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines()[3:]}
    assert rows["1"][1:3] == ["yes", "2"], out.stdout  # in the Secret, needed by both snapshots
    assert rows["2"][1:4] == ["yes", "yes", "1"], out.stdout  # current, needed by the second
    print(out.stdout)  # the README shows this

    set_keys(core, namespace, {"key-2": key2})
    missing = cli(env, "keys", "status", "--storage", "s3", "-n", namespace)
    assert missing.returncode == 1 and "MISSING" in missing.stdout, missing.stdout + missing.stderr
    custom.create_namespaced_custom_object(G, V, namespace, "restores", restore_body("r3", "enc"))
    failed = wait_restore(custom, namespace, "r3")
    assert failed["phase"] == "Failed"
    assert "backup-keys" in failed["message"] and "key id 1" in failed["message"], failed["message"]
    assert failed["targetState"] == "Unchanged"
    assert key1 not in failed["message"] and key2 not in failed["message"]

    # The same id with other bytes (a wrong key): refused, naming the Secret and the id.
    set_keys(core, namespace, {"key-1": new_key_text(), "key-2": key2, "current": "2"})
    custom.create_namespaced_custom_object(G, V, namespace, "restores", restore_body("r4", "enc"))
    wrong = wait_restore(custom, namespace, "r4")
    assert wrong["phase"] == "Failed"
    assert "key id 1" in wrong["message"] and "backup-keys" in wrong["message"], wrong["message"]


def test_a_missing_key_secret_fails_the_backup_naming_it(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
) -> None:
    storage = make_storage(custom, core, env, namespace)
    custom.patch_namespaced_custom_object(
        G,
        V,
        namespace,
        "backupstorages",
        storage["metadata"]["name"],
        {"spec": {"encryption": {"keySecretRef": {"name": "no-such-keys"}}}},
    )
    custom.create_namespaced_custom_object(G, V, namespace, "backups", backup_body("nokeys"))
    st = wait_terminal(custom, namespace, "nokeys", timeout=240)["status"]
    assert st["phase"] == "Failed"
    assert "no-such-keys" in st["message"], st["message"]


def test_one_flipped_byte_anywhere_fails_the_restore_and_changes_nothing(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    s3: Any,
) -> None:
    keys = {"key-1": new_key_text()}
    encrypted_storage(custom, core, env, namespace, keys)
    st = take_backup(custom, namespace, backup_body("victim"))
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    ring = KeyRing.from_data("backup-keys", keys)
    reader = SnapshotReader(s3, bucket, st["storage"]["manifestKey"], keyring=ring)
    assert reader.m.database is not None and reader.m.files is not None
    a_file = next(e for e in reader.entries() if e.type == "f" and e.size > 0)
    targets = {
        "the dump": reader.m.database.dump.chunks[-1],
        "the index": reader.m.files.index.chunks[0],
        "a file": (a_file.chunks or [])[0],
    }
    psql(env, app_db, "update customers set name = 'after the backup'")
    rows = psql(env, app_db, TABLE_CHECKSUMS)
    files = tree(files_pvc)
    (files_pvc / "after-backup.txt").write_text("not in the backup")
    files_after = tree(files_pvc)

    def flipped(key: str, at: int) -> None:
        data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[at] ^= 0x01
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    docs = {"files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}}
    for n, (what, ref) in enumerate([*targets.items(), ("the manifest", None)]):
        key = ref.pack if ref else st["storage"]["manifestKey"]
        original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        flipped(key, ref.offset + ref.stored // 2 if ref else len(original) // 2)
        custom.create_namespaced_custom_object(
            G, V, namespace, "restores", restore_body(f"t{n}", "victim", target=docs)
        )
        out = wait_restore(custom, namespace, f"t{n}")
        s3.put_object(Bucket=bucket, Key=key, Body=original)
        message = out["message"]
        assert out["phase"] == "Failed", what
        assert out["targetState"] == "Unchanged", (what, message)
        assert key.rsplit("/", 1)[-1] in message or "manifest" in message, (what, message)  # names it
        assert psql(env, app_db, TABLE_CHECKSUMS) == rows, what  # nothing committed
        assert tree(files_pvc) == files_after, what  # nothing staged is left, nothing replaced
    assert files != files_after
