"""The SQL the agent runs itself, through ``psql`` (the image's client; no driver in the agent).

Three things:

* :class:`ExportedSnapshot`: a ``REPEATABLE READ`` transaction kept open in one ``psql`` session
  whose ``pg_export_snapshot()`` id ``pg_dump --snapshot`` imports, so the dump and the row
  counts taken in that same transaction see exactly the same data;
* :func:`count_rows`: each user table's exact row count (``SELECT count(*)``), in whatever
  transaction the session is in.

No SQL is built from a name in Python: the server writes each count statement itself with
``format('%I.%I')`` (identifiers quoted by PostgreSQL's own rules) and psql's ``\\gexec`` runs
them. Output is read with NUL separators (``-z -0``), which no identifier can contain. A table is
named ``schema.table`` as ``format('%I.%I')`` writes it: plain names bare, any other quoted
(``public."Order Lines"``), so the name is unambiguous.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

from nightjar.agent import patience as patience_
from nightjar.agent.pgtools import say, tool_env
from nightjar.domain import pgerrors

#: The user tables pg_dump dumps the rows of (ordinary and partitioned tables outside the system
#: schemas, not members of an extension), each as a count statement written by the server.
COUNT_STATEMENTS = r"""
SELECT format('SELECT %L, count(*) FROM %I.%I', format('%I.%I', n.nspname, c.relname), n.nspname, c.relname)
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p')
   AND n.nspname <> 'information_schema'
   AND n.nspname !~ '^pg_'
   AND NOT EXISTS (
         SELECT 1 FROM pg_catalog.pg_depend d
          WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
            AND d.objid = c.oid AND d.deptype = 'e')
 ORDER BY n.nspname, c.relname
"""

#: How long the count statements may take together (they scan every table once).
COUNT_TIMEOUT = 6 * 3600.0


class SqlFailed(Exception):
    """psql reported an error; the message is the server's (never a secret)."""


def psql_argv(psql: str) -> list[str]:
    """psql reading statements from stdin: unaligned, tuples only, NUL-separated, stop on error."""
    return [psql, "--no-password", "-X", "-A", "-t", "-q", "-z", "-0", "-v", "ON_ERROR_STOP=1"]


def first_error(stderr: str) -> str:
    """The line of psql's stderr that says what went wrong, without psql's prefix."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    line = next((ln for ln in lines if "ERROR:" in ln or "error:" in ln), lines[-1] if lines else "")
    for prefix in ("psql:<stdin>:", "psql: error: "):
        if line.startswith(prefix):
            line = line[len(prefix) :]
            if prefix == "psql:<stdin>:":
                line = line.split(": ", 1)[-1]
    return line.removeprefix("ERROR:  ").strip()


def parse_counts(out: bytes) -> dict[str, int]:
    """``name NUL count NUL ...`` (psql ``-z -0`` output of the count statements) as a dict."""
    fields = out.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) % 2:
        raise SqlFailed(f"unexpected output of the row counts ({len(fields)} fields)")
    counts: dict[str, int] = {}
    for i in range(0, len(fields), 2):
        name = fields[i].decode("utf-8", errors="replace").lstrip("\n")
        try:
            counts[name] = int(fields[i + 1].strip())
        except ValueError as e:
            raise SqlFailed(f"unexpected row count for {name}: {fields[i + 1][:40]!r}") from e
    return counts


def count_script() -> bytes:
    """The count statements, written by the server and run by psql (``\\gexec``)."""
    return (COUNT_STATEMENTS.strip() + " \\gexec\n").encode()


def count_rows(psql: str, libpq: dict[str, str], timeout: float = COUNT_TIMEOUT) -> dict[str, int]:
    """Every user table's exact row count in the database ``libpq`` names (its own transaction)."""
    try:
        out = subprocess.run(
            psql_argv(psql),
            input=b"SET statement_timeout = 0;\n" + count_script(),
            capture_output=True,
            check=False,
            env=tool_env(libpq),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise SqlFailed(f"counting the rows took longer than {timeout:.0f}s") from e
    except OSError as e:
        raise SqlFailed(f"could not run {psql}: {e.strerror or e}") from e
    if out.returncode != 0:
        raise SqlFailed(
            first_error(out.stderr.decode(errors="replace")) or f"psql exit code {out.returncode}"
        )
    return parse_counts(out.stdout)


def run_sql(
    psql: str, libpq: dict[str, str], sql: str, timeout: float = 120.0, **variables: str
) -> list[str]:
    """Run fixed SQL; every field of every row, in order. A name goes in as a psql variable
    (``-v db=...``, written ``:"db"`` in the SQL: psql quotes it as an identifier), never into
    the SQL text."""
    argv = psql_argv(psql)
    for k, v in variables.items():
        argv += ["-v", f"{k}={v}"]
    try:
        out = subprocess.run(
            argv,
            input=sql.encode(),
            capture_output=True,
            check=False,
            env=tool_env(libpq),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise SqlFailed(f"the server did not answer within {timeout:.0f}s") from e
    except OSError as e:
        raise SqlFailed(f"could not run {psql}: {e.strerror or e}") from e
    if out.returncode != 0:
        raise SqlFailed(
            first_error(out.stderr.decode(errors="replace")) or f"psql exit code {out.returncode}"
        )
    fields = out.stdout.decode("utf-8", errors="replace").split("\0")
    if fields and fields[-1] == "":
        fields.pop()
    return [f.lstrip("\n") for f in fields]


class ExportedSnapshot:
    """One psql session holding ``BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY`` and the id
    of its exported snapshot, valid until :meth:`close` ends the transaction.

    ``pg_dump --snapshot=<id>`` sees the database as this transaction does; :meth:`count_rows`
    counts in this transaction. Use as a context manager: the session always ends (rolled back:
    it changed nothing).
    """

    def __init__(self, psql: str, libpq: dict[str, str]) -> None:
        self.psql = psql
        self.libpq = libpq
        self.proc: subprocess.Popen[bytes] | None = None
        self.snapshot_id = ""
        self._err: list[str] = []
        self._err_thread: threading.Thread | None = None

    def __enter__(self) -> ExportedSnapshot:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stderr(self) -> str:
        if self._err_thread is not None:
            self._err_thread.join(timeout=5)
        return "\n".join(self._err)

    def open(self) -> str:
        try:
            proc = subprocess.Popen(
                psql_argv(self.psql),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=tool_env(self.libpq),
            )
        except OSError as e:
            raise SqlFailed(f"could not run {self.psql}: {e.strerror or e}") from e
        self.proc = proc
        stderr = proc.stderr
        if stderr is None:
            raise RuntimeError("psql pipes are missing")

        def drain(stream: IO[bytes]) -> None:
            for raw in stream:
                self._err.append(raw.decode(errors="replace").rstrip())
                del self._err[:-20]

        self._err_thread = threading.Thread(target=drain, args=(stderr,), daemon=True)
        self._err_thread.start()
        # The session waits, idle in its transaction, while pg_dump runs: a server's
        # idle_in_transaction_session_timeout must not end it (nor statement_timeout the counts).
        self._send(
            "SET idle_in_transaction_session_timeout = 0;\nSET statement_timeout = 0;\n"
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;\nSELECT pg_catalog.pg_export_snapshot();\n"
        )
        value = self._read_record()
        if not value:
            self.close()
            raise SqlFailed(first_error(self._stderr()) or "pg_export_snapshot() gave no snapshot")
        self.snapshot_id = value
        return value

    def _send(self, text: str) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise SqlFailed("the snapshot session is not open")
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise SqlFailed(first_error(self._stderr()) or "psql ended the session") from e

    def _read_record(self) -> str:
        """Read up to the next NUL (one single-column record); "" when psql ended first."""
        if self.proc is None or self.proc.stdout is None:
            return ""
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            byte = os.read(fd, 1)
            if not byte:
                return ""
            if byte == b"\0":
                return buf.decode("utf-8", errors="replace").strip()
            buf += byte

    def count_rows(self, timeout: float = COUNT_TIMEOUT) -> dict[str, int]:
        """Each user table's row count in this snapshot; ends the session (rolled back)."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise SqlFailed("the snapshot session is not open")
        self._send(count_script().decode() + "ROLLBACK;\n")
        self.proc = None
        proc.stdin.close()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            out = proc.stdout.read()
            code = proc.wait()
        finally:
            killer.cancel()
            proc.stdout.close()
        if code < 0:
            raise SqlFailed(f"counting the rows took longer than {timeout:.0f}s")
        if code != 0:
            raise SqlFailed(first_error(self._stderr()) or f"psql exit code {code}")
        return parse_counts(out)

    def close(self) -> None:
        """End the transaction (rolled back) and the session; safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.write(b"ROLLBACK;\n\\q\n")
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_for_server(
    psql: str,
    libpq: dict[str, str],
    display: str,
    patience: float,
    *,
    log: Callable[[str], None] = say,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Wait while the server ``libpq`` names is not there (:func:`patience.wait_for`); the number
    of waits it took. Returns as soon as ``SELECT 1`` answers, or fails with an error no wait gets
    past (a refused password, a database that does not exist ...): the tool run next reports that
    in its own words. A transient error (refused connection, starting up, shutting down, too many
    clients ...) is waited out for up to ``patience`` seconds; then :class:`SqlFailed` says what
    the server answered last."""

    def probe() -> str:
        try:
            # libpq gives up on a silent host itself and says "timeout expired" (transient).
            run_sql(psql, {"PGCONNECT_TIMEOUT": "10", **libpq}, "SELECT 1;\n", timeout=60.0)
        except SqlFailed as e:
            return str(e) if pgerrors.is_transient(str(e)) else ""
        return ""

    try:
        return patience_.wait_for(f"database {display}", probe, patience, log=log, sleep=sleep, clock=clock)
    except patience_.StillUnreachable as e:
        raise SqlFailed(str(e)) from e
