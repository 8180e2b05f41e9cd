"""Restore drills through the operator (issue 16): a Verification of a Completed Backup, a
schedule whose ``verify`` drills its Weekly backups, and an operator killed mid-drill. The agent
itself (damaged dumps, wrong counts, bad scratch input) is tested in test_verify_agent.py.

Nothing mocked: the stack's API server, operator, PostgreSQL, MinIO and node.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from kubernetes import client

from nightjar.devstack.stack import Stack, State
from nightjar.domain.retention import format_time
from tests.integration.helpers import (
    SCRATCH_SECRET,
    G,
    V,
    backup_body,
    get_backup,
    make_storage,
    psql,
    take_backup,
    temp_databases,
)
from tests.integration.test_verify_agent import pg_dump_bytes, store_snapshot
from tests.support import wait_for


def verification(name: str, backup: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "Verification",
        "metadata": {"name": name},
        "spec": {"backupName": backup, "scratch": {"database": {"secretRef": {"name": SCRATCH_SECRET}}}},
    }


def get(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = custom.get_namespaced_custom_object(G, V, ns, "verifications", name)
    return out


def wait_ended(custom: client.CustomObjectsApi, ns: str, name: str, timeout: float = 300) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        v = get(custom, ns, name)
        return v if (v.get("status") or {}).get("phase") in ("Passed", "Failed") else None

    return wait_for(f"verification {name} to end", ended, timeout)


def kubectl(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [env["NIGHTJAR_KUBECTL"], "--kubeconfig", env["KUBECONFIG"], *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def cell(table: str, row: str, column: str) -> str:
    """The value of ``column`` in the row of ``row`` in kubectl's aligned table ("" when empty)."""
    header, *lines = table.splitlines()
    start = header.index(column)
    rest = header[start + len(column) :]
    end = start + len(column) + (len(rest) - len(rest.lstrip())) if rest.strip() else None
    line = next(ln for ln in lines if ln.split()[0] == row)
    return line[start:end].strip()


def test_a_healthy_backup_with_row_counts_passes_with_exact_counts_and_leaves_nothing(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    scratch: str,
) -> None:
    make_storage(custom, core, env, namespace)
    body = backup_body("counted")
    body["spec"]["source"]["rowCounts"] = True
    st = take_backup(custom, namespace, body)
    before = temp_databases(env)
    custom.create_namespaced_custom_object(G, V, namespace, "verifications", verification("drill", "counted"))
    v = wait_ended(custom, namespace, "drill")
    vs = v["status"]
    assert vs["phase"] == "Passed", vs.get("message")
    assert vs["restoreSeconds"] > 0 and vs["exactCounts"] is True
    assert vs["tablesChecked"] == st["database"]["tablesCounted"] == 2
    assert vs["rowsChecked"] == st["database"]["rowsCounted"] == 5500  # 500 customers, 5000 orders
    regular = [p for p in files_pvc.rglob("*") if p.is_file() and not p.is_symlink()]
    assert vs["filesChecked"] == len(regular) > 0
    assert vs["message"].startswith("restored in ") and "(exact counts)" in vs["message"]
    (cond,) = [c for c in vs["conditions"] if c["type"] == "Verified"]
    assert (cond["status"], cond["reason"]) == ("True", "Restored")
    assert temp_databases(env) == before  # the temporary database is gone
    # The Backup shows its last drill, and kubectl get backups its VERIFIED column.
    b = get_backup(custom, namespace, "counted")["status"]
    assert b["verification"]["name"] == "drill" and b["verification"]["result"] == "Passed"
    assert b["verification"]["restoreSeconds"] == round(vs["restoreSeconds"], 3)
    assert b["phase"] == "Completed"
    (verified,) = [c for c in b["conditions"] if c["type"] == "Verified"]
    assert verified["status"] == "True"
    assert cell(kubectl(env, "get", "backups", "-n", namespace), "counted", "VERIFIED") == "Passed"
    out = kubectl(env, "get", "verifications", "-n", namespace)
    assert out.split()[:8] == [
        "NAME",
        "BACKUP",
        "STATUS",
        "PROGRESS",
        "RESTORE(S)",
        "TABLES",
        "ROWS",
        "FILES",
    ]
    # The drill never wrote to the source: its rows are what they were.
    assert psql(env, app_db, "select count(*) from orders") == "5000"


