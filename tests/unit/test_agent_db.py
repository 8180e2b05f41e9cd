"""Database connection settings for pg_dump: the password goes only to PGPASSWORD."""

from __future__ import annotations

import pytest

from nightjar.agent.backup import BackupFailed, DatabaseConn


def test_uri_is_split_and_the_password_kept_out_of_the_display_name() -> None:
    env, display = DatabaseConn(uri="postgresql://app%40x:p%2Fw@db.svc:6543/shop?sslmode=require").libpq_env()
    assert env["PGHOST"] == "db.svc"
    assert env["PGPORT"] == "6543"
    assert env["PGUSER"] == "app@x"
    assert env["PGPASSWORD"] == "p/w"
    assert env["PGDATABASE"] == "shop"
    assert env["PGSSLMODE"] == "require"
    assert "p/w" not in display


def test_separate_keys_default_the_port() -> None:
    env, _ = DatabaseConn(host="h", dbname="d", user="u", password="pw").libpq_env()
    assert (env["PGHOST"], env["PGPORT"], env["PGDATABASE"], env["PGUSER"]) == ("h", "5432", "d", "u")


def test_missing_keys_are_named() -> None:
    with pytest.raises(BackupFailed, match="missing key\\(s\\) host, user"):
        DatabaseConn(dbname="d").libpq_env()
    with pytest.raises(BackupFailed, match="postgresql://"):
        DatabaseConn(uri="mysql://x").libpq_env()
