"""``nightjar agent verify``: a restore drill. Proves one snapshot restores, and how long it takes.

Runs inside a Verification's Job with the snapshot's storage and a *scratch* PostgreSQL server
(never the source database: the Job gets no Secret of it). Order of work:

1. read the manifest (its sha256 must be the one the Backup recorded);
2. check the scratch server before anything is created: the connection Secret has its keys, the
   server is of the dump's PostgreSQL major or newer, the chosen pg_restore reads the archive, and
   the role may create databases;
3. create a new database ``nightjar_verify_<id>`` (the drill's own, fixed prefix), stream the
   dump from storage into ``pg_restore --exit-on-error --single-transaction`` there, timed: that
   is the restore time (``restoreSeconds``);
4. check it: every table the dump's table of contents creates exists, and when the backup
   recorded row counts (``database.rowCounts``), every table holds exactly that many rows; a
   missing table or a different count fails the drill, naming the table and both numbers;
5. drop the temporary database, whatever happened in 3 and 4 (only that database, only when
   this drill created it);
6. read every stored file back, each checked against its sha256 (nothing is written anywhere).

The result (termination message) says what was measured; ``passed`` is true only when every
check held. A failure has ``error``: pg_restore's own reason for an unrestorable dump.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from nightjar.agent.backup import BackupFailed, DatabaseConn, psql_beside
from nightjar.agent.pgsql import SqlFailed, count_rows, run_sql
from nightjar.agent.pgtools import PgClient, PgClientError, find_client, tool_env
from nightjar.agent.progress import Counters, Reporter, Ticker
from nightjar.agent.restore import conninfo_dbname
from nightjar.domain import pgclient, pgdump
from nightjar.storage.crypto import KeyRing
from nightjar.storage.objects import S3Target, StorageError, describe_error
from nightjar.storage.snapshot import IntegrityError, SnapshotReader
from nightjar.transfer.order import scan, storage_order

#: Every temporary database a drill creates is named with this prefix; a drill drops no other.
TEMP_PREFIX = "nightjar_verify_"
_TEMP_NAME = re.compile(r"^nightjar_verify_[a-z0-9]{1,40}$")
CHUNK = 1024 * 1024
#: The dump's first bytes kept to read its table of contents (which precedes the data).
TOC_LIMIT = 256 * 1024 * 1024
#: How many mismatching tables a failure message names (the rest are counted).
NAMED_MISMATCHES = 5


class VerifyFailed(Exception):
    """The drill failed; the message says why (never with a secret)."""


def temp_database_name(drill_id: str) -> str:
    """``nightjar_verify_<id>``: the drill id's letters and digits, lower case, at most 40."""
    clean = re.sub(r"[^a-z0-9]", "", drill_id.lower())[:40]
    if not clean:
        raise VerifyFailed(f"--drill-id {drill_id[:80]!r} has no letters or digits to name a database with")
    return TEMP_PREFIX + clean


def _own(name: str) -> str:
    """``name`` when it is a drill's temporary database name; refuses anything else (nothing but
    such a database is ever created or dropped)."""
    if not _TEMP_NAME.fullmatch(name):
        raise VerifyFailed(f"refusing to touch database {name!r}: not a drill's temporary database")
    return name


@dataclass
class VerifyRequest:
    storage: S3Target
    manifest_key: str
    manifest_sha256: str
    #: The scratch server (the Job's NIGHTJAR_SCRATCH_* env from the scratch Secret).
    scratch: DatabaseConn
    #: The scratch Secret's name, for messages.
    scratch_secret: str = "scratch"  # noqa: S105 - a Secret's name, not a secret
    #: Names the temporary database (the Pod's uid: each attempt has its own).
    drill_id: str = ""
    pg_bindir: str = ""
    pg_root: str = ""
    keyring: KeyRing | None = None
    reporter: Reporter | None = None
    #: Read the files back too (a DatabaseOnly snapshot has none either way).
    check_files: bool = True


@dataclass
class Measured:
    """What the drill measured so far: in the result whether it passed or not."""

    restore_seconds: float = 0.0
    tables: int = 0
    rows: int = 0
    exact: bool = False
    files: int = 0
    file_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "restoreSeconds": round(self.restore_seconds, 3),
            "tablesChecked": self.tables,
            "rowsChecked": self.rows,
            "exactCounts": self.exact,
            "filesChecked": self.files,
            "bytesChecked": self.file_bytes,
            **self.extra,
        }


