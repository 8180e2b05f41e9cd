"""Choosing the PostgreSQL client of the server's major (domain/pgclient.py), and the agent asking
the server its version with psql (agent/pgtools.py) — with fake client directories whose psql,
pg_dump and pg_restore are small scripts that record how they were run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from nightjar.agent import pgtools
from nightjar.agent.backup import BackupFailed, BackupRequest, DatabaseConn, _dump_client
from nightjar.domain import pgclient
from nightjar.domain.pgclient import (
    NEWER_MAJOR,
    OVERRIDE,
    SAME_MAJOR,
    NoSuitableClient,
    choose_bindir,
    choose_client,
)

ROOT = Path("/usr/lib/postgresql")
ALL = {m: ROOT / str(m) / "bin" for m in (12, 13, 14, 15, 16, 17)}


# --- versions --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num", "major", "text"),
    [
        (120022, 12, "12.22"),
        (150008, 15, "15.8"),
        (170000, 17, "17.0"),
        (180001, 18, "18.1"),
        (90624, 9, "9.6.24"),
    ],
)
def test_server_versions(num: int, major: int, text: str) -> None:
    assert pgclient.server_major(num) == major
    assert pgclient.format_server_version(num) == text


def test_server_version_num_is_read_strictly() -> None:
    assert pgclient.parse_server_version_num("150008\n") == 150008
    for bad in ("", "15.8", "PostgreSQL 15", "1500080000", "abc", "999"):
        with pytest.raises(ValueError, match="server_version_num"):
            pgclient.parse_server_version_num(bad)


# --- the choice ------------------------------------------------------------------------------------


def test_the_override_wins_whatever_the_server_and_the_installed_clients() -> None:
    for server in (None, 120000, 170004, 190000):
        choice = choose_client(server, ALL, "/opt/pg/bin")
        assert (choice.bindir, choice.major, choice.reason, choice.warning) == (
            Path("/opt/pg/bin"),
            None,
            OVERRIDE,
            "",
        )
    assert choose_bindir(None, {}, "/opt/pg/bin") == Path("/opt/pg/bin")
    # An empty NIGHTJAR_PG_BINDIR is no override.
    assert choose_bindir(150008, ALL, "") == ROOT / "15" / "bin"


@pytest.mark.parametrize("major", [12, 13, 14, 15, 16, 17])
def test_every_supported_major_gets_its_own_client(major: int) -> None:
    for tool in ("pg_dump", "pg_restore"):
        choice = choose_client(major * 10000 + 3, ALL, None, tool=tool)
        assert (choice.bindir, choice.major, choice.reason, choice.warning) == (
            ROOT / str(major) / "bin",
            major,
            SAME_MAJOR,
            "",
        )


def test_majors_may_be_given_as_a_list_under_a_root() -> None:
    assert choose_bindir(140011, [17, 14, 12], None, root="/x") == Path("/x/14/bin")
    assert choose_bindir(140011, [17, 14, 12], None) == ROOT / "14" / "bin"


def test_without_the_server_s_major_the_closest_newer_client_is_used_with_a_warning() -> None:
    installed = {m: ALL[m] for m in (12, 15, 17)}
    dump = choose_client(130015, installed, None, tool="pg_dump")
    assert (dump.bindir, dump.major, dump.reason) == (ALL[15], 15, NEWER_MAJOR)
    assert "no client of major 13" in dump.warning
    restore = choose_client(130015, installed, None, tool="pg_restore")
    assert (restore.bindir, restore.major) == (ALL[15], 15)
    assert "pg_restore 15 restores into server 13.15" in restore.warning
    assert "transaction_timeout" in restore.warning
    assert "12, 15, 17" in restore.warning
    # Closest, not newest: 17 for a 16 server when 18 is there too.
    assert choose_client(160004, {15: ALL[15], 17: ALL[17], 18: Path("/x")}, None).major == 17
    # Older servers than every client: the oldest client (pg_dump reads servers back to 9.2).
    assert choose_client(110022, installed, None).bindir == ALL[12]


def test_a_server_newer_than_every_client_is_refused_with_both_named() -> None:
    with pytest.raises(NoSuitableClient) as e:
        choose_client(180001, ALL, None, tool="pg_dump")
    msg = str(e.value)
    assert "server 18.1" in msg
    assert "12, 13, 14, 15, 16, 17" in msg
    assert "NIGHTJAR_PG_BINDIR" in msg
    with pytest.raises(NoSuitableClient, match="installed client majors none"):
        choose_client(150008, {}, None)
    with pytest.raises(NoSuitableClient, match="version is not known"):
        choose_client(None, ALL, None)


def test_a_dump_of_a_newer_major_is_not_restorable_with_an_older_client() -> None:
    into_15 = choose_client(150008, ALL, None, tool="pg_restore")
    msg = pgclient.unreadable_archive("1.16", into_15, "17.2")
    assert "archive version 1.16 (written by pg_dump 17.2)" in msg
    assert "pg_restore 15, chosen for the server 15.8, cannot read" in msg
    assert "pg_dump 16 or later" in pgclient.unreadable_archive("1.15.0", into_15)
    assert pgclient.unreadable_archive("1.14", into_15) == ""
    into_17 = choose_client(170004, ALL, None, tool="pg_restore")
    for version in ("1.12", "1.14", "1.15", "1.16"):
        assert pgclient.unreadable_archive(version, into_17) == ""
    # Unknown to this table: nothing is claimed.
    assert pgclient.unreadable_archive("1.16", choose_client(None, ALL, "/opt/pg/bin")) == ""
    assert pgclient.unreadable_archive("", into_15) == ""
    assert pgclient.unreadable_archive("1.17", choose_client(180000, {18: Path("/x")}, None)) == ""


# --- installed majors -------------------------------------------------------------------------------


def _touch_exe(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def test_installed_majors_are_the_bin_directories_holding_the_tool(tmp_path: Path) -> None:
    for major in ("12", "15", "17"):
        _touch_exe(tmp_path / major / "bin" / "pg_dump")
    _touch_exe(tmp_path / "16" / "bin" / "psql")  # no pg_dump: not a client
    (tmp_path / "lib").mkdir()
    (tmp_path / "16beta").mkdir()
    assert pgclient.installed_majors(tmp_path) == {
        12: tmp_path / "12" / "bin",
        15: tmp_path / "15" / "bin",
        17: tmp_path / "17" / "bin",
    }
    assert list(pgclient.installed_majors(tmp_path)) == [12, 15, 17]
    assert pgclient.installed_majors(tmp_path, "psql") == {16: tmp_path / "16" / "bin"}
    assert pgclient.installed_majors(tmp_path / "missing") == {}


def test_the_version_is_asked_with_the_newest_psql(tmp_path: Path) -> None:
    for major in ("12", "17"):
        _touch_exe(tmp_path / major / "bin" / "psql")
    _touch_exe(tmp_path / "18" / "bin" / "pg_dump")  # no psql there
    installed = {12: tmp_path / "12/bin", 17: tmp_path / "17/bin", 18: tmp_path / "18/bin"}
    assert pgclient.probe_bindir(installed) == tmp_path / "17" / "bin"
    assert pgclient.probe_bindir({}) is None


# --- the agent: psql, then the tool of the server's major ------------------------------------------

#: A fake client: records how it was run in <root>/log.jsonl; psql answers what <root>/server
#: holds ("fail:<message>" fails like a connection error). It sees only the environment the agent
#: gives it, so the files, not the environment, configure it.
FAKE = """#!{python}
import json, os, sys
exe = os.path.abspath(sys.argv[0])
name = os.path.basename(exe)
bindir = os.path.dirname(exe)
major = os.path.basename(os.path.dirname(bindir))
root = os.path.dirname(os.path.dirname(bindir))
with open(os.path.join(root, "log.jsonl"), "a") as log:
    record = {{"tool": name, "major": major, "argv": sys.argv[1:]}}
    record.update(password=os.environ.get("PGPASSWORD"), host=os.environ.get("PGHOST"))
    log.write(json.dumps(record) + "\\n")
