"""Restore drills on the real stack, below the reconciler (issue 16): a Backup with
``source.rowCounts`` records its tables' exact row counts, taken in the dump's own snapshot while
rows are written; the drill (``nightjar agent verify``), run as the Job ``build_verify_job``
builds, restores a snapshot into a temporary database on a scratch server, compares, drops it,
and reads every file back. Snapshots that are internally consistent but wrong (a damaged dump, a
count that differs) are written through the storage seam, as an agent bug would write them.

Nothing mocked: the stack's API server, PostgreSQL, MinIO and node (the image on the real node).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from nightjar.config import OperatorConfig
from nightjar.constants import LABEL_VERIFICATION
from nightjar.devstack import realnode
from nightjar.domain import pgdump
from nightjar.jobs import VerifyPlan, build_verify_job
from nightjar.storage import layout
from nightjar.storage.objects import S3Target
from nightjar.storage.snapshot import SnapshotReader
from nightjar.storage.writer import SnapshotWriter
from tests.integration.helpers import (
    SCRATCH_SECRET,
    G,
    V,
    backup_body,
    make_storage,
    psql,
    take_backup,
    temp_databases,
)
from tests.support import wait_for

SCRATCH_KEYS = ("host", "port", "user", "password")


# --- fixtures and helpers ------------------------------------------------------------------------


def agent_config(env: dict[str, str]) -> OperatorConfig:
    """The configuration the stack's operator runs its Jobs with."""
    if env.get("NIGHTJAR_NODE") == "real":
        return OperatorConfig(agent_image=realnode.PROJECT_IMAGE, agent_image_pull_policy="Never")
    return OperatorConfig(agent_extra_env={"NIGHTJAR_PG_BINDIR": env["NIGHTJAR_PG_BINDIR"]})


def drill(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    ns: str,
    name: str,
    backup: dict[str, Any],
    storage: dict[str, Any],
    keys: tuple[str, ...] = SCRATCH_KEYS,
) -> tuple[bool, dict[str, Any]]:
    """Create a Verification of ``backup`` and run its drill as the Job the builder makes;
    (whether the Job succeeded, the agent's result)."""
    verification = custom.create_namespaced_custom_object(
        G,
        V,
        ns,
        "verifications",
        {
            "apiVersion": f"{G}/{V}",
            "kind": "Verification",
            "metadata": {"name": name},
            "spec": {
                "backupName": backup["metadata"]["name"],
                "scratch": {"database": {"secretRef": {"name": SCRATCH_SECRET}}},
            },
        },
    )
    job = build_verify_job(VerifyPlan.of(verification, backup, storage, keys), agent_config(env))
    try:
        batch.create_namespaced_job(ns, job)
    except client.ApiException as e:
        # The stack's operator drills a Verification of a Backup it knows itself (the same Job);
        # of a snapshot written here (no Backup object) it refuses, and this Job runs.
        if e.status != 409:
            raise

    def finished() -> Any:
        st = batch.read_namespaced_job_status(job["metadata"]["name"], ns).status
        done = {c.type for c in st.conditions or [] if c.status == "True"} & {"Complete", "Failed"}
        return done or None

    (outcome,) = wait_for(f"drill Job of {name}", finished, 300)
    (pod,) = core.list_namespaced_pod(ns, label_selector=f"{LABEL_VERIFICATION}={name}").items
    message = pod.status.container_statuses[0].state.terminated.message
    result: dict[str, Any] = json.loads(message)
    print(f"{name}: {message}")
    return outcome == "Complete", result


def agent_process_env(core: client.CoreV1Api, env: dict[str, str], ns: str) -> dict[str, str]:
    """What the drill's Job gives the agent, for an agent run as a process of this host."""
    secret = core.read_namespaced_secret(SCRATCH_SECRET, ns).data
    return {
        **os.environ,
        **{f"NIGHTJAR_SCRATCH_{k.upper()}": base64.b64decode(v).decode() for k, v in secret.items()},
        "NIGHTJAR_SCRATCH_SECRET": SCRATCH_SECRET,
        "NIGHTJAR_S3_ACCESS_KEY_ID": env["NIGHTJAR_S3_ACCESS_KEY"],
        "NIGHTJAR_S3_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_SECRET_KEY"],
        "NIGHTJAR_PG_BINDIR": env["NIGHTJAR_PG_BINDIR"],
    }


AGENT = str(Path(sys.executable).parent / "nightjar")