def test_a_drill_of_a_backup_that_is_not_completed_or_missing_fails_and_creates_nothing(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    scratch: str,
) -> None:
    custom.create_namespaced_custom_object(G, V, namespace, "verifications", verification("ghost", "nope"))
    v = wait_ended(custom, namespace, "ghost", 60)["status"]
    assert v["phase"] == "Failed"
    assert v["message"] == f'Backup "nope" not found in namespace {namespace}; nothing was created'
    assert batch.list_namespaced_job(namespace).items == []


def uploaded(custom: client.CustomObjectsApi, ns: str, name: str, snapshot: dict[str, Any]) -> None:
    """A Backup of a snapshot written here (as ``nightjar upload`` stores one), adopted by the
    operator: Completed once every digest in it is right."""
    stored = snapshot["status"]["storage"]
    custom.create_namespaced_custom_object(
        G,
        V,
        ns,
        "backups",
        {
            "apiVersion": f"{G}/{V}",
            "kind": "Backup",
            "metadata": {"name": name},
            "spec": {
                "type": "Uploaded",
                "storageRef": {"name": "s3"},
                "upload": {"manifestKey": stored["manifestKey"], "manifestSha256": stored["manifestSha256"]},
            },
        },
    )
    st = wait_for(
        f"the uploaded Backup {name} adopted",
        lambda: (
            (s := get_backup(custom, ns, name).get("status") or {}).get("phase") in ("Completed", "Failed")
            and s
        ),
        120,
    )
    assert st["phase"] == "Completed", st.get("message")


