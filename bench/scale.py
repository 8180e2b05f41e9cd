"""Benchmark: 1,000 BackupSchedules and 20,000 Backups in one cluster.

On a private local stack (operator stopped while the objects are loaded):
* 1,000 schedules whose window is open now, and 19 past nights of their Backups (19,000, shown
  Completed), of which 5,000 have expired;
* then the operator starts, with the production intervals (scheduler 30 s, GC 300 s, first GC
  10 s after start).

Reports: the time until the night's 1,000 Backups exist, the time until the 5,000 expired ones are
gone (the GC sweep plus their finalizers), the sweep's own duration from the operator log, and the
operator's peak RSS. Targets: RSS <= 300 MB, sweep <= 60 s. The schedules' storage does not
exist, so the night's Backups end Failed in preflight instead of starting 1,000 agent Jobs on the
2-core machine: the operator's own work is what is measured.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config
from tests.support import stack_env

from nightjar.devstack.stack import Stack, State
from nightjar.domain import schedule as sch
from nightjar.domain.retention import format_time

G, V = "nightjar.dev", "v1alpha1"
SCHEDULES = int(os.environ.get("BENCH_SCHEDULES", "1000"))
NIGHTS = int(os.environ.get("BENCH_NIGHTS", "19"))
EXPIRED = int(os.environ.get("BENCH_EXPIRED", "5000"))
NAMESPACES = 20


def main() -> None:
    env = stack_env()
    api = config.new_client_from_config(env["KUBECONFIG"])
    api.configuration.connection_pool_maxsize = 32
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    stack = Stack(Path(env["NIGHTJAR_STATE_DIR"]), out=lambda _: None)
    state = State.load(stack.dir)
    if state is None:
        raise SystemExit("no stack: run through `make bench`")
    now = dt.datetime.now(dt.UTC)
    # A 12 h window that closes 30 min from now: most slots have passed, all are still due.
    start = (now - dt.timedelta(hours=11, minutes=30)).strftime("%H:%M")
    namespaces = [f"bench-{i:02d}" for i in range(NAMESPACES)]
    for ns in namespaces:
        core.create_namespace({"metadata": {"name": ns}})

    def schedule(i: int) -> None:
        ns = namespaces[i % NAMESPACES]
        custom.create_namespaced_custom_object(
            G,
            V,
            ns,
            "backupschedules",
            {
                "apiVersion": f"{G}/{V}",
                "kind": "BackupSchedule",
                "metadata": {"name": f"app-{i:04d}"},
                "spec": {
                    "storageRef": {"name": "missing"},
                    "source": {"database": {"secretRef": {"name": f"db-{i}"}}},
                    "window": {"start": start, "duration": "12h"},
                },
            },
        )

    def backup(k: int) -> None:
        i, night = divmod(k, NIGHTS)
        ns, name = namespaces[i % NAMESPACES], f"app-{i:04d}"
        day = now - dt.timedelta(days=night + 2)
        expires = now - dt.timedelta(hours=1) if k < EXPIRED else now + dt.timedelta(days=14)
        bname = f"{name}-{day:%Y%m%d}"
        custom.create_namespaced_custom_object(
            G,
            V,
            ns,
            "backups",
            {
                "apiVersion": f"{G}/{V}",
                "kind": "Backup",
                "metadata": {
                    "name": bname,
                    "labels": {
                        "nightjar.dev/schedule": name,
                        "nightjar.dev/tier": "Nightly",
                        "nightjar.dev/finished": "true",  # as the operator labels terminal Backups
                    },
                    "annotations": {"nightjar.dev/expires-at": format_time(expires)},
                },
                "spec": {
                    "storageRef": {"name": "missing"},
                    "source": {"database": {"secretRef": {"name": f"db-{i}"}}},
                    "type": "Nightly",
                },
            },
        )
        custom.patch_namespaced_custom_object_status(
            G,
            V,
            ns,
            "backups",
            bname,
            {
                "status": {
                    "phase": "Completed",
                    "createdOn": format_time(day),
                    "expiresOn": format_time(expires),
                }
            },
        )

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(schedule, range(SCHEDULES)))
        list(pool.map(backup, range(SCHEDULES * NIGHTS)))
    print(
        f"loaded {SCHEDULES} schedules and {SCHEDULES * NIGHTS} backups ({EXPIRED} expired) "
        f"in {time.monotonic() - t0:.0f}s",
        flush=True,
    )

    os.environ["NIGHTJAR_SCHEDULER_INTERVAL_SECONDS"] = "30"
    os.environ["NIGHTJAR_GC_INTERVAL_SECONDS"] = "300"
    log = stack.dir / "logs" / "operator.log"
    log_start = log.stat().st_size if log.exists() else 0
    t_start = time.monotonic()
    stack.restart_operator()
    state = State.load(stack.dir)
    if state is None:
        raise SystemExit("no stack: run through `make bench`")
    pid = next(p.pid for p in state.procs if p.name == "operator")
    tonight = set()
    for i in range(SCHEDULES):
        plan = sch.Plan.from_spec(
            namespaces[i % NAMESPACES], f"app-{i:04d}", {"window": {"start": start, "duration": "12h"}}
        )
        slot = plan.previous_slot(dt.datetime.now(dt.UTC))
        if slot is not None and slot.window_end > dt.datetime.now(dt.UTC):
            tonight.add(slot.name)

    def count(selector: str, pred: Any) -> int:
        n, cont = 0, None
        while True:
            resp = custom.list_cluster_custom_object(
                G, V, "backups", label_selector=selector, limit=1000, _continue=cont
            )
            n += sum(1 for b in resp["items"] if pred(b))
            cont = resp["metadata"].get("continue")
            if not cont:
                return n

    night_done = gc_done = None
    expired_left = EXPIRED
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and (night_done is None or gc_done is None):
        if night_done is None and count(
            "nightjar.dev/schedule", lambda b: b["metadata"]["name"] in tonight
        ) >= len(tonight):
            night_done = time.monotonic() - t_start
            print(
                f"night's {len(tonight)} backups created {night_done:.1f}s after the operator started",
                flush=True,
            )
        if gc_done is None:
            expired_left = count(
                "nightjar.dev/schedule",
                lambda b: b["metadata"]["annotations"]["nightjar.dev/expires-at"] < format_time(now),
            )
            if expired_left == 0:
                gc_done = time.monotonic() - t_start
                print(
                    f"{EXPIRED} expired backups gone {gc_done:.1f}s after the operator started "
                    "(first sweep starts at +10s)",
                    flush=True,
                )
        time.sleep(2)
    hwm = next(
        line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM")
    )
    rss = int(hwm.split()[1]) / 1024
    with open(log, "rb") as f:
        f.seek(log_start)
        sweeps = re.findall(
            rb"gc: examined (\d+) backups, deleted (\d+), deferred (\d+), finished \d+ stuck deletions"
            rb" in ([\d.]+)s",
            f.read(),
        )
    print(f"operator peak RSS: {rss:.0f} MiB (target <= 300)")
    for ex, de, dfr, secs in sweeps:
        print(
            f"gc sweep: examined {int(ex)}, deleted {int(de)}, deferred {int(dfr)} in {float(secs):.1f}s "
            "(target <= 60)"
        )
    if night_done is None or gc_done is None:
        print(f"TIMED OUT: night done={night_done}, expired left={expired_left}")


if __name__ == "__main__":
    main()
