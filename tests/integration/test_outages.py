"""A database that restarts (or fails over), or an S3 server that is down, just as Nightjar needs
it: the agent waits for it, the backup or restore goes on once it answers. The stack's real
PostgreSQL is stopped (fast shutdown, as a restart does) and started again on its port and data;
the real S3 server is killed and started again; nothing mocked.

Without the wait a backup burnt its three attempts within ~35 s of Kubernetes' Pod backoff and
ended Failed, and a restore (whose Job fails on the first error) failed at once."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar.devstack.stack import Stack, State
from tests.integration.conftest import Env
from tests.integration.helpers import (
    TABLE_CHECKSUMS,
    G,
    V,
    backup_body,
    get_backup,
    make_storage,
    psql,
    take_backup,
    wait_terminal,
)
from tests.integration.test_restore import get_restore, restore_body, wait_restore
from tests.support import wait_for

#: Longer than the three attempts' Pod backoff (10 s + 20 s) that used to end such a backup.
OUTAGE = 45.0


class Outage:
    """Stop the stack's PostgreSQL (or its primary S3 server); ``end`` starts it again (always, at
    the latest on teardown)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.stack = Stack(Path(env["NIGHTJAR_STATE_DIR"]))
        st = State.load(self.stack.dir)
        assert st is not None
        self.node = st.node
        self.down = ""

    def begin(self, what: str = "postgres") -> None:
        if what == "s3":
            self.stack.stop_s3("primary")
        else:
            assert self.stack.kill("postgres", signal.SIGINT), "the stack runs no PostgreSQL"
        self.down = what

    def end(self) -> None:
        if self.down == "s3":
            self.stack.start_s3("primary")
        elif self.down:
            self.stack.up(with_operator=True, node=self.node)
        self.down = ""


@pytest.fixture
def outage(env: dict[str, str]) -> Iterator[Outage]:
    o = Outage(env)
    try:
        yield o
    finally:
        o.end()


def agent_log(core: client.CoreV1Api, ns: str, job: str) -> str:
    """The log of the Job's (one) Pod, "" while there is none to read."""
    text = ""
    for pod in core.list_namespaced_pod(ns, label_selector=f"job-name={job}").items:
        with contextlib.suppress(ApiException):
            text += core.read_namespaced_pod_log(pod.metadata.name, ns, container="agent")
    return text


def hold_while(seconds: float, check: Any) -> None:
    """Call ``check`` every second for ``seconds`` (it asserts what must hold meanwhile)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        check()
        time.sleep(1)


def test_a_backup_started_while_the_database_restarts_waits_for_it_and_completes(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    outage: Outage,
) -> None:
    make_storage(custom, core, env, namespace)
    checksums = psql(env, app_db, TABLE_CHECKSUMS)
    outage.begin()
    custom.create_namespaced_custom_object(G, V, namespace, "backups", backup_body("patient"))

    def not_failed() -> None:
        st = get_backup(custom, namespace, "patient").get("status") or {}
        assert st.get("phase") != "Failed", st.get("message")

    hold_while(OUTAGE, not_failed)
    log = agent_log(core, namespace, "nightjar-backup-patient")
    assert "is not reachable (" in log and "retrying in" in log, log
    outage.end()

    st = wait_terminal(custom, namespace, "patient")["status"]
    assert st["phase"] == "Completed", st.get("message")
    assert st["attempts"] == 1  # waited within the first attempt, no attempt burnt
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=nightjar-backup-patient").items
    assert len(pods) == 1
    assert "answers again after" in agent_log(core, namespace, "nightjar-backup-patient")
    assert psql(env, app_db, TABLE_CHECKSUMS) == checksums


def test_a_backup_started_while_the_s3_server_is_down_waits_for_it_and_completes(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    outage: Outage,
) -> None:
    make_storage(custom, core, env, namespace)
    outage.begin("s3")
    custom.create_namespaced_custom_object(G, V, namespace, "backups", backup_body("blink"))

    def not_failed() -> None:
        st = get_backup(custom, namespace, "blink").get("status") or {}
        assert st.get("phase") != "Failed", st.get("message")

    hold_while(OUTAGE, not_failed)
    log = agent_log(core, namespace, "nightjar-backup-blink")
    assert "storage is not reachable (" in log, log
    outage.end()

    st = wait_terminal(custom, namespace, "blink")["status"]
    assert st["phase"] == "Completed", st.get("message")
    assert st["attempts"] == 1


def test_a_restore_started_while_the_database_restarts_waits_for_it_and_restores_identically(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    outage: Outage,
) -> None:
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("good"))
    checksums = psql(env, app_db, TABLE_CHECKSUMS)
    psql(env, app_db, "delete from orders where id > 5; update customers set name = 'lost'")
    assert psql(env, app_db, TABLE_CHECKSUMS) != checksums

    outage.begin()
    custom.create_namespaced_custom_object(
        G, V, namespace, "restores", restore_body("back", "good", contents="DatabaseOnly")
    )

    def not_failed() -> None:
        st = get_restore(custom, namespace, "back").get("status") or {}
        assert st.get("phase") != "Failed", st.get("message")

    hold_while(30, not_failed)
    outage.end()

    st = wait_restore(custom, namespace, "back")
    assert st["phase"] == "Completed", st.get("message")
    assert psql(env, app_db, TABLE_CHECKSUMS) == checksums


def test_a_restore_into_another_namespace_waits_for_its_presigned_urls_to_answer(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    acceptance: Env,
    outage: Outage,
) -> None:
    """It reads through presigned URLs, so it has no bucket to probe: it waits for its manifest's
    URL instead. The S3 server goes down as soon as the operator made the restore Job (the
    operator itself needs S3 to hand over the URLs and data keys)."""
    storage = make_storage(custom, core, env, namespace)
    custom.patch_namespaced_custom_object(
        G,
        V,
        namespace,
        "backupstorages",
        storage["metadata"]["name"],
        {"spec": {"allowedRestoreNamespaces": [acceptance.ns]}},
    )
    take_backup(custom, namespace, backup_body("prod"))
    custom.create_namespaced_custom_object(
        G, V, acceptance.ns, "restores", restore_body("over", "prod", namespace, contents="DatabaseOnly")
    )
    job = "nightjar-restore-over"
    wait_for(
        "the restore Job",
        lambda: batch.list_namespaced_job(acceptance.ns, field_selector=f"metadata.name={job}").items,
        60,
    )
    outage.begin("s3")

    def not_failed() -> None:
        st = get_restore(custom, acceptance.ns, "over").get("status") or {}
        assert st.get("phase") != "Failed", st.get("message")

    hold_while(30, not_failed)
    outage.end()

    st = wait_restore(custom, acceptance.ns, "over")
    assert st["phase"] == "Completed", st.get("message")
    assert psql(env, acceptance.db, TABLE_CHECKSUMS) == psql(env, app_db, TABLE_CHECKSUMS)
    log = agent_log(core, acceptance.ns, job)
    pods = core.list_namespaced_pod(acceptance.ns, label_selector=f"job-name={job}").items
    # It waited at the start; or, had its Pod read the manifest before the server went down, the
    # lost read was retried in a new Pod (exit 75). Never Failed, in either case.
    assert ("storage is not reachable (" in log and "storage answers again after" in log) or len(pods) > 1, (
        log
    )