def scratch_env(req: VerifyRequest) -> tuple[dict[str, str], str]:
    """libpq environment of the scratch server (dbname defaults to postgres) and its display."""
    conn = req.scratch
    if not conn.uri and not conn.dbname:
        conn = DatabaseConn(conn.uri, conn.host, conn.port, "postgres", conn.user, conn.password)
    try:
        env, _ = conn.libpq_env()
    except BackupFailed as e:
        raise VerifyFailed(
            f"scratch Secret {req.scratch_secret}: {str(e).removeprefix('database Secret: ')}"
        ) from e
    if not env.get("PGDATABASE"):
        env["PGDATABASE"] = "postgres"
    return env, f"scratch server {env['PGHOST']}:{env['PGPORT']} as {env['PGUSER']}"


def check_server(
    dump_server_version: str, scratch_version_num: int, archive_version: str, client: PgClient, where: str
) -> None:
    """Refuse a scratch server older than the dump's, or a pg_restore that cannot read it."""
    dumped = pgclient.major_of_version(dump_server_version)
    scratch = pgclient.server_major(scratch_version_num)
    if dumped is not None and scratch < dumped:
        source = dump_server_version.split(" ", maxsplit=1)[0]
        raise VerifyFailed(
            f"the {where} runs PostgreSQL {pgclient.format_server_version(scratch_version_num)}, older than "
            f"the server the backup was taken from ({source}): a dump restores only into its own major "
            f"or a newer one; use a scratch server of PostgreSQL {dumped} or newer"
        )
    if client.choice is not None:
        unreadable = pgclient.unreadable_archive(archive_version, client.choice)
        if unreadable:
            raise VerifyFailed(f"pg_restore into the {where} refused: {unreadable}")


def compare_counts(recorded: dict[str, int], restored: dict[str, int]) -> list[str]:
    """Why the restored tables differ from the counts recorded at backup time ([] when they do
    not): a recorded table that is missing, or one with another number of rows."""
    problems = []
    for name, want in sorted(recorded.items()):
        got = restored.get(name)
        if got is None:
            problems.append(f"table {name} is missing after the restore (the backup recorded {want} rows)")
        elif got != want:
            problems.append(f"table {name} has {got} rows after the restore, the backup recorded {want}")
    return problems


def missing_tables(dump_tables: list[tuple[str, str]], restored: set[tuple[str, str]]) -> list[str]:
    """Tables the dump creates that the restored database does not have."""
    return [f"{ns}.{name}" for ns, name in dump_tables if (ns, name) not in restored]


_LIST_TABLES = r"""
SELECT format('%I.%I', n.nspname, c.relname), n.nspname, c.relname
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p')
   AND n.nspname <> 'information_schema'
   AND n.nspname !~ '^pg_'
"""


