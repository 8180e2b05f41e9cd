"""Which failed restores a new Pod may simply run again (the agent exits 75, the Job's pod
failure policy then counts it instead of ending the Job): nothing changed and the cause may pass.
Everything else exits 1 and ends the Job: running it again is the user's call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nightjar.agent import cli as agent_cli
from nightjar.agent import restore as restore_mod
from nightjar.agent.patience import StillUnreachable
from nightjar.agent.restore import DATABASE_RESTORED, PARTIAL, UNCHANGED, RestoreFailed
from nightjar.storage.errors import IntegrityError
from nightjar.storage.objects import AccessDenied, ObjectMissing, StorageError


def caused(exc: RestoreFailed, cause: BaseException) -> RestoreFailed:
    exc.__cause__ = cause
    return exc


def integrity_from(cause: BaseException) -> IntegrityError:
    err = IntegrityError("snapshot: reading the manifest failed")
    err.__cause__ = cause
    return err


@pytest.mark.parametrize(
    ("failure", "safe"),
    [
        # The S3 server blinked past the client's own retries, nothing was changed.
        (caused(RestoreFailed("storage: reading the dump", UNCHANGED), StorageError("cannot connect")), True),
        # ... also when the snapshot reader wrapped it.
        (caused(RestoreFailed("snapshot: x", UNCHANGED), integrity_from(StorageError("503 SlowDown"))), True),
        # The database connection was lost mid-way (pg_restore's error, no exception cause).
        (RestoreFailed("pg_restore failed: server closed the connection", UNCHANGED, transient=True), True),
        # Refusals and damage do not pass.
        (caused(RestoreFailed("storage", UNCHANGED), AccessDenied("access denied")), False),
        (caused(RestoreFailed("snapshot", UNCHANGED), integrity_from(ObjectMissing("gone"))), False),
        (caused(RestoreFailed("snapshot", UNCHANGED), IntegrityError("sha256 mismatch")), False),
        (RestoreFailed("pg_restore failed: permission denied", UNCHANGED), False),
        # The wait for the database or the bucket ran out: that patience was the retry.
        (caused(RestoreFailed("storage: ... (waited)", UNCHANGED), StillUnreachable("x")), False),
        # Something was changed: never run again silently.
        (caused(RestoreFailed("files", PARTIAL), StorageError("cannot connect")), False),
        (caused(RestoreFailed("files", DATABASE_RESTORED), StorageError("cannot connect")), False),
    ],
)
def test_retry_safe(failure: RestoreFailed, safe: bool) -> None:
    assert failure.retry_safe is safe


ARGS = [
    "--endpoint",
    "http://s3.test",
    "--bucket",
    "bk",
    "--manifest-key",
    "p/nightjar/v1/ns/src/uid/att/manifest.json",
    "--restore-namespace",
    "shop",
    "--restore-name",
    "r1",
]


@pytest.mark.parametrize(("failure", "code"), [(StorageError("cannot connect"), 75), (AccessDenied("no"), 1)])
def test_the_agent_exits_75_only_when_a_new_pod_may_run_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: StorageError, code: int
) -> None:
    def run_restore(req: object) -> dict[str, object]:
        raise RestoreFailed("storage: reading the dump: ...; nothing was restored", UNCHANGED) from failure

    monkeypatch.setattr(restore_mod, "run_restore", run_restore)
    monkeypatch.setenv("NIGHTJAR_S3_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("NIGHTJAR_S3_SECRET_ACCESS_KEY", "secret")
    result_file = tmp_path / "result"
    out = CliRunner().invoke(agent_cli.restore_cmd, [*ARGS, "--result-file", str(result_file)])
    assert out.exit_code == code, out.output
    assert json.loads(result_file.read_text())["targetState"] == UNCHANGED
