"""``nightjar agent backup``: take one snapshot (pg_dump + files) into object storage.

Runs inside the backup Job. It never talks to the Kubernetes API: its result goes back through
the container's termination message (and the manifest in the bucket). Order of work:

1. check the bucket answers;
2. stream ``pg_dump -Fc -O -x`` into ``db.dump`` (multipart, sha256 on the fly, header parsed
   from the first bytes for the server and pg_dump versions);
3. walk the files (PVC directory or S3 prefix), packing changed content and reusing unchanged
   content of the previous snapshot;
4. apply Object Lock retention to every object (extending it on reused ones);
5. write ``manifest.json`` last, then read it back and check every object it lists.

Objects are written without retention until step 4, so a failed attempt leaves only
deletable objects under its own prefix, which deleting the Backup removes.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from botocore.exceptions import ClientError

from nightjar.agent import files as filesmod
from nightjar.agent.pgtools import PgClient, PgClientError, find_client, tool_env
from nightjar.domain import pgdump
from nightjar.domain.retention import format_time
from nightjar.storage import layout
from nightjar.storage.s3 import (
    MultipartWriter,
    S3Target,
    StorageError,
    describe_error,
    extend_retention,
)

MANIFEST_FORMAT = 1


class BackupFailed(Exception):
    """The snapshot cannot be taken; the message says why (and never holds a secret)."""


@dataclass
class DatabaseConn:
    """libpq settings: a URI (password split out) or host/port/dbname/user/password."""

    uri: str = ""
    host: str = ""
    port: str = ""
    dbname: str = ""
    user: str = ""
    password: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str]) -> DatabaseConn:
        return cls(
            uri=env.get("NIGHTJAR_DB_URI", ""),
            host=env.get("NIGHTJAR_DB_HOST", ""),
            port=env.get("NIGHTJAR_DB_PORT", ""),
            dbname=env.get("NIGHTJAR_DB_NAME", ""),
            user=env.get("NIGHTJAR_DB_USER", ""),
            password=env.get("NIGHTJAR_DB_PASSWORD", ""),
        )

    def libpq_env(self) -> tuple[dict[str, str], str]:
        """(environment for libpq, display name). The password only ever goes to PGPASSWORD."""
        env: dict[str, str] = {}
        if self.uri:
            u = urllib.parse.urlsplit(self.uri)
            if u.scheme not in ("postgres", "postgresql"):
                raise BackupFailed("database Secret: uri must start with postgresql://")
            env.update(
                PGHOST=u.hostname or "",
                PGPORT=str(u.port or 5432),
                PGDATABASE=urllib.parse.unquote(u.path.lstrip("/")),
                PGUSER=urllib.parse.unquote(u.username or ""),
                PGPASSWORD=urllib.parse.unquote(u.password or ""),
            )
            for k, v in urllib.parse.parse_qsl(u.query):
                if k == "sslmode":
                    env["PGSSLMODE"] = v
        else:
            missing = [k for k in ("host", "dbname", "user") if not getattr(self, k)]
            if missing:
                raise BackupFailed(
                    f"database Secret: missing key(s) {', '.join(missing)} (or give one key uri)"
                )
            env.update(
                PGHOST=self.host,
                PGPORT=self.port or "5432",
                PGDATABASE=self.dbname,
                PGUSER=self.user,
                PGPASSWORD=self.password,
            )
        env["PGCONNECT_TIMEOUT"] = "15"
        return env, f"{env['PGDATABASE']} on {env['PGHOST']}:{env['PGPORT']} as {env['PGUSER']}"


@dataclass
class BackupRequest:
    storage: S3Target
    namespace: str
    backup_name: str
    backup_uid: str
    backup_type: str
    source: str
    attempt: str
    contents: str
    expires: dt.datetime
    lock_mode: str
    db: DatabaseConn
    files_dir: Path | None = None
    files_s3: S3Target | None = None
    previous_manifest: str = ""
    model_version: str = ""
    #: NIGHTJAR_PG_BINDIR: the directory of the pg_dump to run, whatever the server's version.
    pg_bindir: str = ""
    #: NIGHTJAR_PG_ROOT: where the versioned clients are (``<root>/<major>/bin``).
    pg_root: str = ""


def _dump_client(req: BackupRequest, env: dict[str, str], display: str) -> PgClient:
    """pg_dump of the server's major (or NIGHTJAR_PG_BINDIR's)."""
    try:
        return find_client("pg_dump", env, override=req.pg_bindir, root=req.pg_root)
    except PgClientError as e:
        raise BackupFailed(f"pg_dump of {display} failed: {e}") from e


def _dump_database(req: BackupRequest, s3: Any, bucket: str, key: str) -> dict[str, Any]:
    env, display = req.db.libpq_env()
    client = _dump_client(req, env, display)
    pg_dump, version = client.path, client.version
    proc = subprocess.Popen(
        [pg_dump, "-Fc", "-O", "-x", "--no-password"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=tool_env(env),
    )
    stdout, stderr = proc.stdout, proc.stderr
    if stdout is None or stderr is None:
        raise RuntimeError("pg_dump pipes are missing")
    err_lines: list[str] = []

    def drain_stderr() -> None:
        for raw in stderr:
            err_lines.append(raw.decode(errors="replace").rstrip())
            del err_lines[:-20]

    t = threading.Thread(target=drain_stderr, daemon=True)
    t.start()
    head = b""
    try:
        with MultipartWriter(s3, bucket, key) as w:
            while chunk := stdout.read(1024 * 1024):
                if len(head) < 4096:
                    head += chunk[: 4096 - len(head)]
                w.write(chunk)
            code = proc.wait()
            t.join(timeout=10)
            if code != 0:
                detail = next((ln for ln in reversed(err_lines) if ln), f"exit code {code}")
                raise BackupFailed(f"pg_dump of {display} failed: {detail.removeprefix('pg_dump: error: ')}")
    except (ClientError, StorageError) as e:
        proc.kill()
        raise BackupFailed(describe_error(e, f"storage: writing {key}")) from e
    try:
        header = pgdump.parse_header(head)
    except ValueError as e:
        raise BackupFailed(f"pg_dump wrote an unreadable archive: {e}") from e
    return {
        "key": key,
        "bytes": w.size,
        "sha256": w.sha256,
        "pgDumpVersion": header.pg_dump_version or version.rsplit(" ", 1)[-1],
        "serverVersion": header.server_version,
        "archiveVersion": header.archive_version_text,
        "dbname": header.database,
        "pgClient": client.summary(),
    }


def _previous_index(
    s3: Any, bucket: str, manifest_key: str
) -> tuple[Iterator[filesmod.Entry] | None, dict[str, Any]]:
    """The previous snapshot's file index (streamed) and its objects by key."""
    if not manifest_key:
        return None, {}
    try:
        prev = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    except ClientError:
        return None, {}  # gone (expired): simply nothing to reuse
    objects = {o["key"]: o for o in prev.get("objects", [])}
    idx = (prev.get("files") or {}).get("index")
    if not idx:
        return None, objects
    try:
        body = s3.get_object(Bucket=bucket, Key=idx["key"])["Body"]
    except ClientError:
        return None, objects  # its index is gone: upload everything, reuse nothing
    return filesmod.read_index(body), objects


class _S3Source:
    """An S3 prefix of app files, walked in key order and read as streams."""

    def __init__(self, target: S3Target) -> None:
        self.target = target
        self.s3 = target.client()

    def entries(self) -> Iterator[tuple[str, int, int, str]]:
        prefix = self.target.prefix
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.target.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                rel = o["Key"][len(prefix) :]
                if rel and not rel.endswith("/"):
                    yield rel, o["Size"], int(o["LastModified"].timestamp() * 1e9), o["Key"]

    def open(self, key: str) -> IO[bytes]:
        body: IO[bytes] = self.s3.get_object(Bucket=self.target.bucket, Key=key)["Body"]
        return body


def _back_up_s3_files(
    src: _S3Source,
    index_out: filesmod.Sink,
    packer: filesmod.Packer,
    previous: Iterator[filesmod.Entry] | None,
    reused: Any,
) -> filesmod.PackStats:
    """Like files.back_up_tree for an S3 prefix; key order is the index order here."""
    stats = packer.stats
    prev_it = previous
    cur = next(prev_it, None) if prev_it else None
    with gzip.GzipFile(fileobj=index_out, mode="wb") as gz:
        for rel, size, mtime_ns, key in src.entries():
            while cur is not None and cur.path.encode() < rel.encode():
                cur = next(prev_it, None) if prev_it else None
            if (
                cur is not None
                and cur.path == rel
                and cur.size == size
                and cur.mtime_ns == mtime_ns
                and cur.pack
            ):
                entry = filesmod.Entry(rel, "f", 0o644, size, mtime_ns, cur.sha256, cur.pack, cur.offset)
                stats.reused_files += 1
                stats.reused_bytes += size
                reused(cur)
            else:
                pack_key, offset, digest, n = packer.add_stream(src.open(key), size)
                entry = filesmod.Entry(rel, "f", 0o644, n, mtime_ns, digest, pack_key, offset)
            stats.files += 1
            stats.bytes += entry.size
            gz.write(entry.to_json().encode() + b"\n")
    packer.close()
    return stats