class _Drill:
    def __init__(self, req: VerifyRequest, reader: SnapshotReader, measured: Measured, counters: Counters):
        self.req = req
        self.reader = reader
        self.m = measured
        self.counters = counters

    # --- before anything is created ---------------------------------------------------------

    def prepare(self) -> tuple[dict[str, str], str, PgClient, str, int]:
        env, where = scratch_env(self.req)
        try:
            client = find_client("pg_restore", env, override=self.req.pg_bindir, root=self.req.pg_root)
        except PgClientError as e:
            raise VerifyFailed(f"{where}: {e}") from e
        psql = psql_beside(client)
        try:
            version_num = client.server_version_num or pgclient.parse_server_version_num(
                run_sql(psql, env, "SHOW server_version_num;")[0]
            )
            can_create = run_sql(
                psql,
                env,
                "SELECT rolcreatedb OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user;",
            )
        except (SqlFailed, ValueError, IndexError) as e:
            raise VerifyFailed(f"{where}: {e}") from e
        db = self.reader.m.database
        if db is None:
            raise VerifyFailed(f"manifest {self.reader.manifest_key} has no database")
        check_server(db.server_version, version_num, db.archive_version, client, where)
        if can_create != ["t"]:
            raise VerifyFailed(
                f"the role {env['PGUSER']} may not create databases on the scratch server "
                f"{env['PGHOST']}:{env['PGPORT']}: give it CREATEDB "
                "(ALTER ROLE ... CREATEDB) or name another role in the scratch Secret "
                f"{self.req.scratch_secret}"
            )
        self.m.extra["pgClient"] = client.summary()
        self.m.extra["scratchServer"] = pgclient.format_server_version(version_num)
        return env, where, client, psql, version_num

    # --- the temporary database ------------------------------------------------------------

    def create(self, psql: str, env: dict[str, str], name: str, where: str) -> None:
        try:
            run_sql(psql, env, 'CREATE DATABASE :"db" TEMPLATE template0;', db=_own(name))
        except SqlFailed as e:
            raise VerifyFailed(f"could not create the temporary database {name} on the {where}: {e}") from e

    def drop(self, psql: str, env: dict[str, str], name: str, version_num: int) -> str:
        """Drop the drill's own database; "" when done, else why not (reported, never raised)."""
        force = " WITH (FORCE)" if version_num >= 130000 else ""
        try:
            run_sql(psql, env, f'DROP DATABASE IF EXISTS :"db"{force};', db=_own(name), timeout=300)
        except SqlFailed as e:
            return str(e)
        return ""

    def restore(self, client: PgClient, env: dict[str, str], name: str, where: str) -> bytes:
        """Stream the dump into pg_restore; returns the dump's first bytes (its TOC)."""
        target = {**env, "PGDATABASE": name}
        proc = subprocess.Popen(
            [
                client.path,
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                "--exit-on-error",
                "--no-password",
                "--dbname=" + conninfo_dbname(name),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=tool_env(target),
        )
        stdin, stderr = proc.stdin, proc.stderr
        if stdin is None or stderr is None:
            raise RuntimeError("pg_restore pipes are missing")
        err_lines: list[str] = []

        def drain() -> None:
            for raw in stderr:
                err_lines.append(raw.decode(errors="replace").rstrip())
                del err_lines[:-20]

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        head = bytearray()
        started = time.monotonic()
        try:
            dump = self.reader.open_dump()
            while chunk := dump.read(CHUNK):
                if len(head) < TOC_LIMIT:
                    head += chunk[: TOC_LIMIT - len(head)]
                stdin.write(chunk)
                self.counters.add(len(chunk))
            stdin.close()
        except BrokenPipeError:
            pass  # pg_restore stopped reading: it failed, and says why below
        except IntegrityError as e:
            proc.kill()
            proc.wait()
            raise VerifyFailed(f"snapshot: {e}") from e
        except StorageError as e:
            proc.kill()
            proc.wait()
            raise VerifyFailed(describe_error(e, "storage: reading the dump")) from e
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        code = proc.wait()
        t.join(timeout=10)
        self.m.restore_seconds = time.monotonic() - started
        if code != 0:
            errors = [ln for ln in err_lines if ln]
            last = errors[-1] if errors else f"exit code {code}"
            detail = next((ln for ln in errors if "error" in ln.lower()), last)
            raise VerifyFailed(
                f"the dump does not restore: pg_restore into the {where} failed: "
                f"{detail.removeprefix('pg_restore: error: ')}"
            )
        return bytes(head)

    def check(self, psql: str, env: dict[str, str], name: str, head: bytes) -> None:
        target = {**env, "PGDATABASE": name}
        try:
            fields = run_sql(psql, target, _LIST_TABLES + ";", timeout=600)
            restored_counts = count_rows(psql, target)
        except SqlFailed as e:
            raise VerifyFailed(f"checking the restored database {name}: {e}") from e
        listed = {(fields[i + 1], fields[i + 2]) for i in range(0, len(fields) - 2, 3)}
        try:
            dump_tables = pgdump.tables(pgdump.parse_toc(head))
        except ValueError as e:  # a TOC beyond TOC_LIMIT, or one this reader does not know
            dump_tables = []
            self.m.extra["note"] = f"the dump's table list was not read ({e}); tables checked by their counts"
        problems = [
            f"table {t} of the dump is missing after the restore" for t in missing_tables(dump_tables, listed)
        ]
        recorded = self.reader.m.database.row_counts if self.reader.m.database else None
        if recorded is not None:
            problems += compare_counts(recorded, restored_counts)
            self.m.exact = True
        self.m.tables = len(dump_tables) if dump_tables else len(recorded or restored_counts)
        self.m.rows = sum(restored_counts.values())
        if problems:
            more = len(problems) - NAMED_MISMATCHES
            text = "; ".join(problems[:NAMED_MISMATCHES]) + (f"; and {more} more" if more > 0 else "")
            raise VerifyFailed(f"the restored database differs from the backup: {text}")

    # --- files ------------------------------------------------------------------------------

    def files(self) -> None:
        sequential = self.reader.format == 2 or scan(self.reader.entries()).sequential
        entries = self.reader.entries() if sequential else storage_order(self.reader.entries())
        try:
            for _entry, stream in self.reader.contents(entries):
                if stream is None:
                    continue
                while chunk := stream.read(CHUNK):
                    self.counters.add(len(chunk))
                    self.m.file_bytes += len(chunk)
                stream.drain()
                self.m.files += 1
                self.counters.add(nfiles=1)
        except IntegrityError as e:
            raise VerifyFailed(f"files: {e}") from e
        except StorageError as e:
            raise VerifyFailed(describe_error(e, "storage: reading the files")) from e


def run_verify(req: VerifyRequest) -> dict[str, Any]:
    """The drill; returns the result (``passed`` true), or raises :class:`DrillFailed` with the
    reason and what was measured before it."""
    measured = Measured()
    try:
        scratch_env(req)  # a Secret without its keys fails before storage is read
        name = temp_database_name(req.drill_id)
        try:
            store = req.storage.store()
            reader = SnapshotReader(store, req.manifest_key, req.manifest_sha256, keyring=req.keyring)
        except IntegrityError as e:
            raise VerifyFailed(f"snapshot: {e}") from e
        except StorageError as e:
            raise VerifyFailed(describe_error(e, "storage")) from e
        files = reader.files if req.check_files else None
        db = reader.m.database
        counters = Counters(bytes_total=db.dump.bytes if db else 0)
        if files:
            counters.bytes_total += int(files.get("bytes") or 0)
            counters.files_total = int(files.get("count") or 0)
        measured.extra["snapshotId"] = reader.m.snapshot_id
        drill = _Drill(req, reader, measured, counters)
        with Ticker(req.reporter or Reporter("", "", ""), counters):
            counters.stage = "database"
            env, where, client, psql, version_num = drill.prepare()
            failure: VerifyFailed | None = None
            created = False
            why = ""
            try:
                drill.create(psql, env, name, where)
                created = True
                measured.extra["temporaryDatabase"] = name
                head = drill.restore(client, env, name, where)
                counters.stage = "checks"
                drill.check(psql, env, name, head)
            except VerifyFailed as e:
                failure = e
            finally:
                if created:  # whatever happened (a failed check, a SIGTERM, a bug): it goes
                    why = drill.drop(psql, env, name, version_num)
                    measured.extra["temporaryDatabaseDropped"] = not why
            if why:
                drop_note = f"the temporary database {name} could not be dropped: {why}; drop it by hand"
                raise VerifyFailed(f"{failure}; {drop_note}" if failure else drop_note)
            if failure is not None:
                raise failure
            if files:
                counters.stage = "files"
                drill.files()
            counters.stage = "done"
    except VerifyFailed as e:
        raise DrillFailed(str(e), measured.as_dict()) from e
    return {"passed": True, **measured.as_dict()}


class DrillFailed(Exception):
    """The drill ended without passing: the message and what was measured before."""

    def __init__(self, message: str, measured: dict[str, Any]) -> None:
        super().__init__(message)
        self.measured = measured


def drop_leftovers(req: VerifyRequest, drill_ids: list[str]) -> dict[str, Any]:
    """Drop the temporary databases of drills that could not drop their own (an agent killed
    with SIGKILL, a node lost): ``nightjar_verify_<id>`` for each id given, nothing else."""
    env, where = scratch_env(req)
    names = [temp_database_name(i) for i in drill_ids]
    try:
        client = find_client("psql", env, override=req.pg_bindir, root=req.pg_root)
        psql = client.path
        version_num = client.server_version_num or pgclient.parse_server_version_num(
            run_sql(psql, env, "SHOW server_version_num;")[0]
        )
        existing = set(
            run_sql(
                psql,
                env,
                r"SELECT datname FROM pg_catalog.pg_database WHERE datname LIKE 'nightjar\_verify\_%';",
            )
        )
    except (PgClientError, SqlFailed, ValueError, IndexError) as e:
        raise VerifyFailed(f"{where}: {e}") from e
    force = " WITH (FORCE)" if version_num >= 130000 else ""
    dropped, absent = [], []
    for name in names:
        if name not in existing:
            absent.append(name)
            continue
        try:
            run_sql(psql, env, f'DROP DATABASE IF EXISTS :"db"{force};', db=_own(name), timeout=300)
        except SqlFailed as e:
            raise VerifyFailed(f"could not drop {name} on the {where}: {e}") from e
        dropped.append(name)
    return {"dropped": dropped, "absent": absent}