def test_an_intact_but_unrestorable_snapshot_or_a_wrong_count_fails_the_drill_saying_why(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    scratch: str,
) -> None:
    """Every digest right, as an agent bug would write it: a dump cut short (k8up#1109), and a
    recorded row count that differs from the dump. The operator adopts each as a Completed
    Backup; only the drill shows they do not restore as recorded."""
    make_storage(custom, core, env, namespace)
    dump = pg_dump_bytes(env, app_db)
    short = store_snapshot(env, namespace, dump[: len(dump) * 2 // 3], None, source="uploaded")
    uploaded(custom, namespace, "short", short)
    wrong = store_snapshot(
        env, namespace, dump, {"public.customers": 500, "public.orders": 5001}, source="uploaded"
    )
    uploaded(custom, namespace, "wrong", wrong)
    before = temp_databases(env)
    for name in ("short", "wrong"):
        custom.create_namespaced_custom_object(
            G, V, namespace, "verifications", verification(f"{name}-drill", name)
        )
    cut = wait_ended(custom, namespace, "short-drill")["status"]
    assert cut["phase"] == "Failed"
    assert cut["message"].startswith("the dump does not restore: pg_restore into the scratch server"), cut
    assert "could not read from input file" in cut["message"] or "end of file" in cut["message"]
    off = wait_ended(custom, namespace, "wrong-drill")["status"]
    assert off["phase"] == "Failed"
    assert off["message"] == (
        "the restored database differs from the backup: table public.orders has 5000 rows after the "
        "restore, the backup recorded 5001"
    )
    assert off["restoreSeconds"] > 0 and off["exactCounts"] is True
    for name in ("short", "wrong"):
        b = get_backup(custom, namespace, name)["status"]
        assert b["phase"] == "Completed" and b["verification"]["result"] == "Failed"
        (cond,) = [c for c in b["conditions"] if c["type"] == "Verified"]
        assert cond["status"] == "False"
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=wrong").items
    assert any(e.reason == "VerificationFailed" and "5001" in e.message for e in events)
    assert temp_databases(env) == before


def test_a_schedule_that_verifies_weekly_backups_drills_the_weekly_one_not_the_nightly(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    scratch: str,
) -> None:
    make_storage(custom, core, env, namespace)
    source = {"database": {"secretRef": {"name": "db"}}}
    custom.create_namespaced_custom_object(
        G,
        V,
        namespace,
        "backupschedules",
        {
            "apiVersion": f"{G}/{V}",
            "kind": "BackupSchedule",
            "metadata": {"name": "shop"},
            "spec": {
                "storageRef": {"name": "s3"},
                "source": source,
                "suspend": True,  # its own slots are not the point: the two Backups below are its
                "window": {"start": "02:00", "duration": "4h"},
                "verify": {
                    "tiers": ["Weekly"],
                    "scratch": {"database": {"secretRef": {"name": SCRATCH_SECRET}}},
                },
            },
        },
    )
    # Two Backups as the schedule takes them: its label, their tier, the slot.
    for name, tier in (("shop-weekly", "Weekly"), ("shop-nightly", "Nightly")):
        body = backup_body(name, files=False)
        body["metadata"]["labels"] = {"nightjar.dev/schedule": "shop", "nightjar.dev/tier": tier}
        body["metadata"]["annotations"] = {"nightjar.dev/slot": format_time(dt.datetime.now(dt.UTC))}
        body["spec"]["type"] = tier
        body["spec"]["source"]["rowCounts"] = tier == "Weekly"
        take_backup(custom, namespace, body)
    v = wait_for(
        "the schedule's drill of the Weekly backup",
        lambda: _maybe(custom, namespace, "shop-weekly-verify"),
        120,
    )
    assert v["metadata"]["labels"]["nightjar.dev/schedule"] == "shop"
    assert wait_ended(custom, namespace, "shop-weekly-verify")["status"]["phase"] == "Passed"
    weekly = wait_for(
        "the Weekly backup to show its drill",
        lambda: get_backup(custom, namespace, "shop-weekly")["status"].get("verification") or None,
        60,
    )
    assert weekly["result"] == "Passed"
    table = kubectl(env, "get", "backups", "-n", namespace)
    assert cell(table, "shop-weekly", "VERIFIED") == "Passed"
    assert cell(table, "shop-nightly", "VERIFIED") in ("", "<none>")  # never drilled
    assert _maybe(custom, namespace, "shop-nightly-verify") is None
    assert "verification" not in get_backup(custom, namespace, "shop-nightly")["status"]


def test_the_operator_killed_mid_drill_still_ends_it_with_the_temporary_database_dropped(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    scratch: str,
) -> None:
    make_storage(custom, core, env, namespace)
    # Enough rows that the restore is still running when the operator dies.
    psql(
        env,
        app_db,
        f"set role {app_db}; create table big as "
        "select g as id, md5(g::text) || repeat('b', 300) as filler from generate_series(1, 300000) g",
    )
    take_backup(custom, namespace, backup_body("big", files=False), timeout=300)
    before = set(temp_databases(env))
    custom.create_namespaced_custom_object(G, V, namespace, "verifications", verification("survivor", "big"))
    wait_for(
        "the drill's temporary database to exist",
        lambda: set(temp_databases(env)) - before or None,
        120,
        0.05,
    )
    stack = Stack(Path(env["NIGHTJAR_STATE_DIR"]))
    state = State.load(stack.dir)
    assert state is not None
    os.kill(next(p for p in state.procs if p.name == "operator").pid, signal.SIGKILL)
    stack.restart_operator()
    v = wait_ended(custom, namespace, "survivor")["status"]
    assert v["phase"] == "Passed", v.get("message")
    assert v["tablesChecked"] == 3 and v["exactCounts"] is False  # no counts were recorded
    assert set(temp_databases(env)) == before


def _maybe(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return get(custom, ns, name)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise
