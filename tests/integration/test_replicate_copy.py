"""The copy itself (storage/replicate.py) between the stack's two real S3 servers: verified,
never half-visible, and incremental."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from nightjar.storage.errors import IntegrityError
from nightjar.storage.objects import Lock, S3Store, S3Target
from nightjar.storage.replicate import SHA_META, replicate_snapshot
from tests.integration.test_replication import s3_of


def store_of(env: dict[str, str], which: str, bucket: str) -> S3Store:
    pre = "NIGHTJAR_S3_" if which == "primary" else "NIGHTJAR_S3_REPLICA_"
    return S3Target(
        env[f"{pre}ENDPOINT"], bucket, "us-east-1", env[f"{pre}ACCESS_KEY"], env[f"{pre}SECRET_KEY"]
    ).store()


def put_snapshot(s3: Any, bucket: str, prefix: str, blobs: dict[str, bytes]) -> tuple[str, str]:
    """A minimal snapshot: objects plus a manifest listing them; returns (manifest key, sha256)."""
    base = f"{prefix}nightjar/v1/ns/src/{uuid.uuid4().hex}/a1/"
    objects = []
    for name, data in blobs.items():
        s3.put_object(Bucket=bucket, Key=base + name, Body=data)
        objects.append({"key": base + name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    body = json.dumps({"objects": objects}).encode()
    s3.put_object(Bucket=bucket, Key=base + "manifest.json", Body=body)
    return base + "manifest.json", hashlib.sha256(body).hexdigest()


@pytest.fixture
def prefixes() -> tuple[str, str]:
    run = uuid.uuid4().hex[:8]
    return f"src-{run}/", f"dst-{run}/"


def test_a_snapshot_is_copied_verified_locked_and_only_once(
    env: dict[str, str], prefixes: tuple[str, str]
) -> None:
    src, dst = s3_of(env, "primary"), s3_of(env, "replica")
    sb, db = env["NIGHTJAR_S3_BUCKET_PLAIN"], env["NIGHTJAR_S3_REPLICA_BUCKET_LOCKED"]
    sp, dp = prefixes
    big = os.urandom(20 * 1024 * 1024)  # more than two multipart parts
    key, sha = put_snapshot(src, sb, sp, {"db.dump": b"dump", "packs/000001.pack": big})
    until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=1)
    source, replica = store_of(env, "primary", sb), store_of(env, "replica", db)
    r = replicate_snapshot(source, sp, replica, dp, key, sha, Lock("Governance", until))
    assert (r.copied_objects, r.skipped_objects) == (3, 0)
    assert r.copied_bytes > len(big)
    got = dst.get_object(Bucket=db, Key=dp + key[len(sp) :].replace("manifest.json", "packs/000001.pack"))
    assert hashlib.sha256(got["Body"].read()).hexdigest() == hashlib.sha256(big).hexdigest()
    assert got["Metadata"][SHA_META] == hashlib.sha256(big).hexdigest()
    ret = dst.get_object_retention(Bucket=db, Key=r.manifest_key)["Retention"]
    assert ret["Mode"] == "GOVERNANCE" and ret["RetainUntilDate"] >= until
    # Again: everything is there already, nothing crosses the wire.
    again = replicate_snapshot(source, sp, replica, dp, key, sha, Lock("Governance", until))
    assert (again.copied_objects, again.skipped_objects, again.copied_bytes) == (0, 3, 0)


def test_a_damaged_object_is_never_visible_in_the_replica(
    env: dict[str, str], prefixes: tuple[str, str]
) -> None:
    src, dst = s3_of(env, "primary"), s3_of(env, "replica")
    sb, db = env["NIGHTJAR_S3_BUCKET_PLAIN"], env["NIGHTJAR_S3_REPLICA_BUCKET_PLAIN"]
    sp, dp = prefixes
    key, sha = put_snapshot(src, sb, sp, {"db.dump": b"good dump", "packs/000001.pack": b"x" * 1000})
    pack = key.replace("manifest.json", "packs/000001.pack")
    src.put_object(Bucket=sb, Key=pack, Body=b"y" * 1000)  # bit rot in the primary
    with pytest.raises(IntegrityError, match=r"packs/000001.pack in the primary is damaged"):
        replicate_snapshot(store_of(env, "primary", sb), sp, store_of(env, "replica", db), dp, key, sha, None)
    for k in (dp + pack[len(sp) :], dp + key[len(sp) :]):
        with pytest.raises(ClientError):
            dst.head_object(Bucket=db, Key=k)  # neither the bad pack nor the manifest landed


def test_a_manifest_that_is_not_the_backups_is_refused(
    env: dict[str, str], prefixes: tuple[str, str]
) -> None:
    src = s3_of(env, "primary")
    sb, db = env["NIGHTJAR_S3_BUCKET_PLAIN"], env["NIGHTJAR_S3_REPLICA_BUCKET_PLAIN"]
    key, _ = put_snapshot(src, sb, prefixes[0], {"db.dump": b"d"})
    with pytest.raises(IntegrityError, match="does not match the Backup's sha256"):
        replicate_snapshot(
            store_of(env, "primary", sb),
            prefixes[0],
            store_of(env, "replica", db),
            prefixes[1],
            key,
            "0" * 64,
            None,
        )