def pg_dump_bytes(env: dict[str, str], db: str) -> bytes:
    dsn = env["NIGHTJAR_PG_DSN"].rsplit("/", 1)[0] + f"/{db}"
    return subprocess.run(
        [os.path.join(env["NIGHTJAR_PG_BINDIR"], "pg_dump"), "-Fc", "-Z0", "-O", "-x", dsn],
        capture_output=True,
        check=True,
    ).stdout


def store_snapshot(
    env: dict[str, str],
    ns: str,
    dump: bytes,
    row_counts: dict[str, int] | None,
    server_version: str = "",
    source: str = "handmade",
) -> dict[str, Any]:
    """A snapshot written through the storage seam as the backup agent writes one (every digest
    right), of ``dump`` whatever it holds; a Backup-shaped dict that names it."""
    target = S3Target(
        endpoint=env["NIGHTJAR_S3_ENDPOINT"],
        bucket=env["NIGHTJAR_S3_BUCKET_PLAIN"],
        region="us-east-1",
        access_key=env["NIGHTJAR_S3_ACCESS_KEY"],
        secret_key=env["NIGHTJAR_S3_SECRET_KEY"],
        prefix=f"tests/{ns}",
    )
    uid, attempt = uuid.uuid4().hex, uuid.uuid4().hex
    loc = layout.SnapshotLocation(target.prefix, ns, source, uid, attempt)
    w = SnapshotWriter(target.store(), loc)
    stream = w.dump_stream()
    stream.write(dump)
    header = pgdump.parse_header(dump[:4096])
    database = w.database(
        stream,
        pg_dump_version=header.pg_dump_version,
        server_version=server_version or header.server_version,
        archive_version=header.archive_version_text,
        dbname=header.database,
    )
    database.row_counts = row_counts
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    key, digest, _ = w.commit(
        created=now,
        expires=now + dt.timedelta(days=1),
        database=database,
        files=None,
        backup={"namespace": ns, "name": "handmade", "uid": uid, "type": "OnDemand"},
        source=source,
        contents="DatabaseOnly",
        model_version="",
    )
    # Internally consistent: the whole dump reads back with every digest right.
    reader = SnapshotReader(target.store(), key, digest)
    body = reader.open_dump()
    assert len(body.read()) == len(dump)
    return {
        "metadata": {"name": f"handmade-{attempt[:6]}"},
        "spec": {"contents": "DatabaseOnly", "storageRef": {"name": "s3"}},
        "status": {"phase": "Completed", "storage": {"manifestKey": key, "manifestSha256": digest}},
    }


class Writer:
    """Inserts into orders every few milliseconds until stopped: rows written while a backup runs."""

    def __init__(self, env: dict[str, str], db: str) -> None:
        self.env, self.db = env, db
        self.inserted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            psql(self.env, self.db, "insert into orders (customer, total) values (1, 1)")
            self.inserted += 1
            time.sleep(0.01)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


# --- the tests -----------------------------------------------------------------------------------


def test_counts_are_taken_in_the_dumps_snapshot_and_a_drill_of_it_passes_exactly(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    scratch: str,
    s3: Any,
) -> None:
    storage = make_storage(custom, core, env, namespace)
    # A larger table makes the dump take a while; rows go into orders all along.
    psql(
        env,
        app_db,
        f"set role {app_db}; create table padding as "
        "select g as id, repeat('p', 200) as filler from generate_series(1, 150000) g",
    )
    body = backup_body("counted")
    body["spec"]["source"]["rowCounts"] = True
    with Writer(env, app_db) as writer:
        st = take_backup(custom, namespace, body, timeout=300)
        during = writer.inserted
    final = int(psql(env, app_db, "select count(*) from orders"))
    assert during > 0, "no row was written while the backup ran"

    reader = SnapshotReader(s3, env["NIGHTJAR_S3_BUCKET_PLAIN"], st["storage"]["manifestKey"])
    assert reader.m.database is not None
    counts = reader.m.database.row_counts
    assert counts is not None
    assert set(counts) == {"public.customers", "public.orders", "public.padding"}
    assert counts["public.customers"] == 500 and counts["public.padding"] == 150000
    assert 5000 <= counts["public.orders"] <= final
    assert st["database"]["tablesCounted"] == 3
    assert st["database"]["rowsCounted"] == sum(counts.values())
    print(f"orders: {counts['public.orders']} counted in the snapshot, {final} after the backup")

    backup = custom.get_namespaced_custom_object(G, V, namespace, "backups", "counted")
    ok, result = drill(custom, core, batch, env, namespace, "counted-drill", backup, storage)
    # The restored dump holds exactly the counted rows: counts and dump are one snapshot.
    assert ok and result["passed"] is True, result
    assert result["exactCounts"] is True
    assert result["tablesChecked"] == 3
    assert result["rowsChecked"] == sum(counts.values())
    assert result["restoreSeconds"] > 0
    regular = sum(1 for p in files_pvc.rglob("*") if p.is_file() and not p.is_symlink())
    assert result["filesChecked"] == regular
    assert result["bytesChecked"] == sum(
        p.stat().st_size for p in files_pvc.rglob("*") if p.is_file() and not p.is_symlink()
    )
    assert result["temporaryDatabase"].startswith("nightjar_verify_")
    assert result["temporaryDatabaseDropped"] is True
    assert result["temporaryDatabase"] not in temp_databases(env)
    # the source database was read, never written: the writer's rows are all still there
    assert int(psql(env, app_db, "select count(*) from orders")) == final


