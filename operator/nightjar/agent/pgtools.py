"""Find the PostgreSQL client tool (pg_dump, pg_restore) for the server the agent talks to.

Without an override, the agent asks the server its version with the newest installed ``psql``
(``SHOW server_version_num``; the same libpq environment as the tool itself, the password only
in PGPASSWORD, argv lists, no shell) and runs the tool of the server's major
(:mod:`nightjar.domain.pgclient`). ``NIGHTJAR_PG_BINDIR`` overrides the choice and skips the
question. When the root holds no versioned clients at all (a custom image), the tool is taken
from ``PATH`` as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightjar.domain import pgclient

#: How long ``psql`` may take to answer the version question (connecting has PGCONNECT_TIMEOUT).
PROBE_TIMEOUT = 120.0


class PgClientError(Exception):
    """No client can be run for the server; the message says why (never with a secret)."""


@dataclass(frozen=True)
class PgClient:
    tool: str
    path: str
    #: ``<tool> --version``, e.g. "pg_dump (PostgreSQL) 15.8".
    version: str
    #: How the client was found: an override, the server's major, a newer major, or PATH.
    chosen_by: str
    server_version_num: int | None = None
    warning: str = ""
    choice: pgclient.ClientChoice | None = None

    def summary(self) -> dict[str, Any]:
        """For the agent's result (the termination message): short."""
        out: dict[str, Any] = {"path": self.path, "version": self.version, "chosenBy": self.chosen_by}
        if self.server_version_num is not None:
            out["serverVersion"] = pgclient.format_server_version(self.server_version_num)
        if self.warning:
            out["warning"] = self.warning[:300]
        return out

    def log_line(self) -> str:
        server = (
            f"server {pgclient.format_server_version(self.server_version_num)}, "
            if self.server_version_num is not None
            else ""
        )
        return f"{self.tool}: {server}{self.version or self.path} at {self.path} (chosen by {self.chosen_by})"


def tool_env(libpq: dict[str, str]) -> dict[str, str]:
    """The environment of every PostgreSQL client the agent runs: PATH, HOME and libpq's."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "."), **libpq}


def tool_version(path: str) -> str:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )
    except OSError:
        return ""
    return out.stdout.strip()


def _first_error(stderr: str, prefix: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    line = next((ln for ln in lines if "error:" in ln.lower()), lines[-1] if lines else "")
    return line.removeprefix(prefix)


def server_version_num(psql: str, libpq: dict[str, str]) -> int:
    """Ask the server ``SHOW server_version_num`` with ``psql``."""
    argv = [psql, "--no-password", "-XAtqc", "SHOW server_version_num"]
    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            env=tool_env(libpq),
            timeout=PROBE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        raise PgClientError(
            f"the server did not tell its version within {PROBE_TIMEOUT:.0f}s (SHOW server_version_num)"
        ) from e
    except OSError as e:
        raise PgClientError(f"could not run {psql} to learn the server's version: {e.strerror or e}") from e
    if out.returncode != 0:
        detail = _first_error(out.stderr, "psql: error: ") or f"psql exit code {out.returncode}"
        raise PgClientError(detail)
    try:
        return pgclient.parse_server_version_num(out.stdout)
    except ValueError as e:
        raise PgClientError(f"could not read the server's version: {e}") from e


def probe_psql(*, override: str = "", root: str = "") -> str:
    """A psql to reach the server with before its version is known: NIGHTJAR_PG_BINDIR's, else the
    newest installed major's, else the one on PATH ("psql" when there is none: running it says so)."""
    if override and (Path(override) / "psql").is_file():
        return str(Path(override) / "psql")
    probe = pgclient.probe_bindir(pgclient.installed_majors(root or pgclient.DEFAULT_ROOT, "psql"), "psql")
    if probe is not None:
        return str(probe / "psql")
    return shutil.which("psql") or "psql"


def find_client(tool: str, libpq: dict[str, str], *, override: str = "", root: str = "") -> PgClient:
    """The ``tool`` to run against the server ``libpq`` names; logs the choice to stderr."""
    if override:
        choice = pgclient.choose_client(None, {}, override, tool=tool)
        path = str(choice.bindir / tool)
        client = PgClient(tool, path, tool_version(path), "NIGHTJAR_PG_BINDIR", choice=choice)
        _log(client)
        return client
    root = root or pgclient.DEFAULT_ROOT
    installed = pgclient.installed_majors(root, tool)
    if not installed:
        found = shutil.which(tool)
        if not found:
            raise PgClientError(
                f"{tool} is not installed in the agent image (no {root}/<major>/bin/{tool}, none on PATH)"
            )
        client = PgClient(tool, found, tool_version(found), "PATH")
        _log(client)
        return client
    probe = pgclient.probe_bindir(installed, "psql")
    if probe is None:
        raise PgClientError(
            f"no psql under {root}/<major>/bin to learn the server's version with; "
            "set NIGHTJAR_PG_BINDIR to the directory holding the client to use"
        )
    number = server_version_num(str(probe / "psql"), libpq)
    try:
        choice = pgclient.choose_client(number, installed, tool=tool, root=root)
    except pgclient.NoSuitableClient as e:
        raise PgClientError(str(e)) from e
    path = str(choice.bindir / tool)
    client = PgClient(
        tool, path, tool_version(path), choice.reason, number, warning=choice.warning, choice=choice
    )
    _log(client)
    return client


def say(line: str) -> None:
    """One line to the agent's log (stderr: ``kubectl logs`` of the Job shows it)."""
    print(line, file=sys.stderr, flush=True)


def _log(client: PgClient) -> None:
    print(client.log_line(), file=sys.stderr, flush=True)
    if client.warning:
        print(f"warning: {client.warning}", file=sys.stderr, flush=True)
