"""``nightjar agent backup``: take one snapshot (pg_dump + files) into object storage.

Runs inside the backup Job. It never talks to the Kubernetes API: its result goes back through
the container's termination message (and the manifest in the bucket). Order of work:

1. check the bucket answers;
2. stream ``pg_dump -Fc -Z0 -O -x --snapshot=<id>`` (uncompressed: pg_dump's one-threaded gzip was the
   bottleneck) through content-defined chunking; chunks the source's previous snapshot has are
   referenced, new ones are compressed with zstd (and encrypted) into packs on worker threads
   while pg_dump goes on (format 2, :mod:`nightjar.storage.writer`). The dump reads a snapshot
   exported by a ``REPEATABLE READ`` transaction the agent keeps open meanwhile; asked for row
   counts (``--row-counts``), the agent counts each table's rows in that same transaction, so
   they are exactly the dump's (``database.rowCounts`` in the manifest, what a restore drill
   compares with);
3. walk the files (PVC directory or S3 prefix), packing changed content and reusing unchanged
   content of the previous snapshot; the file index is chunked and deduplicated the same way;
4. apply Object Lock retention to every object (extending it on reused ones);
5. write ``manifest.json`` last, then read it back and check every object it lists.

Objects are written without retention until step 4, so a failed attempt leaves only
deletable objects under its own prefix, which deleting the Backup removes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nightjar.agent import files as filesmod
from nightjar.agent.patience import StillUnreachable, storage_probe, wait_for
from nightjar.agent.pgsql import ExportedSnapshot, SqlFailed, wait_for_server
from nightjar.agent.pgtools import PgClient, PgClientError, find_client, probe_psql, tool_env
from nightjar.domain import pgdump
from nightjar.storage import layout
from nightjar.storage.crypto import KeyProblem, KeyRing
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import Database
from nightjar.storage.objects import Lock, ObjectStore, S3Target, StorageError
from nightjar.storage.snapshot import SnapshotReader
from nightjar.storage.writer import IndexWriter, SnapshotWriter

#: pg_dump's output is read in blocks of this size (and cut into chunks by content).
READ_BLOCK = 1024 * 1024


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
    def from_env(cls, env: dict[str, str], prefix: str = "NIGHTJAR_DB") -> DatabaseConn:
        """From ``<prefix>_URI``, ``_HOST``, ``_PORT``, ``_NAME``, ``_USER``, ``_PASSWORD`` (the
        Job fills them from the Secret's keys uri, host, port, dbname, user, password)."""
        return cls(
            uri=env.get(f"{prefix}_URI", ""),
            host=env.get(f"{prefix}_HOST", ""),
            port=env.get(f"{prefix}_PORT", ""),
            dbname=env.get(f"{prefix}_NAME", ""),
            user=env.get(f"{prefix}_USER", ""),
            password=env.get(f"{prefix}_PASSWORD", ""),
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
    #: The Backup's spec and labels (``{"spec": ..., "labels": ...}``), kept in the manifest's
    #: ``backup`` part: what storage sync re-creates the Backup from.
    record: dict[str, Any] = field(default_factory=dict)
    #: NIGHTJAR_PG_BINDIR: the directory of the pg_dump to run, whatever the server's version.
    pg_bindir: str = ""
    #: NIGHTJAR_PG_ROOT: where the versioned clients are (``<root>/<major>/bin``).
    pg_root: str = ""
    #: The storage's key-encryption keys (``spec.encryption``); None: stored unencrypted.
    keyring: KeyRing | None = None
    #: zstd level for everything stored.
    compression_level: int = 3
    #: Count each table's rows in the dump's snapshot into the manifest (source.rowCounts).
    row_counts: bool = False
    #: How long to wait for a database (or bucket) that is not reachable (restarting, failing
    #: over) before the attempt fails.
    db_wait_seconds: float = 300.0


def _dump_client(req: BackupRequest, env: dict[str, str], display: str) -> PgClient:
    """pg_dump of the server's major (or NIGHTJAR_PG_BINDIR's)."""
    try:
        return find_client("pg_dump", env, override=req.pg_bindir, root=req.pg_root)
    except PgClientError as e:
        raise BackupFailed(f"pg_dump of {display} failed: {e}") from e


def psql_beside(client: PgClient) -> str:
    """The psql of the same client major as ``client`` (the one on PATH when it has none)."""
    beside = Path(client.path).parent / "psql"
    return str(beside) if beside.is_file() else (shutil.which("psql") or "psql")


def _export_snapshot(
    req: BackupRequest, client: PgClient, env: dict[str, str], display: str
) -> tuple[ExportedSnapshot | None, str]:
    """The open transaction whose snapshot pg_dump reads; (None, why) when the server cannot export
    one and no row counts were asked for (the dump is then taken as before, in its own snapshot)."""
    session = ExportedSnapshot(psql_beside(client), env)
    try:
        session.open()
    except SqlFailed as e:
        if req.row_counts:
            raise BackupFailed(
                f"row counts of {display}: could not export a snapshot (pg_export_snapshot): {e}"
            ) from e
        return None, f"dump taken without an exported snapshot: {e}"
    return session, ""


def _dump_database(req: BackupRequest, w: SnapshotWriter) -> tuple[Database, dict[str, Any], str]:
    env, display = req.db.libpq_env()
    try:
        psql = probe_psql(override=req.pg_bindir, root=req.pg_root)
        wait_for_server(psql, env, display, req.db_wait_seconds)
    except SqlFailed as e:
        raise BackupFailed(f"pg_dump of {display} failed: {e}") from e
    client = _dump_client(req, env, display)
    session, note = _export_snapshot(req, client, env, display)
    try:
        database = _run_pg_dump(client, env, display, w, session.snapshot_id if session else "")
        if session is not None and req.row_counts:
            try:
                database.row_counts = session.count_rows()
            except SqlFailed as e:
                raise BackupFailed(f"row counts of {display} failed: {e}") from e
    finally:
        if session is not None:
            session.close()
    return database, client.summary(), note


def _run_pg_dump(
    client: PgClient, env: dict[str, str], display: str, w: SnapshotWriter, snapshot_id: str
) -> Database:
    pg_dump, version = client.path, client.version
    argv = [pg_dump, "-Fc", "-Z0", "-O", "-x", "--no-password"]
    if snapshot_id:
        argv.append(f"--snapshot={snapshot_id}")
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=tool_env(env),
    )
    stdout, stderr = proc.stdout, proc.stderr
    if stdout is None or stderr is None:
        raise RuntimeError("pg_dump pipes are missing")
    _widen_pipe(stdout.fileno())
    err_lines: list[str] = []

    def drain_stderr() -> None:
        for raw in stderr:
            err_lines.append(raw.decode(errors="replace").rstrip())
            del err_lines[:-20]

    t = threading.Thread(target=drain_stderr, daemon=True)
    t.start()
    head = b""
    stream = w.dump_stream()
    try:
        while chunk := stdout.read(READ_BLOCK):
            if len(head) < 4096:
                head += chunk[: 4096 - len(head)]
            stream.write(chunk)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    code = proc.wait()
    t.join(timeout=10)
    if code != 0:
        detail = next((ln for ln in reversed(err_lines) if ln), f"exit code {code}")
        raise BackupFailed(f"pg_dump of {display} failed: {detail.removeprefix('pg_dump: error: ')}")
    try:
        header = pgdump.parse_header(head)
    except ValueError as e:
        raise BackupFailed(f"pg_dump wrote an unreadable archive: {e}") from e
    return w.database(
        stream,
        pg_dump_version=header.pg_dump_version or version.rsplit(" ", 1)[-1],
        server_version=header.server_version,
        archive_version=header.archive_version_text,
        dbname=header.database,
    )


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB: pg_dump writes on while a block is being chunked."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), READ_BLOCK)


def _previous(req: BackupRequest, store: ObjectStore) -> tuple[SnapshotReader | None, str]:
    """The source's previous snapshot, to share content with; (None, why) when unusable."""
    if not req.previous_manifest:
        return None, ""
    try:
        reader = SnapshotReader(store, req.previous_manifest, keyring=req.keyring)
    except IntegrityError as e:  # gone (expired), damaged, or its key was removed: share nothing
        return None, f"previous snapshot not used: {e}"
    return reader, ""


class _S3Source:
    """An S3 prefix of app files, walked in key order and read as streams."""

    def __init__(self, target: S3Target) -> None:
        self.target = target
        self.store = target.store()

    def entries(self) -> Iterator[tuple[str, int, int, str]]:
        prefix = self.target.prefix
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        for o in self.store.list(prefix):
            rel = o.key[len(prefix) :]
            if rel and not rel.endswith("/") and o.last_modified is not None:
                yield rel, o.size, int(o.last_modified.timestamp() * 1e9), o.key

    def open(self, key: str) -> IO[bytes]:
        return self.store.get(key)


def _back_up_s3_files(src: _S3Source, index: IndexWriter, previous: Iterator[filesmod.Entry] | None) -> None:
    """Like files.back_up_tree for an S3 prefix; key order is the index order here."""
    prev = filesmod.PreviousIndex(previous)
    for rel, size, mtime_ns, key in src.entries():
        cur = prev.find_key_order(rel)
        if cur is not None and cur.size == size and cur.mtime_ns == mtime_ns and cur.chunks is not None:
            index.reuse(rel, 0o644, cur)
        else:
            with src.open(key) as body:
                index.add_file(rel, 0o644, mtime_ns, body, size)


def run_backup(req: BackupRequest) -> dict[str, Any]:
    """Take the snapshot; returns the result for the termination message."""
    loc = layout.SnapshotLocation(
        prefix=req.storage.prefix,
        namespace=req.namespace,
        source=req.source,
        backup_uid=req.backup_uid,
        attempt=req.attempt,
    )
    store = req.storage.store()
    try:
        wait_for("storage", storage_probe(store.check), req.db_wait_seconds)
        store.check()
    except StillUnreachable as e:
        raise BackupFailed(f"storage: {e}") from e
    except StorageError as e:
        raise BackupFailed(f"storage: {e}") from e
    try:
        return _run(req, loc, store)
    except KeyProblem as e:
        raise BackupFailed(f"encryption: {e}") from e
    except IntegrityError as e:
        raise BackupFailed(str(e)) from e
    except StorageError as e:
        raise BackupFailed(f"storage: {e}") from e


def _run(req: BackupRequest, loc: layout.SnapshotLocation, store: ObjectStore) -> dict[str, Any]:
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    previous, note = _previous(req, store)
    w = SnapshotWriter(
        store,
        loc,
        keyring=req.keyring,
        previous=previous.m if previous else None,
        lock=Lock.of(req.lock_mode, req.expires),
        level=req.compression_level,
    )
    try:
        database, pg_client, dump_note = _dump_database(req, w)
        note = "; ".join(n for n in (note, dump_note) if n)
        files = None
        if req.contents == "Full" and (req.files_dir is not None or req.files_s3 is not None):
            index = w.index()
            prev_entries = previous.entries() if previous is not None and w.previous is not None else None
            try:
                if req.files_dir is not None:
                    if not req.files_dir.is_dir():
                        raise BackupFailed(f"files: {req.files_dir} is not a directory in the volume")
                    filesmod.back_up_tree(req.files_dir, index, filesmod.PreviousIndex(prev_entries))
                elif req.files_s3 is not None:
                    _back_up_s3_files(_S3Source(req.files_s3), index, prev_entries)
            except PermissionError as e:
                raise BackupFailed(f"files: permission denied reading {e.filename}") from e
            files = index.finish()
        key, digest, manifest = w.commit(
            created=created,
            expires=req.expires,
            database=database,
            files=files,
            backup={
                "namespace": req.namespace,
                "name": req.backup_name,
                "uid": req.backup_uid,
                "type": req.backup_type,
                **{k: v for k, v in req.record.items() if k in ("spec", "labels")},
            },
            source=req.source,
            contents=req.contents,
            model_version=req.model_version,
        )
    except BaseException:
        w.abort()
        raise
    result: dict[str, Any] = {
        "snapshotId": req.attempt,
        "manifestKey": key,
        "manifestSha256": digest,
        "createdOn": manifest.created_on,
        "sizeUncompressedBytes": manifest.size_uncompressed,
        "storedBytes": w.stored_bytes,
        "format": manifest.format,
        "database": database.summary(),
        "pgClient": pg_client,
        "files": {"count": files.count, "bytes": files.bytes, "reusedFiles": files.reused_files}
        if files
        else None,
        "objects": len(manifest.objects),
    }
    if req.keyring is not None:
        result["keyId"] = req.keyring.current
    if note:
        result["note"] = note[:300]
    return result
