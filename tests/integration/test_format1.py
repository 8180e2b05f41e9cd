"""A format-1 snapshot written by the previous release (0.1.0, commit aa340e3; its objects are in
tests/fixtures/format1) still restores, downloads and replicates with this release."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from nightjar.storage.objects import S3Target
from nightjar.storage.replicate import replicate_snapshot
from nightjar.storage.snapshot import SnapshotReader
from tests.integration.helpers import psql
from tests.support import read_stream

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "format1"


def put_fixture(s3: Any, bucket: str) -> dict[str, Any]:
    expected: dict[str, Any] = json.loads((FIXTURE / "expected.json").read_text())
    root = FIXTURE / "objects"
    for p in sorted(root.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=bucket, Key=str(p.relative_to(root)), Body=p.read_bytes())
    return expected


def target(env: dict[str, str], bucket: str, prefix: str = "") -> S3Target:
    return S3Target(
        env["NIGHTJAR_S3_ENDPOINT"],
        bucket,
        env["NIGHTJAR_S3_REGION"],
        env["NIGHTJAR_S3_ACCESS_KEY"],
        env["NIGHTJAR_S3_SECRET_KEY"],
        prefix,
    )


def test_a_format_1_snapshot_restores_with_this_release(env: dict[str, str], s3: Any, tmp_path: Path) -> None:
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    expected = put_fixture(s3, bucket)
    reader = SnapshotReader(target(env, bucket).store(), expected["manifestKey"], expected["manifestSha256"])
    assert reader.format == 1

    db = f"legacy_{uuid.uuid4().hex[:8]}"
    psql(env, "postgres", f"create database {db}")
    files = tmp_path / "files"
    files.mkdir()
    (files / "stale").write_text("not in the snapshot")
    try:
        run_env = {
            **os.environ,
            "NIGHTJAR_S3_ACCESS_KEY_ID": env["NIGHTJAR_S3_ACCESS_KEY"],
            "NIGHTJAR_S3_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_SECRET_KEY"],
            "NIGHTJAR_DB_URI": env["NIGHTJAR_PG_DSN"].rsplit("/", 1)[0] + f"/{db}",
            "NIGHTJAR_PG_BINDIR": env["NIGHTJAR_PG_BINDIR"],
        }
        out = subprocess.run(
            [
                str(Path(sys.executable).with_name("nightjar")),
                "agent",
                "restore",
                "--endpoint",
                env["NIGHTJAR_S3_ENDPOINT"],
                "--bucket",
                bucket,
                "--manifest-key",
                expected["manifestKey"],
                "--manifest-sha256",
                expected["manifestSha256"],
                "--files-dir",
                str(files),
                "--result-file",
                str(tmp_path / "result.json"),
            ],
            env=run_env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        rows = psql(env, db, expected["tableQuery"]).splitlines()
        got = {r.split("|")[0]: [int(r.split("|")[1]), r.split("|")[2]] for r in rows}
        assert got == expected["tables"]
    finally:
        psql(env, "postgres", f"drop database {db} with (force)")
    tree: dict[str, Any] = {}
    for p in sorted(files.rglob("*")):
        rel = str(p.relative_to(files))
        if p.is_symlink():
            tree[rel] = {"type": "l", "target": os.readlink(p)}
        elif p.is_dir():
            tree[rel] = {"type": "d"}
        else:
            tree[rel] = {
                "type": "f",
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                "mode": oct(p.stat().st_mode & 0o7777),
            }
    assert tree == expected["files"]

    # Downloadable: the reader gives the dump as pg_dump wrote it (gzip inside, archive header).
    dump = read_stream(reader.open_dump())
    assert dump.startswith(b"PGDMP") and len(dump) == reader.database["bytes"]


def test_a_format_1_snapshot_replicates_with_this_release(env: dict[str, str], s3: Any) -> None:
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    expected = put_fixture(s3, bucket)
    replica = S3Target(
        env["NIGHTJAR_S3_REPLICA_ENDPOINT"],
        env["NIGHTJAR_S3_REPLICA_BUCKET_PLAIN"],
        env["NIGHTJAR_S3_REPLICA_REGION"],
        env["NIGHTJAR_S3_REPLICA_ACCESS_KEY"],
        env["NIGHTJAR_S3_REPLICA_SECRET_KEY"],
        "dr/",
    )
    report = replicate_snapshot(
        target(env, bucket).store(),
        "fixture-v1/",
        replica.store(),
        "dr/",
        expected["manifestKey"],
        expected["manifestSha256"],
        None,
    )
    copied = SnapshotReader(
        replica.store(), report.manifest_key, expected["manifestSha256"], rebase=("fixture-v1/", "dr/")
    )
    names = [e.path for e, s in copied.contents(copied.entries()) if s is None or read_stream(s) is not None]
    assert set(names) == set(expected["files"])
