"""Waiting for a database or bucket that is not there: libpq's errors read once (domain.pgerrors),
the agent's wait (agent.patience, agent.pgsql.wait_for_server) run against a stand-in psql that
fails as told and an in-memory bucket that goes down."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from nightjar.agent.patience import StillUnreachable, storage_probe, wait_for
from nightjar.agent.pgsql import SqlFailed, wait_for_server
from nightjar.agent.pgtools import probe_psql
from nightjar.domain.pgerrors import PgErrorKind, classify, is_transient
from nightjar.storage.objects import AccessDenied
from tests.memstore import MemoryStore

REFUSED = (
    'psql: error: connection to server at "db.shop" (10.0.0.5), port 5432 failed: Connection refused\n'
    "\tIs the server running on that host and accepting TCP/IP connections?"
)
STARTING = (
    'psql: error: connection to server at "db" (10.0.0.5), port 5432 failed: '
    "FATAL:  the database system is starting up"
)
BAD_PASSWORD = (
    'psql: error: connection to server at "db" (10.0.0.5), port 5432 failed: '
    'FATAL:  password authentication failed for user "shop"'
)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (REFUSED, PgErrorKind.TRANSIENT),
        (STARTING, PgErrorKind.TRANSIENT),
        ("FATAL:  the database system is shutting down", PgErrorKind.TRANSIENT),
        ("FATAL:  the database system is not yet accepting connections", PgErrorKind.TRANSIENT),
        ("FATAL:  terminating connection due to administrator command", PgErrorKind.TRANSIENT),
        ("FATAL:  sorry, too many clients already", PgErrorKind.TRANSIENT),
        ('connection to server at "db" (10.0.0.5), port 5432 failed: timeout expired', PgErrorKind.TRANSIENT),
        (
            'could not translate host name "db.shop" to address: Name or service not known',
            PgErrorKind.TRANSIENT,
        ),
        (BAD_PASSWORD, PgErrorKind.PERMANENT),
        ('FATAL:  database "shop" does not exist', PgErrorKind.PERMANENT),
        ('FATAL:  role "shop" does not exist', PgErrorKind.PERMANENT),
        ("fe_sendauth: no password supplied", PgErrorKind.PERMANENT),
        ("ERROR:  permission denied for table orders", PgErrorKind.PERMANENT),
        ('ERROR:  relation "orders" does not exist', PgErrorKind.UNKNOWN),
    ],
)
def test_libpq_errors_are_read_in_one_place(message: str, kind: PgErrorKind) -> None:
    assert classify(message) is kind
    assert is_transient(message) is (kind is PgErrorKind.TRANSIENT)


def fake_psql(tmp_path: Path, failures: list[str]) -> Path:
    """A psql that fails with ``failures[i]`` on its i-th run (exit 2, as psql does when it cannot
    connect), then answers; it records the libpq environment it got."""
    for i, text in enumerate(failures):
        (tmp_path / f"fail-{i}").write_text(text + "\n")
    script = tmp_path / "psql"
    script.write_text(
        "#!/bin/sh\n"
        f'dir="{tmp_path}"\n'
        'n=$(cat "$dir/count" 2>/dev/null || echo 0)\n'
        'echo $((n + 1)) > "$dir/count"\n'
        'env | grep ^PG | sort > "$dir/env"\n'
        "cat > /dev/null\n"
        'if [ -f "$dir/fail-$n" ]; then cat "$dir/fail-$n" >&2; exit 2; fi\n'
        "printf '1\\0'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


LIBPQ = {
    "PGHOST": "db.shop",
    "PGPORT": "5432",
    "PGDATABASE": "shop",
    "PGUSER": "shop",
    "PGPASSWORD": "s3cret",
}


def test_a_restarting_server_is_waited_for_with_doubling_waits_and_a_logged_reason(tmp_path: Path) -> None:
    psql = fake_psql(tmp_path, [REFUSED, REFUSED, STARTING, STARTING])
    clock, logged = Clock(), []
    waits = wait_for_server(
        str(psql), LIBPQ, "shop on db.shop:5432", 300, log=logged.append, sleep=clock.sleep, clock=clock
    )
    assert waits == 4
    assert clock.slept == [2, 4, 8, 16]
    assert (tmp_path / "count").read_text().strip() == "5"
    assert "Connection refused); retrying in 2s" in logged[0]
    assert "the database system is starting up); retrying in 16s" in logged[3]
    assert logged[-1] == "database shop on db.shop:5432 answers again after 30s"
    assert not any("s3cret" in line for line in logged)
    env = (tmp_path / "env").read_text()
    assert "PGCONNECT_TIMEOUT=10" in env and "PGHOST=db.shop" in env


def test_waits_are_capped_and_patience_ends_in_a_clear_error(tmp_path: Path) -> None:
    psql = fake_psql(tmp_path, [REFUSED] * 50)
    clock, logged = Clock(), []
    with pytest.raises(SqlFailed) as err:
        wait_for_server(str(psql), LIBPQ, "shop", 120, log=logged.append, sleep=clock.sleep, clock=clock)
    assert clock.slept == [2, 4, 8, 16, 30, 30, 30]  # 120 s waited; one more wait would pass the patience
    assert "Connection refused" in str(err.value)
    assert str(err.value).endswith("(still not reachable after waiting 120s)")


def test_a_refusal_is_not_waited_on(tmp_path: Path) -> None:
    psql = fake_psql(tmp_path, [BAD_PASSWORD])
    clock, logged = Clock(), []
    waits = wait_for_server(str(psql), LIBPQ, "shop", 300, log=logged.append, sleep=clock.sleep, clock=clock)
    assert waits == 0
    assert clock.slept == [] and logged == []


def test_a_server_that_answers_costs_one_query(tmp_path: Path) -> None:
    psql = fake_psql(tmp_path, [])
    clock = Clock()
    assert wait_for_server(str(psql), LIBPQ, "shop", 300, log=print, sleep=clock.sleep, clock=clock) == 0
    assert (tmp_path / "count").read_text().strip() == "1"


def test_no_patience_fails_at_the_first_transient_error(tmp_path: Path) -> None:
    psql = fake_psql(tmp_path, [REFUSED])
    clock = Clock()
    with pytest.raises(SqlFailed, match="still not reachable after waiting 0s"):
        wait_for_server(str(psql), LIBPQ, "shop", 0, log=print, sleep=clock.sleep, clock=clock)


def test_the_probe_psql_is_the_override_then_the_newest_installed_major(tmp_path: Path) -> None:
    for major in ("15", "17"):
        bindir = tmp_path / "root" / major / "bin"
        bindir.mkdir(parents=True)
        for tool in ("psql", "pg_dump"):
            (bindir / tool).write_text("#!/bin/sh\n")
            (bindir / tool).chmod(0o700)
    root = str(tmp_path / "root")
    assert probe_psql(root=root) == f"{root}/17/bin/psql"
    assert probe_psql(override=f"{root}/15/bin", root=root) == f"{root}/15/bin/psql"
    assert probe_psql(override=str(tmp_path / "nothing"), root=root) == f"{root}/17/bin/psql"


def test_a_bucket_that_blinks_is_waited_for_and_a_refusal_is_not() -> None:
    store = MemoryStore("bk")
    store.down = "cannot connect to the S3 endpoint"
    clock, logged = Clock(), []

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now - 1000 >= 6:
            store.down = ""

    waited = wait_for("storage", storage_probe(store.check), 300, log=logged.append, sleep=sleep, clock=clock)
    assert waited == 2
    down = "storage is not reachable (bucket bk at memory://: cannot connect to the S3 endpoint)"
    assert logged == [f"{down}; retrying in 2s", f"{down}; retrying in 4s", "storage answers again after 6s"]
    refusing = MemoryStore("bk")
    refusing.check = lambda: (_ for _ in ()).throw(AccessDenied("bucket bk: access denied"))  # type: ignore[method-assign]
    probe = storage_probe(refusing.check)
    assert wait_for("storage", probe, 300, log=logged.append, sleep=sleep, clock=clock) == 0
    store.down = "503 SlowDown"
    with pytest.raises(StillUnreachable, match=r"503 SlowDown \(still not reachable after waiting 0s\)"):
        wait_for("storage", storage_probe(store.check), 1, log=logged.append, sleep=sleep, clock=clock)