if "--version" in sys.argv:
    print(f"{{name}} (PostgreSQL) {{major}}.9")
    sys.exit(0)
if name == "psql":
    with open(os.path.join(root, "server")) as f:
        answer = f.read()
    if answer.startswith("fail:"):
        sys.stderr.write("psql: error: " + answer[5:] + "\\n")
        sys.exit(2)
    print(answer)
"""


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "postgresql"
    for major in ("13", "15", "17"):
        for tool in ("psql", "pg_dump", "pg_restore"):
            _touch_exe(root / major / "bin" / tool, FAKE.format(python=sys.executable))
    return root


def _server(root: Path, answer: str) -> None:
    (root / "server").write_text(answer)


def _log(root: Path) -> list[dict[str, object]]:
    text = (root / "log.jsonl").read_text()
    return [json.loads(ln) for ln in text.splitlines()]


LIBPQ, DISPLAY = DatabaseConn(host="db.svc", dbname="shop", user="shop", password="s3cret pw").libpq_env()


def test_the_agent_runs_the_client_of_the_server_s_major(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _server(fake_root, "150008")
    client = pgtools.find_client("pg_dump", LIBPQ, root=str(fake_root))
    assert client.path == str(fake_root / "15" / "bin" / "pg_dump")
    assert client.version == "pg_dump (PostgreSQL) 15.9"
    assert client.summary() == {
        "path": client.path,
        "version": "pg_dump (PostgreSQL) 15.9",
        "chosenBy": SAME_MAJOR,
        "serverVersion": "15.8",
    }
    probe, version = _log(fake_root)
    # The newest psql asks; the password only ever in the environment, never on argv.
    assert probe == {
        "tool": "psql",
        "major": "17",
        "argv": ["--no-password", "-XAtqc", "SHOW server_version_num"],
        "password": "s3cret pw",
        "host": "db.svc",
    }
    assert (version["tool"], version["major"], version["argv"]) == ("pg_dump", "15", ["--version"])
    assert "s3cret" not in json.dumps([probe["argv"], version["argv"]])
    err = capsys.readouterr().err
    assert "pg_dump: server 15.8, pg_dump (PostgreSQL) 15.9 at" in err
    assert "s3cret" not in err


def test_a_restore_into_a_server_without_its_major_warns(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _server(fake_root, "140011")
    client = pgtools.find_client("pg_restore", LIBPQ, root=str(fake_root))
    assert client.path == str(fake_root / "15" / "bin" / "pg_restore")
    assert client.chosen_by == NEWER_MAJOR
    assert "pg_restore 15 restores into server 14.11" in client.summary()["warning"]
    assert "warning: pg_restore 15 restores into server 14.11" in capsys.readouterr().err


def test_the_override_asks_nothing(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _server(fake_root, "fail:must not be asked")
    override = str(fake_root / "13" / "bin")
    client = pgtools.find_client("pg_restore", LIBPQ, override=override, root=str(fake_root))
    assert client.path == os.path.join(override, "pg_restore")
    assert client.chosen_by == "NIGHTJAR_PG_BINDIR"
    assert "serverVersion" not in client.summary()
    assert [e["tool"] for e in _log(fake_root)] == ["pg_restore"]  # only --version


def test_connection_failures_and_unknown_servers_become_backup_failures(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    req = BackupRequest.__new__(BackupRequest)
    req.pg_bindir, req.pg_root = "", str(fake_root)
    _server(
        fake_root,
        'fail:connection to server at "db.svc" (10.0.0.9), port 5432 failed: FATAL:  '
        'password authentication failed for user "shop"',
    )
    with pytest.raises(BackupFailed) as e:
        _dump_client(req, LIBPQ, DISPLAY)
    assert str(e.value) == (
        'pg_dump of shop on db.svc:5432 as shop failed: connection to server at "db.svc" (10.0.0.9), '
        'port 5432 failed: FATAL:  password authentication failed for user "shop"'
    )
    _server(fake_root, "180001")
    with pytest.raises(BackupFailed, match=r"no PostgreSQL client for server 18\.1 .* majors 13, 15, 17"):
        _dump_client(req, LIBPQ, DISPLAY)
    _server(fake_root, "not a number")
    with pytest.raises(BackupFailed, match="could not read the server's version"):
        _dump_client(req, LIBPQ, DISPLAY)


def test_without_versioned_clients_the_tool_comes_from_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    _touch_exe(bindir / "pg_dump", "#!/bin/sh\necho 'pg_dump (PostgreSQL) 16.4'\n")
    monkeypatch.setenv("PATH", str(bindir))
    client = pgtools.find_client("pg_dump", LIBPQ, root=str(tmp_path / "empty"))
    assert (client.path, client.version, client.chosen_by) == (
        str(bindir / "pg_dump"),
        "pg_dump (PostgreSQL) 16.4",
        "PATH",
    )
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(pgtools.PgClientError, match="pg_restore is not installed in the agent image"):
        pgtools.find_client("pg_restore", LIBPQ, root=str(tmp_path / "empty"))


REAL_15 = Path("/usr/lib/postgresql/15/bin")


@pytest.mark.skipif(not (REAL_15 / "pg_dump").is_file(), reason="needs Debian's PostgreSQL 15 client")
def test_a_root_of_real_clients_is_found(tmp_path: Path) -> None:
    """The layout the image has, built from this machine's PostgreSQL 15 (the dev stack's)."""
    root = tmp_path / "postgresql"
    root.mkdir()
    (root / "15").symlink_to(REAL_15.parent)
    installed = pgclient.installed_majors(root)
    assert installed == {15: root / "15" / "bin"}
    assert pgclient.probe_bindir(installed) == root / "15" / "bin"
    assert choose_bindir(150014, installed, None, tool="pg_restore") == root / "15" / "bin"
    assert pgtools.tool_version(str(root / "15" / "bin" / "pg_dump")).startswith("pg_dump (PostgreSQL) 15.")
