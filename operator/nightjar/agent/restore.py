"""``nightjar agent restore``: put a snapshot back into a database and a files location.

Runs inside the restore Job. Order of work, chosen so a failure leaves the target in a state
that can be named:

1. read the manifest (its sha256 must be the one the Backup recorded);
2. for a Full restore into a directory, *stage* the files: every file of the snapshot is
   written beside its destination under a temporary name, with its mode and modification time,
   after its bytes were checked (blob authentication or checksum, and the index's sha256).
   Missing directories are made. A damaged snapshot fails here: what was staged is removed and
   the target is as it was (``Unchanged``);
3. stream the dump from the bucket into ``pg_restore --clean --if-exists --no-owner
   --no-privileges --single-transaction``. The dump is checked chunk by chunk (and its sha256
   at its end); on a mismatch pg_restore is killed before it has read the end, so its
   transaction never commits and the staged files are removed (``Unchanged``);
4. commit the files: each staged file renamed into place, links made, directory modes set,
   then everything in the target that the snapshot does not have is removed. A failure here
   (a full or read-only volume) leaves the database restored and the files partly restored
   (``PartiallyRestored``); running the restore again finishes the job.

Staging needs room for a second copy of the files that change while the restore runs. Files
restored into an S3 prefix are written after the database, as before (an S3 prefix has no
rename).

The dump streams through a pipe, so pg_restore cannot run parallel jobs (they need a seekable
file, which would mean a local copy of the whole dump); the files are written while streaming
too. Memory stays flat whatever the number of files.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightjar.agent.backup import BackupFailed, DatabaseConn
from nightjar.agent.files import walk
from nightjar.agent.patience import StillUnreachable, storage_probe, wait_for
from nightjar.agent.pgsql import SqlFailed, wait_for_server
from nightjar.agent.pgtools import PgClientError, find_client, probe_psql, tool_env
from nightjar.agent.progress import Counters, Reporter, Ticker
from nightjar.domain import pgclient, pgerrors
from nightjar.storage import layout
from nightjar.storage.crypto import KeyRing
from nightjar.storage.index import Entry
from nightjar.storage.objects import S3Target, StorageError, describe_error
from nightjar.storage.snapshot import IntegrityError, PresignedReader, SnapshotReader
from nightjar.transfer.order import scan, storage_order

CHUNK = 1024 * 1024
#: Kept at the root of a volume whatever the snapshot holds (ext4 needs it).
KEEP_AT_ROOT = frozenset({"lost+found"})
TMP_SUFFIX = ".nightjar-restore-tmp"

UNCHANGED = "Unchanged"
DATABASE_RESTORED = "DatabaseRestored"
PARTIAL = "PartiallyRestored"


class RestoreFailed(Exception):
    """The restore cannot finish; says why and what state the target is in. ``transient``: the
    cause may pass (a database connection lost mid-way), besides a retryable storage error among
    its causes, which :attr:`retry_safe` finds itself."""

    def __init__(self, message: str, target_state: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.target_state = target_state
        self.transient = transient

    @property
    def retry_safe(self) -> bool:
        """Whether another Pod may simply run the restore again: nothing was changed (the target
        is Unchanged) and the cause may pass — a storage error a retry may get past (the S3
        server blinked mid-way, after the client's own retries) or a lost database connection.
        Not after a wait for the database or the bucket ran out: that patience was the retry."""
        if self.target_state != UNCHANGED:
            return False
        cause = self.__cause__
        while cause is not None:
            if isinstance(cause, StorageError):
                return cause.retryable
            cause = cause.__cause__
        return self.transient


@dataclass
class RestoreRequest:
    storage: S3Target
    manifest_key: str
    manifest_sha256: str
    contents: str  # Full or DatabaseOnly
    db: DatabaseConn
    files_dir: Path | None = None
    files_s3: S3Target | None = None
    #: NIGHTJAR_PG_BINDIR: the directory of the pg_restore to run, whatever the server's version.
    pg_bindir: str = ""
    #: NIGHTJAR_PG_ROOT: where the versioned clients are (``<root>/<major>/bin``).
    pg_root: str = ""
    reporter: Reporter | None = None
    s3: Any = None  # a ready client (presigned URLs) instead of storage's credentials
    #: Reading a replica: the primary's prefix, which the manifest's keys carry.
    primary_prefix: str | None = None
    #: The storage's key-encryption keys (an encrypted snapshot in the own namespace).
    keyring: KeyRing | None = None
    #: Data keys of this one snapshot (a restore into another namespace never gets the keyring).
    data_keys: dict[str, bytes] | None = None
    #: How long to wait for a target database (or the bucket) that is not reachable.
    db_wait_seconds: float = 300.0


def conninfo_dbname(name: str) -> str:
    """A libpq conninfo naming just the database, quoted so no value is read as a keyword."""
    return "dbname='" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def restore_database(req: RestoreRequest, reader: SnapshotReader, counters: Counters) -> dict[str, Any]:
    try:
        env, display = req.db.libpq_env()
    except BackupFailed as e:
        raise RestoreFailed(f"{e}; nothing was restored", UNCHANGED) from e

    def failed(what: str, transient: bool = False) -> RestoreFailed:
        return RestoreFailed(
            f"{what}; the database {display} is unchanged (the restore ran in one transaction "
            "and was rolled back) and the files were not touched",
            UNCHANGED,
            transient=transient,
        )

    try:
        psql = probe_psql(override=req.pg_bindir, root=req.pg_root)
        wait_for_server(psql, env, display, req.db_wait_seconds)
        client = find_client("pg_restore", env, override=req.pg_bindir, root=req.pg_root)
    except (PgClientError, SqlFailed) as e:
        raise RestoreFailed(
            f"pg_restore into {display} failed: {e}; the database is unchanged and the files were "
            "not touched",
            UNCHANGED,
        ) from e
    if client.choice is not None:
        unreadable = pgclient.unreadable_archive(
            str(reader.database.get("archiveVersion") or ""),
            client.choice,
            str(reader.database.get("pgDumpVersion") or ""),
        )
        if unreadable:
            raise RestoreFailed(
                f"pg_restore into {display} refused: {unreadable}; the database is unchanged and "
                "the files were not touched",
                UNCHANGED,
            )
    pg_restore = client.path
    proc = subprocess.Popen(
        [
            pg_restore,
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            "--no-password",
            "--dbname=" + conninfo_dbname(env["PGDATABASE"]),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=tool_env(env),
    )
    stdin, stderr = proc.stdin, proc.stderr
    if stdin is None or stderr is None:
        raise RuntimeError("pg_restore pipes are missing")
    err_lines: list[str] = []

    def drain_stderr() -> None:
        for raw in stderr:
            err_lines.append(raw.decode(errors="replace").rstrip())
            del err_lines[:-20]

    t = threading.Thread(target=drain_stderr, daemon=True)
    t.start()

    try:
        dump = reader.open_dump()
        while chunk := dump.read(CHUNK):
            stdin.write(chunk)
            counters.add(len(chunk))
        stdin.close()
    except IntegrityError as e:
        proc.kill()
        proc.wait()
        raise failed(f"snapshot: {e}") from e
    except BrokenPipeError:
        pass  # pg_restore stopped reading: it failed, and says why below
    except StorageError as e:
        proc.kill()
        proc.wait()
        raise failed(describe_error(e, "storage: reading the dump")) from e
    code = proc.wait()
    t.join(timeout=10)
    if code != 0:
        errors = [ln for ln in err_lines if ln]
        last = errors[-1] if errors else f"exit code {code}"
        detail = next((ln for ln in errors if "error" in ln.lower()), last)
        raise failed(
            f"pg_restore into {display} failed: {detail.removeprefix('pg_restore: error: ')}",
            transient=pgerrors.is_transient(detail),
        )
    return {"database": display, "bytes": reader.database["bytes"], "pgClient": client.summary()}


# --- files into a directory -------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _write_file(root: Path, e: Entry, stream: Any, counters: Counters) -> None:
    """Write one file from a stream (large files): temp name, mode, mtime, rename."""
    dest = os.path.join(root, e.path)
    tmp = dest + TMP_SUFFIX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        while chunk := stream.read(CHUNK):
            os.write(fd, chunk)
            counters.add(len(chunk))
        _finish_file(fd, tmp, dest, e)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_small(root: Path, e: Entry, data: bytes, counters: Counters) -> None:
    """Write one small file whose bytes are in memory (runs on a writer thread)."""
    dest = os.path.join(root, e.path)
    tmp = dest + TMP_SUFFIX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        _finish_file(fd, tmp, dest, e)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    counters.add(len(data))


def _finish_file(fd: int, tmp: str, dest: str, e: Entry) -> None:
    """Mode and modification time on the staged file; :func:`_place` moves it into place."""
    os.fchmod(fd, e.mode & 0o7777)
    os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
    os.close(fd)


def _after(first: Future[None] | None, fn: Any, *args: Any) -> None:
    if first is not None:
        first.result()  # the directory could not be made: neither can what goes inside it
    fn(*args)


class _Writers:
    """A few threads writing small files (the syscalls release the GIL), with a bounded backlog."""

    def __init__(self, workers: int = 8, backlog: int = 512) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="write")
        self.slots = threading.BoundedSemaphore(backlog)
        self.futures: collections.deque[Future[None]] = collections.deque()
        #: Directories being made: a file (or directory) inside one waits for it. Tasks run in
        #: the order submitted and a parent is submitted before its children, so waiting never
        #: blocks the pool. Finished ones are dropped from time to time.
        self.dirs: dict[str, Future[None]] = {}

    def submit(self, fn: Any, *args: Any, parent: str = "", dir_path: str = "") -> None:
        while self.futures and self.futures[0].done():
            self.futures.popleft().result()  # the first failure stops the restore
        self.slots.acquire()
        wait_for = self.dirs.get(parent) if parent else None
        f = self.pool.submit(_after, wait_for, fn, *args)
        f.add_done_callback(lambda _f: self.slots.release())
        self.futures.append(f)
        if dir_path:
            if len(self.dirs) > 4096:
                self.dirs = {k: v for k, v in self.dirs.items() if not v.done() or v.exception()}
            self.dirs[dir_path] = f

    def wait(self) -> None:
        try:
            while self.futures:
                self.futures.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _SafeDest:
    """``root/path``, refusing a path that leaves the root (``..``, absolute, or through a
    symlink the snapshot created): a forged index never writes outside the target. The real
    path of a directory is checked once, not per file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.checked: str | None = None
        self.trusted: set[str] = set()

    def trust(self, path: str) -> None:
        """A directory this restore made itself (a real directory, not a link)."""
        self.trusted.add(path)

    def __call__(self, path: str) -> Path:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise IntegrityError(f"the index lists the unsafe path {path!r}")
        parent = path.rpartition("/")[0]
        if parent != self.checked and parent not in self.trusted:
            real = os.path.realpath(os.path.join(self.root, parent))
            if real != self.real_root and not real.startswith(self.real_root + os.sep):
                raise IntegrityError(f"the index lists {path!r}, which leads outside the files directory")
            self.checked = parent
        return self.root / path

    def forget(self) -> None:
        """A directory or link was made: real paths below may have changed."""
        self.checked = None


#: Files up to this size are read into memory and written by a writer thread.
SMALL_FILE = 1024 * 1024


class Staged:
    """A snapshot's files written under temporary names next to their destinations, every byte
    verified, nothing in place yet: :meth:`commit` renames them into place (and makes links,
    sets directory modes, removes what the snapshot does not have); :meth:`discard` removes them
    and the directories staging made, leaving the target as it was."""

    def __init__(self, reader: SnapshotReader, root: Path, sequential: bool) -> None:
        self.reader = reader
        self.root = root
        self.sequential = sequential
        #: Directories staging made (relative paths), in the order made: already with their mode.
        self.created_dirs: list[str] = []
        self.staged = 0
        #: The target held nothing (but lost+found): there is nothing to replace or remove.
        self.was_empty = not any(name not in KEEP_AT_ROOT for name in os.listdir(root))

    def discard(self) -> None:
        """Remove what staging wrote: found on disk by name, not through the index (which may
        be the damaged part)."""
        for rel, st in walk(self.root):
            if rel.endswith(TMP_SUFFIX) and stat.S_ISREG(st.st_mode):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.root, rel))
        for d in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(self.root, d))  # only if still empty: nothing of the target's

    def commit(self, counters: Counters) -> dict[str, Any]:
        safe = _SafeDest(self.root)
        made = set(self.created_dirs)
        read_only_dirs: list[tuple[Path, int]] = []
        written = 0
        root = str(self.root)
        for e in self.reader.entries():
            if e.type == "f":
                _place(os.path.join(root, e.path))
                written += 1
                counters.add(nfiles=1)
            elif e.type == "d" and e.path in made:
                mode = e.mode & 0o7777  # made by staging with its mode already
                if mode & 0o700 != 0o700 or mode & 0o7000:
                    read_only_dirs.append((self.root / e.path, mode))
            else:
                _make_dir_or_link(safe(e.path), e, read_only_dirs)
                safe.forget()
        removed = 0 if self.was_empty else _prune(self.reader, self.root)
        for d, mode in reversed(read_only_dirs):
            os.chmod(d, mode)
        return {"files": written, "removed": removed, "order": "index" if self.sequential else "storage"}