def test_a_damaged_dump_under_a_valid_manifest_fails_with_pg_restores_reason(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    scratch: str,
) -> None:
    storage = make_storage(custom, core, env, namespace)
    dump = pg_dump_bytes(env, app_db)
    # A silently short stream (k8up#1109): the archive ends inside the orders table's data.
    short = dump[: len(dump) * 2 // 3]
    backup = store_snapshot(env, namespace, short, {"public.customers": 500, "public.orders": 5000})
    ok, result = drill(custom, core, batch, env, namespace, "short-dump", backup, storage)
    assert not ok and result["passed"] is False
    error = result["error"]
    assert error.startswith("the dump does not restore: pg_restore into the scratch server"), error
    assert "could not read from input file" in error or "unexpected end of file" in error, error
    assert result["temporaryDatabaseDropped"] is True
    assert result["temporaryDatabase"] not in temp_databases(env)


def test_a_recorded_count_that_differs_fails_naming_the_table_and_both_numbers(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    scratch: str,
) -> None:
    storage = make_storage(custom, core, env, namespace)
    dump = pg_dump_bytes(env, app_db)
    backup = store_snapshot(env, namespace, dump, {"public.customers": 500, "public.orders": 5001})
    ok, result = drill(custom, core, batch, env, namespace, "wrong-count", backup, storage)
    assert not ok and result["passed"] is False
    assert result["error"] == (
        "the restored database differs from the backup: table public.orders has 5000 rows after the "
        "restore, the backup recorded 5001"
    )
    assert result["restoreSeconds"] > 0 and result["exactCounts"] is True
    assert result["temporaryDatabaseDropped"] is True
    assert result["temporaryDatabase"] not in temp_databases(env)


def test_bad_scratch_input_is_refused_naming_it_and_nothing_is_created(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    scratch: str,
) -> None:
    storage = make_storage(custom, core, env, namespace)
    dump = pg_dump_bytes(env, app_db)
    before = temp_databases(env)

    # A dump of a newer server than the scratch one (its manifest says PostgreSQL 99).
    newer = store_snapshot(env, namespace, dump, None, server_version="99.1")
    ok, result = drill(custom, core, batch, env, namespace, "too-old", newer, storage)
    assert not ok
    assert "older than the server the backup was taken from (99.1)" in result["error"], result
    assert "use a scratch server of PostgreSQL 99 or newer" in result["error"]

    # A role that may not create databases.
    psql(env, "postgres", f"alter role {scratch} nocreatedb")
    backup = store_snapshot(env, namespace, dump, None)
    ok, result = drill(custom, core, batch, env, namespace, "no-createdb", backup, storage)
    assert not ok
    assert result["error"].startswith(f"the role {scratch} may not create databases on the scratch server"), (
        result
    )
    assert ": give it CREATEDB (ALTER ROLE ... CREATEDB)" in result["error"]
    assert f"scratch Secret {SCRATCH_SECRET}" in result["error"]

    # A Secret without the user key.
    ok, result = drill(custom, core, batch, env, namespace, "no-user", backup, storage, ("host", "password"))
    assert not ok
    assert result["error"] == f"scratch Secret {SCRATCH_SECRET}: missing key(s) user (or give one key uri)"
    assert temp_databases(env) == before


def test_the_api_server_enforces_the_verification_schema(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    def create(spec: dict[str, Any], kind: str = "Verification", plural: str = "verifications") -> Any:
        return custom.create_namespaced_custom_object(
            G,
            V,
            namespace,
            plural,
            {"apiVersion": f"{G}/{V}", "kind": kind, "metadata": {"name": "x"}, "spec": spec},
        )

    with pytest.raises(client.ApiException) as e:
        create({"backupName": "Not_A_Name"})
    assert e.value.status == 422 and "backupName must be the name of a Backup" in e.value.body
    with pytest.raises(client.ApiException) as e:
        create({"scratch": {"database": {"secretRef": {"name": "s"}}}})
    assert e.value.status == 422 and "spec.backupName: Required value" in e.value.body
    create({"backupName": "nightly"})
    with pytest.raises(client.ApiException) as e:
        custom.patch_namespaced_custom_object(
            G, V, namespace, "verifications", "x", {"spec": {"backupName": "other"}}
        )
    assert e.value.status == 422 and "spec is immutable" in e.value.body
    with pytest.raises(client.ApiException) as e:
        create({"backupName": "b", "scratch": {}})
    assert e.value.status == 422 and "spec.scratch.database: Required value" in e.value.body

    schedule: dict[str, Any] = {
        "storageRef": {"name": "s3"},
        "source": {"database": {"secretRef": {"name": "db"}}},
        "window": {"start": "02:00", "duration": "4h"},
        "verify": {"scratch": {"database": {"secretRef": {"name": "s"}}}},
    }
    with pytest.raises(client.ApiException) as e:
        create(schedule, "BackupSchedule", "backupschedules")
    assert e.value.status == 422 and "verify needs tiers" in e.value.body, e.value.body
    schedule["verify"]["tiers"] = ["Weekly", "Monthly"]
    create(schedule, "BackupSchedule", "backupschedules")


def test_a_drill_stopped_mid_restore_still_drops_its_temporary_database(
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    scratch: str,
    tmp_path: Path,
) -> None:
    """SIGTERM (the Pod deleted, the deadline reached) while pg_restore runs: the agent drops its
    database before it ends, and says it was stopped. Run as a process of this host: the signal
    is sent the moment the temporary database exists."""
    psql(
        env,
        app_db,
        f"set role {app_db}; create table big as "
        "select g as id, md5(g::text) || repeat('b', 400) as filler from generate_series(1, 250000) g",
    )
    backup = store_snapshot(env, namespace, pg_dump_bytes(env, app_db), None)
    before = set(temp_databases(env))
    result_file = tmp_path / "result.json"
    proc = subprocess.Popen(
        [
            AGENT,
            "agent",
            "verify",
            "--endpoint",
            env["NIGHTJAR_S3_ENDPOINT"],
            "--bucket",
            env["NIGHTJAR_S3_BUCKET_PLAIN"],
            "--manifest-key",
            backup["status"]["storage"]["manifestKey"],
            "--manifest-sha256",
            backup["status"]["storage"]["manifestSha256"],
            "--drill-id",
            uuid.uuid4().hex,
            "--database-only",
            "--result-file",
            str(result_file),
        ],
        env=agent_process_env(core, env, namespace),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        (temp,) = wait_for(
            "the drill's temporary database", lambda: set(temp_databases(env)) - before or None, 60, 0.05
        )
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1, proc.stderr.read().decode() if proc.stderr else code
    result = json.loads(result_file.read_text())
    assert result["error"] == "the drill was stopped (SIGTERM) before it ended", result
    assert result["temporaryDatabase"] == temp and result["temporaryDatabaseDropped"] is True
    assert temp not in temp_databases(env)


def test_cleanup_drops_the_named_drills_leftover_databases_and_nothing_else(
    core: client.CoreV1Api, env: dict[str, str], namespace: str, scratch: str, tmp_path: Path
) -> None:
    """After an agent killed with SIGKILL: ``verify-cleanup`` drops ``nightjar_verify_<id>`` of
    the drills named, and leaves every other database (also another drill's) alone."""
    gone, other = uuid.uuid4().hex, uuid.uuid4().hex
    for db in (f"nightjar_verify_{gone}", f"nightjar_verify_{other}"):
        psql(env, "postgres", f"create database {db} owner {scratch}")
    result_file = tmp_path / "cleanup.json"
    args = [AGENT, "agent", "verify-cleanup", "--drill-id", gone, "--drill-id", "never-ran"]
    subprocess.run(
        [*args, "--result-file", str(result_file)],
        env=agent_process_env(core, env, namespace),
        check=True,
        capture_output=True,
    )
    result = json.loads(result_file.read_text())
    assert result == {"dropped": [f"nightjar_verify_{gone}"], "absent": ["nightjar_verify_neverran"]}
    left = temp_databases(env)
    assert f"nightjar_verify_{gone}" not in left and f"nightjar_verify_{other}" in left