def run_backup(req: BackupRequest) -> dict[str, Any]:
    """Take the snapshot; returns the result for the termination message."""
    loc = layout.SnapshotLocation(
        prefix=req.storage.prefix,
        namespace=req.namespace,
        source=req.source,
        backup_uid=req.backup_uid,
        attempt=req.attempt,
    )
    s3 = req.storage.client()
    bucket = req.storage.bucket
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception as e:
        raise BackupFailed(describe_error(e, f"storage: bucket {bucket} at {req.storage.endpoint}")) from e

    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    objects: dict[str, dict[str, Any]] = {}
    database = _dump_database(req, s3, bucket, loc.db_dump)
    pg_client = database.pop("pgClient")  # for the result, not the manifest
    objects[database["key"]] = {
        "key": database["key"],
        "bytes": database["bytes"],
        "sha256": database["sha256"],
    }

    files_summary: dict[str, Any] | None = None
    reused_keys: set[str] = set()
    if req.contents == "Full" and (req.files_dir is not None or req.files_s3 is not None):
        prev_entries, prev_objects = _previous_index(s3, bucket, req.previous_manifest)

        def open_object(n: int) -> tuple[str, MultipartWriter]:
            key = loc.pack(n)
            return key, MultipartWriter(s3, bucket, key)

        def on_object(o: filesmod.StoredObject) -> None:
            objects[o.key] = {"key": o.key, "bytes": o.size, "sha256": o.sha256}

        def reused(e: filesmod.Entry) -> None:
            if e.pack not in objects:
                if e.pack not in prev_objects:
                    raise BackupFailed(f"previous snapshot's manifest does not list {e.pack}")
                objects[e.pack] = prev_objects[e.pack]
                reused_keys.add(e.pack)

        packer = filesmod.Packer(open_object=open_object, on_object=on_object)
        try:
            with MultipartWriter(s3, bucket, loc.files_index) as idx:
                if req.files_dir is not None:
                    if not req.files_dir.is_dir():
                        raise BackupFailed(f"files: {req.files_dir} is not a directory in the volume")
                    stats = filesmod.back_up_tree(
                        req.files_dir, idx, packer, filesmod.PreviousIndex(prev_entries), reused
                    )
                elif req.files_s3 is not None:
                    stats = _back_up_s3_files(_S3Source(req.files_s3), idx, packer, prev_entries, reused)
        except PermissionError as e:
            raise BackupFailed(f"files: permission denied reading {e.filename}") from e
        except ClientError as e:
            raise BackupFailed(describe_error(e, "storage or files bucket")) from e
        objects[loc.files_index] = {"key": loc.files_index, "bytes": idx.size, "sha256": idx.sha256}
        files_summary = {
            "index": objects[loc.files_index],
            "count": stats.files,
            "bytes": stats.bytes,
            "dirs": stats.dirs,
            "reusedFiles": stats.reused_files,
            "reusedBytes": stats.reused_bytes,
            "uploadedBytes": stats.uploaded_bytes,
        }

    # Retention: own objects get it now; reused ones are extended to this snapshot's expiry.
    if req.lock_mode in ("Governance", "Compliance"):
        for key in objects:
            try:
                extend_retention(s3, bucket, key, req.lock_mode, req.expires)
            except ClientError as e:
                raise BackupFailed(
                    describe_error(e, f"storage: setting Object Lock retention on {key}")
                ) from e

    size = database["bytes"] + (files_summary["bytes"] if files_summary else 0)
    manifest = {
        "formatVersion": MANIFEST_FORMAT,
        "snapshotId": req.attempt,
        "backup": {
            "namespace": req.namespace,
            "name": req.backup_name,
            "uid": req.backup_uid,
            "type": req.backup_type,
        },
        "source": req.source,
        "contents": req.contents,
        "createdOn": format_time(created),
        "expiresOn": format_time(req.expires),
        "modelVersion": req.model_version,
        "sizeUncompressedBytes": size,
        "database": database,
        "files": files_summary,
        "objects": sorted(objects.values(), key=lambda o: o["key"]),
    }
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    digest = hashlib.sha256(body).hexdigest()
    lock: dict[str, Any] = {}
    if req.lock_mode in ("Governance", "Compliance"):
        lock = {"ObjectLockMode": req.lock_mode.upper(), "ObjectLockRetainUntilDate": req.expires}
    try:
        s3.put_object(Bucket=bucket, Key=loc.manifest, Body=body, ContentType="application/json", **lock)
        _verify(s3, bucket, loc.manifest, digest, manifest["objects"])
    except ClientError as e:
        raise BackupFailed(describe_error(e, f"storage: writing the manifest {loc.manifest}")) from e

    return {
        "snapshotId": req.attempt,
        "manifestKey": loc.manifest,
        "manifestSha256": digest,
        "createdOn": manifest["createdOn"],
        "sizeUncompressedBytes": size,
        "database": {k: database[k] for k in ("bytes", "pgDumpVersion", "serverVersion")},
        "pgClient": pg_client,
        "files": {
            "count": files_summary["count"],
            "bytes": files_summary["bytes"],
            "reusedFiles": files_summary["reusedFiles"],
        }
        if files_summary
        else None,
        "objects": len(objects),
    }


def _verify(s3: Any, bucket: str, manifest_key: str, digest: str, objects: list[dict[str, Any]]) -> None:
    """Read the manifest back and check every object it lists exists with its size."""
    back = s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
    if hashlib.sha256(back).hexdigest() != digest:
        raise BackupFailed("verification: the manifest read back differs from what was written")
    for o in objects:
        try:
            head = s3.head_object(Bucket=bucket, Key=o["key"])
        except ClientError as e:
            raise BackupFailed(f"verification: {o['key']} is missing") from e
        if head["ContentLength"] != o["bytes"]:
            raise BackupFailed(
                f"verification: {o['key']} has {head['ContentLength']} bytes, expected {o['bytes']}"
            )