def _place(dest: str) -> None:
    try:
        os.replace(dest + TMP_SUFFIX, dest)
    except IsADirectoryError:  # a directory where the snapshot has a file: the file wins
        shutil.rmtree(dest)
        os.replace(dest + TMP_SUFFIX, dest)


def stage_tree(reader: SnapshotReader, root: Path, counters: Counters) -> Staged:
    """Write every file of the snapshot under a temporary name beside its destination (checked
    against its sha256 first); make the directories that are missing. Nothing the target has is
    replaced. On any failure, what was staged is removed again and the error raised.

    File contents are read in the order the index lists them when that reads the packs front to
    back (a taken snapshot), else in storage order (an upload of an archive whose ``tree/`` was not
    sorted), so every pack is read with few GETs either way. Small files are written by a few
    threads at once.
    """
    if not root.is_dir():
        raise RestoreFailed(f"files: {root} is not a directory in the volume", UNCHANGED)
    safe = _SafeDest(root)
    sequential = reader.format == 2 or scan(reader.entries()).sequential
    staged = Staged(reader, root, sequential)
    writers = _Writers()
    umask = os.umask(0)  # directories are made with the snapshot's mode, not the umask's
    try:
        try:
            if not sequential:
                seen_links: set[str] = set()
                for e in reader.entries():
                    if seen_links:
                        _not_below_links(e.path, seen_links)
                    if e.type == "l":
                        seen_links.add(e.path)
                    elif e.type == "d":
                        safe(e.path)
                        _stage_dir(e, staged)
                        safe.trust(e.path)
                entries: Iterator[Entry] = storage_order(reader.entries())
            else:
                entries = reader.entries()
            links: set[str] = set()
            for e, stream in reader.contents(entries):
                safe(e.path)
                if links:
                    _not_below_links(e.path, links)
                if e.type == "l":
                    links.add(e.path)
                elif e.type == "d":
                    safe.trust(e.path)  # its files wait for _stage_dir, which refuses a non-directory
                    parent = e.path.rpartition("/")[0]
                    writers.submit(_stage_dir, e, staged, parent=parent, dir_path=e.path)
                elif stream is not None:
                    parent = e.path.rpartition("/")[0]
                    if e.size <= SMALL_FILE:
                        data = bytearray()
                        while chunk := stream.read(CHUNK):
                            data += chunk
                        stream.drain()  # checks the sha256 now, before anything is written
                        writers.submit(_write_small, root, e, bytes(data), counters, parent=parent)
                    else:
                        if parent in writers.dirs:
                            writers.dirs[parent].result()
                        _write_file(root, e, stream, counters)
                    staged.staged += 1
        finally:
            writers.wait()
    except BaseException:
        staged.discard()
        raise
    finally:
        os.umask(umask)
    return staged


