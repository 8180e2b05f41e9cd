"""The `nightjar` command on the real stack: download and upload of Mendix-format archives,
uploaded Backups, `backup create|list`, `restore`. The command runs as a subprocess with the
stack's kubeconfig, as a person runs it; nothing is mocked."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar import archive
from nightjar.storage import packs
from nightjar.storage.objects import S3Target
from nightjar.storage.snapshot import SnapshotReader
from nightjar.transfer import upload
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
from tests.support import wait_for

NIGHTJAR = Path(sys.executable).parent / "nightjar"


def cli(
    env: dict[str, str], *args: str, cwd: Path | None = None, ok: bool = True, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `nightjar ARGS` as a person would (their KUBECONFIG, no terminal)."""
    proc = subprocess.run(
        [str(NIGHTJAR), *args],
        env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
        cwd=cwd,
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr.decode()
    else:
        assert proc.returncode == 1, (proc.returncode, proc.stderr.decode())
    return proc


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def regular_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def tree_of(archive_members: dict[str, bytes]) -> dict[str, bytes]:
    return {k.removeprefix("tree/"): v for k, v in archive_members.items() if k.startswith("tree/")}


def pg_restore_list(env: dict[str, str], dump: Path) -> str:
    return subprocess.run(
        [os.path.join(env["NIGHTJAR_PG_BINDIR"], "pg_restore"), "--list", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def uploads_prefix(ns: str) -> str:
    return f"tests/{ns}/nightjar/v1/{ns}/uploaded/"


def stored_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Every object version and delete marker, and every unfinished multipart upload, under prefix."""
    out = s3.list_object_versions(Bucket=bucket, Prefix=prefix)
    keys = [v["Key"] for v in out.get("Versions", []) + out.get("DeleteMarkers", [])]
    keys += [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]
    return keys


def app_with_model(core: client.CoreV1Api, ns: str, version: str) -> None:
    client.AppsV1Api(core.api_client).create_namespaced_deployment(
        ns,
        {
            "metadata": {"name": "shop", "annotations": {"nightjar.dev/model-version": version}},
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


def pg_dump(env: dict[str, str], db: str, out: Path, *extra: str) -> Path:
    subprocess.run(
        [
            os.path.join(env["NIGHTJAR_PG_BINDIR"], "pg_dump"),
            *extra,
            "-f",
            str(out),
            env["NIGHTJAR_PG_DSN"].rsplit("/", 1)[0] + f"/{db}",
        ],
        check=True,
        capture_output=True,
    )
    return out


def test_a_downloaded_archive_is_valid_mendix_and_uploads_back_to_the_same_content(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    s3: Any,
    tmp_path: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    app_with_model(core, namespace, "10.4.1.33")
    body = backup_body("first")
    body["spec"]["source"]["app"] = {"name": "shop"}
    st = take_backup(custom, namespace, body)
    stamp = st["createdOn"][:16].replace("-", "").replace("T", "").replace(":", "")

    # Full, under Mendix's default name: .metadata, db/db.backup, tree/ with the PVC's files.
    out = cli(env, "download", "first", "-n", namespace, cwd=tmp_path)
    full = tmp_path / f"first-{stamp}.tar.gz"
    assert full.is_file(), out.stderr.decode()
    assert not list(tmp_path.glob("*.part"))
    stderr = out.stderr.decode()
    assert f"Backup {namespace}/first (Full, 307 files)" in stderr
    assert "not in the archive: 1 empty directory and 1 symlink" in stderr
    info = archive.inspect(io.BytesIO(full.read_bytes()))
    assert (info.kind, info.files, info.dump_size) == ("Full", 307, st["database"]["bytes"])
    got = members(full.read_bytes())
    meta = json.loads(got[".metadata"])
    assert meta["modelVersion"] == "10.4.1.33"
    assert meta["dumpSize"] == str(st["database"]["bytes"])
    assert all(isinstance(v, str) for v in meta.values())
    (tmp_path / "db.backup").write_bytes(got["db/db.backup"])
    toc = pg_restore_list(env, tmp_path / "db.backup")
    assert "TABLE DATA public customers" in toc and "TABLE DATA public orders" in toc
    assert tree_of(got) == regular_files(files_pvc)

    # Database only: the bare custom-format dump, the same bytes as db/db.backup.
    cli(env, "download", "first", "-n", namespace, "--database-only", cwd=tmp_path)
    bare = (tmp_path / f"database-first-{stamp}.backup").read_bytes()
    assert bare == got["db/db.backup"] and bare.startswith(b"PGDMP")

    # Files only, to stdout: tree/ and nothing else.
    files_only = cli(env, "download", "first", "-n", namespace, "--files-only", "-o", "-").stdout
    assert set(members(files_only)) == {k for k in got if k.startswith("tree/")}
    assert tree_of(members(files_only)) == tree_of(got)

    # Upload the full archive: a Completed Uploaded Backup with the archive's details.
    out = cli(
        env, "upload", str(full), "--storage", "s3", "-n", namespace, "--name", "back", "--comment", "rt"
    )
    assert "backup.nightjar.dev/back created: Full archive" in out.stdout.decode()
    assert "backup.nightjar.dev/back Completed" in out.stdout.decode()
    up = get_backup(custom, namespace, "back")
    ust = up["status"]
    assert "source" not in up["spec"]
    assert (up["spec"]["type"], up["spec"]["contents"], ust["phase"]) == ("Uploaded", "Full", "Completed")
    assert ust["modelVersion"] == "10.4.1.33"
    assert ust["sourceId"] == "uploaded"
    assert ust["database"]["bytes"] == st["database"]["bytes"]
    assert ust["database"]["serverVersion"] == st["database"]["serverVersion"]
    assert ust["files"] == {"count": 307, "bytes": sum(len(v) for v in tree_of(got).values())}
    assert ust["sizeUncompressedBytes"] == ust["database"]["bytes"] + ust["files"]["bytes"]
    assert ust["expiresOn"] == up["metadata"]["annotations"]["nightjar.dev/expires-at"]
    assert ust["storage"]["manifestKey"].startswith(uploads_prefix(namespace))

    # Its download holds exactly what was uploaded.
    again = cli(env, "download", "back", "-n", namespace, "-o", "-").stdout
    again_members = members(again)
    assert again_members["db/db.backup"] == got["db/db.backup"]
    assert tree_of(again_members) == tree_of(got)
    assert json.loads(again_members[".metadata"])["modelVersion"] == "10.4.1.33"

    # Deleting it deletes its objects.
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    assert stored_keys(s3, bucket, uploads_prefix(namespace))
    custom.delete_namespaced_custom_object(G, V, namespace, "backups", "back")
    wait_for("uploaded backup deleted", lambda: backup_gone(custom, namespace, "back"), 60)
    assert stored_keys(s3, bucket, uploads_prefix(namespace)) == []


def test_a_hand_made_mendix_archive_and_a_bare_dump_upload_into_locked_storage(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    s3: Any,
    tmp_path: Path,
) -> None:
    """Built by the documented layout with the usual tools: pg_dump -Fc -O -x, a .metadata of
    strings, tree/<aa>/<bb>/<uuid>, GNU tar (which stores tree/ in directory order, not sorted)."""
    make_storage(
        custom, core, env, namespace, name="locked", bucket_key="NIGHTJAR_S3_BUCKET_LOCKED", lock="Compliance"
    )
    root = tmp_path / "mx"
    (root / "db").mkdir(parents=True)
    dump = pg_dump(env, app_db, root / "db" / "db.backup", "-Fc", "-O", "-x")
    docs: dict[str, bytes] = {}
    for i in range(60):
        u = str(uuid.uuid4())
        data = os.urandom(5 * 1024 * 1024) if i == 7 else os.urandom(100 + i * 37)
        p = root / "tree" / u[:2] / u[2:4] / u
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        docs[f"{u[:2]}/{u[2:4]}/{u}"] = data
    meta = {
        "duration": "3",
        "dumpSize": str(dump.stat().st_size),
        "modelVersion": "1.0.0.40",
        "databaseSize": "9730584",
        "filesSize": str(sum(len(d) for d in docs.values())),
    }
    (root / ".metadata").write_text(json.dumps(meta))
    tgz = tmp_path / "mendix.tar.gz"
    subprocess.run(["tar", "-czf", str(tgz), "-C", str(root), "."], check=True)

    cli(env, "upload", str(tgz), "--storage", "locked", "-n", namespace, "--name", "from-mendix")
    st = get_backup(custom, namespace, "from-mendix")["status"]
    assert (st["phase"], st["modelVersion"], st["files"]["count"]) == ("Completed", "1.0.0.40", 60)
    assert st["database"]["bytes"] == dump.stat().st_size
    got = members(cli(env, "download", "from-mendix", "-n", namespace, "-o", "-").stdout)
    assert got["db/db.backup"] == dump.read_bytes()
    assert tree_of(got) == docs
    # (archive order follows storage order: one sequential GET per pack, see transfer/order.py)

    # Every object is locked until the backup expires.
    bucket = env["NIGHTJAR_S3_BUCKET_LOCKED"]
    expires = get_backup(custom, namespace, "from-mendix")["metadata"]["annotations"][
        "nightjar.dev/expires-at"
    ]
    manifest_key = st["storage"]["manifestKey"]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    for key in [manifest_key] + [o["key"] for o in manifest["objects"]]:
        ret = s3.get_object_retention(Bucket=bucket, Key=key)["Retention"]
        assert ret["Mode"] == "COMPLIANCE", key
        assert ret["RetainUntilDate"].strftime("%Y-%m-%dT%H:%M:%SZ") == expires, key

    # A bare custom-format dump is a Database-only upload; stdin works too.
    cli(
        env,
        "upload",
        "-",
        "--storage",
        "locked",
        "-n",
        namespace,
        "--name",
        "db-only",
        stdin=dump.read_bytes(),
    )
    b = get_backup(custom, namespace, "db-only")
    assert (b["spec"]["contents"], b["status"]["phase"], b["status"]["files"]["count"]) == (
        "DatabaseOnly",
        "Completed",
        0,
    )
    bare = cli(env, "download", "db-only", "-n", namespace, "--database-only", "-o", "-").stdout
    assert bare == dump.read_bytes()
    (tmp_path / "again.backup").write_bytes(bare)
    assert "TABLE DATA public orders" in pg_restore_list(env, tmp_path / "again.backup")
    refused = cli(env, "download", "db-only", "-n", namespace, "--files-only", "-o", "-", ok=False)
    assert 'Backup "db-only" has no files' in refused.stderr.decode()


@contextlib.contextmanager
def small_packs() -> Iterator[None]:
    """Packs of 4 KiB: stored while the archive streams, before its end is read."""
    old = packs.PACK_TARGET
    packs.PACK_TARGET = 4096
    try:
        yield
    finally:
        packs.PACK_TARGET = old


def test_bad_archives_are_refused_and_leave_nothing_behind(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    s3: Any,
    tmp_path: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("src"))
    full = cli(env, "download", "src", "-n", namespace, "-o", "-").stdout
    files_only = cli(env, "download", "src", "-n", namespace, "--files-only", "-o", "-").stdout
    dump = pg_dump(env, app_db, tmp_path / "x.backup", "-Fc", "-O", "-x").read_bytes()
    plain_sql = pg_dump(env, app_db, tmp_path / "x.sql", "-Fp").read_bytes()
    sql_inside = io.BytesIO()
    archive.write_archive(
        sql_inside,
        meta=archive.metadata(model_version="1", dump_size=len(plain_sql), database_size=0, files_size=0),
        dump=(len(plain_sql), io.BytesIO(plain_sql)),
        files=[],
    )
    cases = {
        # Cut inside the files: the dump (first in the archive) was already stored when this is found.
        "truncated.tar.gz": (full[: len(full) * 6 // 10], "the archive is damaged or truncated"),
        "files.tar.gz": (files_only, "a files-only archive cannot be uploaded or restored"),
        "photo.png": (b"\x89PNG\r\n\x1a\n" + os.urandom(5000), "neither a Mendix .tar.gz archive nor a"),
        "cut.backup": (dump[: len(dump) * 8 // 10], "the database dump is truncated"),
        "sql.tar.gz": (sql_inside.getvalue(), "db/db.backup is not a pg_dump custom-format dump"),
        "corrupt.tar.gz": (full[:5000] + bytes(b ^ 0x5A for b in full[5000:9000]) + full[9000:], "damaged"),
    }
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]

    # In-process with a real store: the truncated archive's first pack was stored before the cut
    # was found (a small pack target makes it so), and all of it was deleted again.
    store = S3Target(
        env["NIGHTJAR_S3_ENDPOINT"],
        bucket,
        "us-east-1",
        env["NIGHTJAR_S3_ACCESS_KEY"],
        env["NIGHTJAR_S3_SECRET_KEY"],
    ).store()
    writes: list[str] = []
    store.s3.meta.events.register(
        "after-call.s3.PutObject", lambda event_name, **_: writes.append(event_name)
    )
    with pytest.raises(archive.ArchiveError, match="damaged or truncated"), small_packs():
        upload.store(
            store,
            f"tests/{namespace}",
            io.BytesIO(cases["truncated.tar.gz"][0]),
            namespace=namespace,
            name="bad",
            file_name="truncated.tar.gz",
            now=dt.datetime.now(dt.UTC),
        )
    assert writes.count("after-call.s3.PutObject") >= 1, writes  # at least one pack was written
    assert stored_keys(s3, bucket, uploads_prefix(namespace)) == []

    for name, (data, message) in cases.items():
        f = tmp_path / name
        f.write_bytes(data)
        out = cli(env, "upload", str(f), "--storage", "s3", "-n", namespace, "--name", "bad", ok=False)
        err = out.stderr.decode()
        assert err.startswith("Error: not a valid archive: "), (name, err)
        assert message in err, (name, err)
        assert "Traceback" not in err
        assert stored_keys(s3, bucket, uploads_prefix(namespace)) == [], name
    assert [
        b["metadata"]["name"]
        for b in custom.list_namespaced_custom_object(G, V, namespace, "backups")["items"]
    ] == ["src"]


def test_backup_create_waits_for_the_result_and_backup_list_shows_it(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    out = cli(
        env,
        "backup",
        "create",
        "by-cli",
        "--storage",
        "s3",
        "--database-secret",
        "db",
        "--files-claim",
        "files",
        "--files-path",
        "docs",
        "--comment",
        "before the upgrade",
        "-n",
        namespace,
        "--wait",
    )
    text = out.stdout.decode()
    assert "backup.nightjar.dev/by-cli created" in text
    assert "backup.nightjar.dev/by-cli Completed: snapshot" in text
    b = get_backup(custom, namespace, "by-cli")
    assert b["spec"]["source"]["files"] == {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}
    assert b["status"]["files"]["count"] == 307

    # A name is made up when none is given; without --wait the command returns at once.
    out = cli(
        env,
        "backup",
        "create",
        "--storage",
        "s3",
        "--database-secret",
        "db",
        "--database-only",
        "-n",
        namespace,
    )
    made_up = out.stdout.decode().split()[0].removeprefix("backup.nightjar.dev/")
    assert made_up.startswith("backup-")
    wait_terminal(custom, namespace, made_up)

    listing = cli(env, "backup", "list", "-n", namespace).stdout.decode().splitlines()
    assert listing[0].split() == [
        "NAME",
        "STATUS",
        "TYPE",
        "CREATED",
        "EXPIRES",
        "SIZE(MB)",
        "MODEL",
        "COMMENT",
    ]
    row = next(ln for ln in listing if ln.startswith("by-cli "))
    st = b["status"]
    assert row.split()[:6] == [
        "by-cli",
        "Completed",
        "OnDemand",
        st["createdOn"],
        st["expiresOn"],
        st["sizeUncompressedMB"],
    ]
    assert row.endswith("before the upgrade")
    assert len(listing) == 3

    everywhere = cli(env, "backup", "list", "-A").stdout.decode().splitlines()
    assert everywhere[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert any(ln.split()[:3] == [namespace, "by-cli", "Completed"] for ln in everywhere)

    # As a kubectl plugin, with the namespace from the kubeconfig's context.
    kubeconfig = Path(env["KUBECONFIG"]).read_text()
    ctx_config = Path(env["NIGHTJAR_STATE_DIR"]) / f"kubeconfig-{namespace}"
    ctx_config.write_text(kubeconfig)
    subprocess.run(
        [
            env["NIGHTJAR_KUBECTL"],
            "--kubeconfig",
            str(ctx_config),
            "config",
            "set-context",
            "--current",
            f"--namespace={namespace}",
        ],
        check=True,
        capture_output=True,
    )
    try:
        plugin = subprocess.run(
            [env["NIGHTJAR_KUBECTL"], "nightjar", "backup", "list"],
            env={
                **os.environ,
                "KUBECONFIG": str(ctx_config),
                "PATH": f"{NIGHTJAR.parent}:{os.environ['PATH']}",
            },
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        ctx_config.unlink()
    assert any(ln.startswith("by-cli ") for ln in plugin.splitlines())

    failed = cli(
        env,
        "backup",
        "create",
        "no-db",
        "--storage",
        "s3",
        "--database-secret",
        "db",
        "-n",
        "no-such-namespace",
        ok=False,
    )
    assert 'Error: Kubernetes API: namespaces "no-such-namespace" not found' in failed.stderr.decode()


@pytest.fixture
def other_namespace(core: client.CoreV1Api) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"nightjar.dev/test": "true"}}})
    yield name
    core.delete_namespace(name)


def uploaded_body(name: str, storage: str, key: str, sha: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "Backup",
        "metadata": {"name": name},
        "spec": {
            "storageRef": {"name": storage},
            "type": "Uploaded",
            "upload": {"manifestKey": key, "manifestSha256": sha},
        },
    }


def test_an_uploaded_backup_may_only_use_its_own_namespaces_upload(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    other_namespace: str,
    app_db: str,
    s3: Any,
    tmp_path: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    dump = pg_dump(env, app_db, tmp_path / "db.backup", "-Fc", "-O", "-x")
    cli(env, "upload", str(dump), "--storage", "s3", "-n", namespace, "--name", "mine")
    up = get_backup(custom, namespace, "mine")
    key, sha = up["spec"]["upload"]["manifestKey"], up["spec"]["upload"]["manifestSha256"]
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    before = stored_keys(s3, bucket, uploads_prefix(namespace))
    assert len(before) == 2  # db.dump and manifest.json

    # Another namespace, with a storage on the same bucket and prefix, cannot adopt it.
    make_storage(custom, core, env, other_namespace)
    custom.patch_namespaced_custom_object(
        G, V, other_namespace, "backupstorages", "s3", {"spec": {"prefix": f"tests/{namespace}"}}
    )
    custom.create_namespaced_custom_object(
        G, V, other_namespace, "backups", uploaded_body("stolen", "s3", key, sha)
    )
    st = wait_terminal(custom, other_namespace, "stolen", 60)["status"]
    assert st["phase"] == "Failed"
    assert f"spec.upload.manifestKey '{key}' is not allowed" in st["message"]
    refused = cli(env, "download", "stolen", "-n", other_namespace, "-o", "-", ok=False)
    assert 'Backup "stolen" is Failed: only a Completed backup can be downloaded' in refused.stderr.decode()

    # Nor can a second Backup of the same namespace take over an upload another one owns.
    custom.create_namespaced_custom_object(
        G, V, namespace, "backups", uploaded_body("copycat", "s3", key, sha)
    )
    st = wait_terminal(custom, namespace, "copycat", 60)["status"]
    assert st["phase"] == "Failed"
    assert st["message"] == f"the uploaded snapshot {key} already belongs to Backup mine"

    # Deleting either refused Backup deletes nothing of the upload.
    for ns, name in ((other_namespace, "stolen"), (namespace, "copycat")):
        custom.delete_namespaced_custom_object(G, V, ns, "backups", name)
        wait_for(f"{name} deleted", lambda ns=ns, name=name: backup_gone(custom, ns, name), 60)
    assert stored_keys(s3, bucket, uploads_prefix(namespace)) == before
    assert (
        cli(env, "download", "mine", "-n", namespace, "--database-only", "-o", "-").stdout
        == dump.read_bytes()
    )

    # The schema says what an Uploaded Backup needs, and keeps it immutable.
    def refusal(body: dict[str, Any]) -> str:
        with pytest.raises(ApiException) as err:
            custom.create_namespaced_custom_object(G, V, namespace, "backups", body)
        return str(json.loads(err.value.body)["message"])

    no_upload = uploaded_body("x1", "s3", key, sha)
    del no_upload["spec"]["upload"]
    assert "spec.upload is required for type Uploaded" in refusal(no_upload)
    with_source = uploaded_body("x2", "s3", key, sha)
    with_source["spec"]["source"] = {"database": {"secretRef": {"name": "db"}}}
    assert "spec.source must not be set for type Uploaded" in refusal(with_source)
    no_source = backup_body("x3")
    del no_source["spec"]["source"]
    assert "spec.source is required (except for type Uploaded)" in refusal(no_source)
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(
            G, V, namespace, "backups", "mine", {"spec": {"upload": {"manifestSha256": "0" * 64}}}
        )
    assert "spec.upload is immutable" in json.loads(err.value.body)["message"]


def test_restore_of_an_uploaded_dump_follows_it_to_completed(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    other_namespace: str,
    app_db: str,
    tmp_path: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    expected = psql(env, app_db, TABLE_CHECKSUMS)
    dump = pg_dump(env, app_db, tmp_path / "db.backup", "-Fc", "-O", "-x")
    cli(env, "upload", str(dump), "--storage", "s3", "-n", namespace, "--name", "known-good")
    psql(
        env,
        app_db,
        f"set role {app_db}; delete from orders where id % 2 = 0; update customers set name = 'x'",
    )
    assert psql(env, app_db, TABLE_CHECKSUMS) != expected

    refused = cli(env, "restore", "known-good", "--to", namespace, "--from-namespace", namespace, ok=False)
    assert "was uploaded and has no source to restore into: give --database-secret" in refused.stderr.decode()

    out = cli(
        env,
        "restore",
        "known-good",
        "--to",
        namespace,
        "--from-namespace",
        namespace,
        "--database-secret",
        "db",
        "--name",
        "back-to-good",
    )
    text = out.stdout.decode()
    assert (
        f"restore.nightjar.dev/back-to-good created in {namespace}: "
        f"Backup {namespace}/known-good into database Secret {namespace}/db"
    ) in text
    assert "restore.nightjar.dev/back-to-good Completed" in text
    assert "restore back-to-good: Completed" in out.stderr.decode()  # plain progress lines off a terminal
    assert psql(env, app_db, TABLE_CHECKSUMS) == expected
    r = custom.get_namespaced_custom_object(G, V, namespace, "restores", "back-to-good")
    assert r["spec"] == {
        "backupRef": {"name": "known-good"},
        "target": {"database": {"secretRef": {"name": "db"}}},
        "contents": "Full",
        "stopApp": True,
    }

    # A Restore that fails exits 1 with its message: another namespace without a grant.
    failed = cli(
        env,
        "restore",
        "known-good",
        "--from-namespace",
        namespace,
        "--to",
        other_namespace,
        "--database-secret",
        "db",
        ok=False,
    )
    err = failed.stderr.decode()
    assert "Error: restore restore-known-good-" in err and " Failed: " in err
    assert "not allowed" in err


def test_downloading_a_damaged_snapshot_fails_and_leaves_no_file(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    s3: Any,
    tmp_path: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    st = take_backup(custom, namespace, backup_body("victim"))
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    reader = SnapshotReader(s3, bucket, st["storage"]["manifestKey"])
    victim = [e for e in reader.entries() if e.type == "f" and e.size > 0][-1]
    where = (victim.chunks or [])[0]
    pack = bytearray(s3.get_object(Bucket=bucket, Key=where.pack)["Body"].read())
    pack[where.offset + where.stored // 2] ^= 1  # one flipped bit in the last file
    s3.put_object(Bucket=bucket, Key=where.pack, Body=bytes(pack))

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = cli(env, "download", "victim", "-n", namespace, "-o", str(out_dir / "v.tar.gz"), ok=False)
    err = out.stderr.decode()
    assert f'Error: the snapshot of Backup "victim" is damaged: file {victim.path}' in err, err
    assert list(out_dir.iterdir()) == []  # no partial archive left behind
