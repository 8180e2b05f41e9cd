"""The restore drill's pure parts and the exact-expectations plumbing: the archive's table of
contents, the temporary database's name, the count comparison, refusals before anything is
created, the manifest's ``database.rowCounts`` and the Job builders. The drill against a real
server and bucket is in tests/integration/test_verify_agent.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nightjar.agent.backup import DatabaseConn
from nightjar.agent.cli import verify_cmd
from nightjar.agent.pgsql import SqlFailed, first_error, parse_counts
from nightjar.agent.pgtools import PgClient
from nightjar.agent.verify import (
    VerifyFailed,
    VerifyRequest,
    _own,
    check_server,
    compare_counts,
    missing_tables,
    scratch_env,
    temp_database_name,
)
from nightjar.config import OperatorConfig
from nightjar.domain import pgclient
from nightjar.domain.pgdump import NeedMoreBytes, NotACustomDump, TocEntry, parse_toc, tables
from nightjar.jobs import (
    BackupPlan,
    StorageRef,
    VerifyPlan,
    build_backup_job,
    build_verify_access,
    build_verify_cleanup_job,
    build_verify_job,
)
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import Database, Manifest, Stream
from nightjar.storage.objects import S3Target
from nightjar.storage.packs import Codec

# --- the archive's table of contents ---------------------------------------------------------


def _int(v: int) -> bytes:
    return (b"\x01" if v < 0 else b"\x00") + abs(v).to_bytes(4, "little")


def _str(s: str | None) -> bytes:
    if s is None:
        return _int(-1)
    raw = s.encode()
    return _int(len(raw)) + raw


def archive(minor: int, entries: list[tuple[int, str, str, str]]) -> bytes:
    """A custom-format archive's header and TOC as pg_dump of archive version 1.<minor> writes it."""
    out = b"PGDMP" + bytes((1, minor, 0)) + b"\x04\x08\x01"
    out += b"\x00" if minor >= 15 else _int(0)
    out += b"".join(_int(v) for v in (7, 18, 3, 3, 11, 126, 0))
    out += _str("shop") + _str("15.18") + _str("15.18")
    out += _int(len(entries))
    for dump_id, desc, ns, tag in entries:
        out += _int(dump_id) + _int(1) + _str("1259") + _str(str(16000 + dump_id))
        out += _str(tag) + _str(desc) + _int(2) + _str("CREATE ...;") + _str("DROP ...;") + _str("")
        out += _str(ns) + _str("")
        if minor >= 14:
            out += _str("heap")
        if minor >= 16:
            out += _int(ord("r"))
        out += _str("app") + _str("false") + _str("12") + _str("13") + _str(None)
        out += b"\x03" + (1234).to_bytes(8, "little")  # data state and offset
    return out + b"data blocks follow"


ENTRIES = [
    (6, "SCHEMA", "", "we.ird"),
    (215, "TABLE", "public", "orders"),
    (216, "TABLE", "we.ird", "Ta|b le"),
    (217, "VIEW", "public", "recent"),
    (3343, "TABLE DATA", "public", "orders"),
]


@pytest.mark.parametrize("minor", [12, 14, 15, 16])
def test_the_toc_lists_the_tables_a_dump_creates(minor: int) -> None:
    toc = parse_toc(archive(minor, ENTRIES))
    assert [e.dump_id for e in toc] == [6, 215, 216, 217, 3343]
    assert toc[2] == TocEntry(216, "TABLE", "we.ird", "Ta|b le")
    assert tables(toc) == [("public", "orders"), ("we.ird", "Ta|b le")]