def _not_below_links(path: str, links: set[str]) -> None:
    """Links are made at commit time, after staging: an entry below one is refused now (the
    link could lead anywhere)."""
    parent = path.rpartition("/")[0]
    while parent:
        if parent in links:
            raise IntegrityError(
                f"the index lists {path!r} below the symlink {parent!r}: it could lead outside the "
                "files directory"
            )
        parent = parent.rpartition("/")[0]


def _stage_dir(e: Entry, staged: Staged) -> None:
    """A directory the staged files need: made when missing, with its mode (remembered, so
    discarding removes it and its files need no real-path check); a file or link in its place is
    refused (staging replaces nothing)."""
    path = os.path.join(staged.root, e.path)
    try:
        os.mkdir(path, (e.mode & 0o777) | 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise RestoreFailed(
                f"files: {path} is a file or link where the snapshot has a directory; move it away "
                "and restore again",
                UNCHANGED,
            ) from None
        return
    staged.created_dirs.append(e.path)  # list.append is atomic: writer threads call this


def restore_tree(reader: SnapshotReader, root: Path, counters: Counters) -> dict[str, Any]:
    """Make ``root`` hold exactly the snapshot's files (stage, then commit); returns counts."""
    return stage_tree(reader, root, counters).commit(counters)


def _make_dir_or_link(dest: Path, e: Entry, read_only_dirs: list[tuple[Path, int]]) -> None:
    if e.type == "d":
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            dest.unlink()
        dest.mkdir(exist_ok=True)
        mode = e.mode & 0o7777
        os.chmod(dest, mode | 0o700)
        if mode & 0o700 != 0o700:
            read_only_dirs.append((dest, mode))
    else:
        if dest.is_symlink() or dest.exists():
            _remove(dest)
        os.symlink(e.target, dest)


def _prune(reader: SnapshotReader, root: Path) -> int:
    """Remove what the target has and the snapshot does not: a merge of two sorted walks."""
    wanted = (e.path for e in reader.entries())
    cur = next(wanted, None)
    removed = 0
    for rel, _st in walk(root):
        while cur is not None and cur.split("/") < rel.split("/"):
            cur = next(wanted, None)
        if cur == rel:
            continue
        if "/" not in rel and rel in KEEP_AT_ROOT:
            continue
        _remove(root / rel)  # a removed directory is not descended into (walk skips it)
        removed += 1
    return removed


# --- files into an S3 prefix ------------------------------------------------------------------


def restore_s3_files(reader: SnapshotReader, target: S3Target, counters: Counters) -> dict[str, Any]:
    """Upload every file under the prefix, then delete keys the snapshot does not have.

    Which keys to keep is remembered as 8-byte digests (about 60 bytes a file), since a
    snapshot taken from a volume is not in S3's key order.
    """
    store = target.store()
    prefix = target.prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    keep: set[bytes] = set()
    written = 0

    entries = reader.entries() if scan(reader.entries()).sequential else storage_order(reader.entries())
    for e, stream in reader.contents(entries):
        if e.type != "f" or stream is None:
            continue
        key = prefix + e.path
        with store.writer(key) as w:
            while data := stream.read(CHUNK):
                w.write(data)
                counters.add(len(data))
        keep.add(hashlib.blake2b(key.encode(), digest_size=8).digest())
        written += 1
        counters.add(nfiles=1)
    removed = 0
    doomed: list[str] = []
    for o in store.list(prefix):
        if hashlib.blake2b(o.key.encode(), digest_size=8).digest() not in keep:
            doomed.append(o.key)
        if len(doomed) >= 1000:
            removed += store.delete_current(doomed)
            doomed = []
    if doomed:
        removed += store.delete_current(doomed)
    return {"files": written, "removed": removed}


# --- the whole restore ------------------------------------------------------------------------


def run_restore(req: RestoreRequest) -> dict[str, Any]:
    try:
        rebase = None
        if req.primary_prefix is not None:
            rebase = (req.primary_prefix, layout.normalize_prefix(req.storage.prefix))
        if req.s3 is not None:  # presigned URLs of this one snapshot
            if isinstance(req.s3, PresignedReader):  # no bucket to probe: its manifest's URL
                urls, manifest_key = req.s3, req.manifest_key
                wait_for("storage", storage_probe(lambda: urls.check(manifest_key)), req.db_wait_seconds)
            reader = SnapshotReader(
                req.s3,
                req.storage.bucket,
                req.manifest_key,
                req.manifest_sha256,
                rebase=rebase,
                data_keys=req.data_keys,
            )
        else:
            store = req.storage.store()
            wait_for("storage", storage_probe(store.check), req.db_wait_seconds)
            reader = SnapshotReader(
                store, req.manifest_key, req.manifest_sha256, rebase=rebase, keyring=req.keyring
            )
    except StillUnreachable as e:
        raise RestoreFailed(f"storage: {e}; nothing was restored", UNCHANGED) from e
    except IntegrityError as e:
        raise RestoreFailed(f"snapshot: {e}; nothing was restored", UNCHANGED) from e
    files = reader.files if req.contents == "Full" else None
    has_files_target = req.files_dir is not None or req.files_s3 is not None
    counters = Counters(bytes_total=int(reader.database["bytes"]))
    if files and has_files_target:
        counters.bytes_total += int(files.get("bytes") or 0)
        counters.files_total = int(files.get("count") or 0)
    reporter = req.reporter or Reporter("", "", "")
    result: dict[str, Any] = {"snapshotId": reader.manifest.get("snapshotId", "")}
    with Ticker(reporter, counters):
        staged: Staged | None = None
        if files and req.files_dir is not None:
            # Files first, under temporary names, every byte checked: a damaged snapshot fails
            # here, before the database is touched, and leaves the target as it was.
            counters.stage = "files"
            try:
                staged = stage_tree(reader, req.files_dir, counters)
            except RestoreFailed:
                raise
            except IntegrityError as e:
                raise RestoreFailed(f"snapshot: {e}; {_UNTOUCHED}", UNCHANGED) from e
            except StorageError as e:
                raise RestoreFailed(f"{describe_error(e, 'storage')}; {_UNTOUCHED}", UNCHANGED) from e
            except OSError as e:
                raise RestoreFailed(
                    f"files: {e.strerror or e} ({e.filename}); {_UNTOUCHED}", UNCHANGED
                ) from e
        counters.stage = "database"
        try:
            result["database"] = restore_database(req, reader, counters)
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        result["pgClient"] = result["database"].pop("pgClient")
        if files and has_files_target:
            counters.stage = "files"
            counters.files_done = 0
            try:
                if staged is not None:
                    result["files"] = staged.commit(counters)
                elif req.files_s3 is not None:
                    result["files"] = restore_s3_files(reader, req.files_s3, counters)
            except RestoreFailed:
                raise
            except IntegrityError as e:
                raise _files_failed(f"snapshot: {e}", counters) from e
            except StorageError as e:
                raise _files_failed(describe_error(e, "files"), counters) from e
            except OSError as e:
                raise _files_failed(f"files: {e.strerror or e} ({e.filename})", counters) from e
        counters.stage = "done"
    result["bytes"] = counters.bytes_done
    result["filesRestored"] = counters.files_done
    return result


_UNTOUCHED = "nothing was restored: the database and the files are unchanged"


def _files_failed(what: str, counters: Counters) -> RestoreFailed:
    return RestoreFailed(
        f"{what}; the database was restored, the files are partly restored "
        f"({counters.files_done} of {counters.files_total} written): run the restore again to finish",
        PARTIAL if counters.files_done else DATABASE_RESTORED,
    )