def test_a_toc_cut_short_asks_for_more_bytes_and_garbage_is_refused() -> None:
    whole = archive(14, ENTRIES)
    with pytest.raises(NeedMoreBytes):
        parse_toc(whole[: len(whole) // 2])
    with pytest.raises(NotACustomDump):
        parse_toc(b"PK\x03\x04 a zip file, not a dump")


# --- the temporary database --------------------------------------------------------------------


def test_the_temporary_database_has_the_fixed_prefix_and_nothing_else_is_touched() -> None:
    assert temp_database_name("3f2a9c1e-77b0-4f7e-9a0d-1c2b3d4e5f60") == (
        "nightjar_verify_3f2a9c1e77b04f7e9a0d1c2b3d4e5f60"
    )
    assert temp_database_name("ABC-x_y") == "nightjar_verify_abcxy"
    assert len(temp_database_name("a" * 200)) == len("nightjar_verify_") + 40 <= 63
    with pytest.raises(VerifyFailed, match="no letters or digits"):
        temp_database_name("--")
    assert _own("nightjar_verify_abc") == "nightjar_verify_abc"
    for other in ("shop", "nightjar_verify_", "nightjar_verify_a; drop database shop", "postgres"):
        with pytest.raises(VerifyFailed, match="refusing to touch"):
            _own(other)


# --- checks --------------------------------------------------------------------------------------


def test_a_count_that_differs_names_the_table_and_both_numbers() -> None:
    recorded = {"public.orders": 5000, "public.customers": 500, '"we.ird"."Ta|b le"': 7}
    assert compare_counts(recorded, dict(recorded)) == []
    problems = compare_counts(recorded, {"public.orders": 4999, "public.customers": 500})
    assert problems == [
        'table "we.ird"."Ta|b le" is missing after the restore (the backup recorded 7 rows)',
        "table public.orders has 4999 rows after the restore, the backup recorded 5000",
    ]


def test_every_table_of_the_dump_must_exist_after_the_restore() -> None:
    dump = [("public", "orders"), ("we.ird", "Ta|b le")]
    assert missing_tables(dump, {("public", "orders"), ("we.ird", "Ta|b le"), ("x", "y")}) == []
    assert missing_tables(dump, {("public", "orders")}) == ["we.ird.Ta|b le"]


def _client(major: int | None, server: int | None = None) -> PgClient:
    choice = None
    if major is not None:
        choice = pgclient.ClientChoice(Path(f"/pg/{major}/bin"), major, pgclient.SAME_MAJOR, "", server)
    return PgClient("pg_restore", f"/pg/{major}/bin/pg_restore", "", "server major", server, choice=choice)


def test_a_scratch_server_older_than_the_dump_is_refused_naming_both_versions() -> None:
    with pytest.raises(VerifyFailed) as e:
        check_server("16.4 (Debian)", 150018, "1.15", _client(15, 150018), "scratch server db:5432 as drill")
    assert str(e.value) == (
        "the scratch server db:5432 as drill runs PostgreSQL 15.18, older than the server the backup was "
        "taken from (16.4): a dump restores only into its own major or a newer one; use a scratch server "
        "of PostgreSQL 16 or newer"
    )
    check_server("15.8", 150018, "1.14", _client(15, 150018), "scratch")  # same major
    check_server("14.2", 170002, "1.14", _client(17, 170002), "scratch")  # newer: fine
    check_server("", 150018, "", _client(None), "scratch")  # unknown: pg_restore decides


def test_a_pg_restore_that_cannot_read_the_archive_is_refused() -> None:
    with pytest.raises(VerifyFailed, match=r"pg_restore into the scratch refused: the dump has archive"):
        check_server("15.8", 150018, "1.16", _client(15, 150018), "scratch")


def test_a_scratch_secret_without_its_keys_is_named_and_dbname_defaults_to_postgres() -> None:
    req = VerifyRequest(
        S3Target("http://s3", "b", "r", "k", "s"), "m", "", DatabaseConn(host="db"), "drill-db"
    )
    with pytest.raises(VerifyFailed) as e:
        scratch_env(req)
    assert str(e.value) == "scratch Secret drill-db: missing key(s) user (or give one key uri)"
    req.scratch = DatabaseConn(host="db", user="drill", password="hunter2")
    env, where = scratch_env(req)
    assert env["PGDATABASE"] == "postgres" and env["PGPASSWORD"] == "hunter2"
    assert where == "scratch server db:5432 as drill" and "hunter2" not in where


def test_the_verify_command_reports_missing_scratch_keys_as_its_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in ("NIGHTJAR_SCRATCH_URI", "NIGHTJAR_SCRATCH_USER", "NIGHTJAR_SCRATCH_NAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NIGHTJAR_S3_ACCESS_KEY_ID", "ak")
    monkeypatch.setenv("NIGHTJAR_S3_SECRET_ACCESS_KEY", "sk")
    monkeypatch.setenv("NIGHTJAR_SCRATCH_HOST", "db")
    monkeypatch.setenv("NIGHTJAR_SCRATCH_PASSWORD", "s3cret-value")
    monkeypatch.setenv("NIGHTJAR_SCRATCH_SECRET", "scratch-pg")
    out = tmp_path / "result.json"
    args = ["--endpoint", "http://127.0.0.1:1", "--bucket", "b", "--manifest-key", "k", "--drill-id", "x"]
    run = CliRunner().invoke(verify_cmd, [*args, "--result-file", str(out)])
    assert run.exit_code == 1
    result = json.loads(out.read_text())
    assert result["passed"] is False
    assert result["error"] == "scratch Secret scratch-pg: missing key(s) user (or give one key uri)"
    assert "s3cret-value" not in out.read_text() + run.output


# --- psql output ---------------------------------------------------------------------------------


def test_counts_are_read_from_nul_separated_output() -> None:
    assert parse_counts(b'public.orders\x005000\x00"we.ird"."Ta|b le"\x007\x00') == {
        "public.orders": 5000,
        '"we.ird"."Ta|b le"': 7,
    }
    assert parse_counts(b"") == {}
    with pytest.raises(SqlFailed):
        parse_counts(b"public.orders\x00")
    with pytest.raises(SqlFailed, match="unexpected row count"):
        parse_counts(b"public.orders\x00many\x00")


def test_psql_errors_are_told_without_psqls_prefixes() -> None:
    assert first_error('psql:<stdin>:1: ERROR:  permission denied for table "orders"\n') == (
        'permission denied for table "orders"'
    )
    assert first_error("psql: error: connection to server failed: FATAL:  no such role\n") == (
        "connection to server failed: FATAL:  no such role"
    )


# --- the manifest --------------------------------------------------------------------------------


def _manifest(row_counts: dict[str, int] | None) -> Manifest:
    db = Database(Stream(10, "ab" * 32), "15.18", "15.18", "1.14.0", "shop", "uncompressed", row_counts)
    return Manifest("snap", "2026-11-30T00:00:00Z", "2026-12-30T00:00:00Z", [], db)


def test_row_counts_round_trip_and_are_absent_when_not_taken() -> None:
    counts = {"public.orders": 5000, '"we.ird"."Ta|b le"': 7}
    back = Manifest.parse(_manifest(counts).to_bytes())
    assert back.database is not None and back.database.row_counts == counts
    assert back.database.summary()["tablesCounted"] == 2 and back.database.summary()["rowsCounted"] == 5007
    plain = Manifest.parse(_manifest(None).to_bytes())
    assert plain.database is not None and plain.database.row_counts is None
    assert "rowCounts" not in plain.database.to_json(2) and "tablesCounted" not in plain.database.summary()


def test_a_manifest_written_before_row_counts_existed_still_reads() -> None:
    d = _manifest(None).database
    assert d is not None
    old = d.to_json(2)
    assert Database.from_json(old).row_counts is None
    # and one with counts is read by a reader that ignores them: the field is additive, format 2
    assert json.loads(_manifest({"a.b": 1}).to_bytes())["formatVersion"] == 2


@pytest.mark.parametrize("bad", [{"a.b": -1}, {"a.b": "5"}, {"a.b": True}, ["a.b"]])
def test_damaged_row_counts_are_a_damaged_manifest(bad: Any) -> None:
    raw = json.loads(_manifest(None).to_bytes(keyring=None))
    content = json.loads(Codec().decode(base64.b64decode(raw["contentZstd"]), raw["contentBytes"], "m"))
    content["database"]["rowCounts"] = bad
    text = json.dumps(content).encode()
    raw["contentZstd"] = base64.b64encode(Codec().encode(text)).decode()
    raw["contentBytes"] = len(text)
    with pytest.raises(IntegrityError, match="not a snapshot manifest"):
        Manifest.parse(json.dumps(raw).encode())


# --- the Job builders ----------------------------------------------------------------------------

STORAGE_SPEC = {
    "endpoint": "https://s3.example",
    "bucket": "bk",
    "region": "eu-west-1",
    "prefix": "p",
    "credentials": {"secretName": "s3creds"},
    "encryption": {"keySecretRef": {"name": "keys"}},
}


def _backup_plan(source: dict[str, Any], **kw: Any) -> BackupPlan:
    return BackupPlan(
        name="b1",
        namespace="shop",
        uid="u",
        backup_type="OnDemand",
        contents="DatabaseOnly",
        source=source,
        source_id="abc",
        expires="2026-12-08T02:10:00Z",
        storage=StorageRef.from_spec(STORAGE_SPEC),
        db_secret="db",
        db_keys=("uri",),
        **kw,
    )


def test_the_backup_job_asks_for_row_counts_when_the_source_or_the_plan_does() -> None:
    db = {"database": {"secretRef": {"name": "db"}}}

    def args(p: BackupPlan) -> list[str]:
        c: dict[str, Any] = build_backup_job(p, OperatorConfig())["spec"]["template"]["spec"]["containers"][0]
        return list(c["args"])

    assert "--row-counts" not in args(_backup_plan(db))
    assert "--row-counts" in args(_backup_plan({**db, "rowCounts": True}))
    assert "--row-counts" in args(_backup_plan(db, row_counts=True))
    assert "--row-counts" not in args(_backup_plan({**db, "rowCounts": False}))


VERIFICATION = {
    "metadata": {"name": "drill-1", "namespace": "shop", "uid": "vuid"},
    "spec": {
        "backupName": "nightly-20261124",
        "scratch": {"database": {"secretRef": {"name": "scratch-pg"}}},
    },
}
BACKUP = {
    "spec": {"contents": "Full", "storageRef": {"name": "s3"}},
    "status": {"phase": "Completed", "storage": {"manifestKey": "p/m.json", "manifestSha256": "f" * 64}},
}


def _verify_job(**kw: Any) -> dict[str, Any]:
    plan = VerifyPlan.of(VERIFICATION, BACKUP, {"spec": STORAGE_SPEC}, ("host", "user", "password"), **kw)
    return build_verify_job(plan, OperatorConfig(agent_image="nightjar:dev"))


def test_the_drill_job_runs_verify_with_the_scratch_secret_by_reference_only() -> None:
    job = _verify_job()
    assert job == _verify_job()  # deterministic
    assert job["metadata"]["name"] == "nightjar-verify-drill-1"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Verification"
    assert job["metadata"]["labels"]["nightjar.dev/verification"] == "drill-1"
    assert job["metadata"]["labels"]["nightjar.dev/backup"] == "nightly-20261124"
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    assert args[:2] == ["agent", "verify"]
    opts = dict(zip(args[2::2], args[3::2], strict=False))
    assert opts["--manifest-key"] == "p/m.json" and opts["--manifest-sha256"] == "f" * 64
    assert opts["--drill-id"] == "$(NIGHTJAR_POD_UID)"
    assert "--database-only" not in args and "--keys-dir" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["NIGHTJAR_SCRATCH_HOST"]["valueFrom"]["secretKeyRef"] == {"name": "scratch-pg", "key": "host"}
    assert env["NIGHTJAR_SCRATCH_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    assert "NIGHTJAR_SCRATCH_NAME" not in env  # the Secret has no dbname: not wired (the agent defaults)
    assert env["NIGHTJAR_SCRATCH_SECRET"] == {"name": "NIGHTJAR_SCRATCH_SECRET", "value": "scratch-pg"}
    assert not any(k.startswith("NIGHTJAR_DB_") for k in env)  # never the source database
    assert all("value" not in e or "PASSWORD" not in e["name"] for e in c["env"])
    assert "serviceAccountName" not in pod and not any(v["name"] == "api" for v in pod["volumes"])
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_a_database_only_backup_is_drilled_without_reading_files_and_progress_is_wired_on_request() -> None:
    db_only = {**BACKUP, "spec": {**BACKUP["spec"], "contents": "DatabaseOnly"}}
    plan = VerifyPlan.of(VERIFICATION, db_only, {"spec": STORAGE_SPEC}, ("uri",), report_progress=True)
    job = build_verify_job(plan, OperatorConfig())
    pod = job["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--database-only" in args
    assert args[args.index("--verification-name") + 1] == "drill-1"
    assert pod["serviceAccountName"] == "nightjar-verify-drill-1"
    sa, role, binding = build_verify_access(plan)
    assert sa["automountServiceAccountToken"] is False
    assert role["rules"] == [
        {
            "apiGroups": ["nightjar.dev"],
            "resources": ["verifications/status"],
            "resourceNames": ["drill-1"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"] == "nightjar-verify-drill-1"


def test_the_cleanup_job_drops_only_the_named_drills_databases_with_the_scratch_secret() -> None:
    plan = VerifyPlan.of(VERIFICATION, BACKUP, {"spec": STORAGE_SPEC}, ("uri",))
    job = build_verify_cleanup_job(plan, ["uid-a", "uid-b"], OperatorConfig())
    assert job["metadata"]["name"] == "nightjar-verify-cleanup-drill-1"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["agent", "verify-cleanup"]
    assert c["args"][2:] == [
        "--result-file",
        "/dev/termination-log",
        "--drill-id",
        "uid-a",
        "--drill-id",
        "uid-b",
    ]
    env = {e["name"]: e for e in c["env"]}
    assert env["NIGHTJAR_SCRATCH_URI"]["valueFrom"]["secretKeyRef"] == {"name": "scratch-pg", "key": "uri"}
    assert not any(k.startswith(("NIGHTJAR_S3", "NIGHTJAR_DB_")) for k in env)  # no storage, no source
