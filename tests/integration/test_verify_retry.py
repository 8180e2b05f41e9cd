"""A finished backup whose snapshot cannot be verified *now* is retried, never failed for good
(issue 15): the primary S3 server is stopped exactly while the operator verifies the manifest of a
Job that succeeded, and started again 60 s later. Real stack, nothing mocked.

To land the stop between the agent's last write and the operator's verification, the Backup
carries the test-only annotation ``nightjar.dev/test-verify-delay-seconds`` (honoured because the
dev stack runs the operator with NIGHTJAR_TEST_HOOKS=1): the operator holds the verification until
that long after the Job finished. The test stops S3 as soon as the Job has succeeded.
"""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

from nightjar.jobs import job_name
from nightjar.reconcile.backup_taken import ANNOTATION_TEST_VERIFY_DELAY
from tests.integration.helpers import G, V, backup_body, get_backup, make_storage, wait_terminal
from tests.support import stopped_s3, wait_for

HOLD = 20  # s after the Job finished before the operator verifies
DOWN = 60  # s the S3 server stays stopped


def _job_succeeded(batch: client.BatchV1Api, ns: str, name: str) -> bool:
    job = batch.read_namespaced_job(name, ns)
    return bool(job.status and job.status.succeeded)


def test_s3_down_while_verifying_a_finished_job_retries_then_completes(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    make_storage(custom, core, env, namespace)
    body = backup_body("held", files=False)
    body["metadata"]["annotations"] = {ANNOTATION_TEST_VERIFY_DELAY: str(HOLD)}
    custom.create_namespaced_custom_object(G, V, namespace, "backups", body)
    job = job_name("backup", "held")
    wait_for("the backup Job to succeed", lambda: _job_succeeded(batch, namespace, job), 180, 0.2)
    t0 = time.monotonic()
    seen: list[tuple[float, str, str]] = []  # (s since the Job succeeded, phase, message)

    def look() -> dict[str, Any]:
        st = get_backup(custom, namespace, "held").get("status") or {}
        entry = (time.monotonic() - t0, st.get("phase") or "", st.get("message") or "")
        if not seen or seen[-1][1:] != entry[1:]:
            seen.append(entry)
        return st

    with stopped_s3("primary"):
        stopped = time.monotonic() - t0
        st = look()
        assert st.get("phase") not in ("Completed", "Failed"), st  # the operator has not verified yet
        retrying = wait_for(
            "the Backup to say it retries",
            lambda: (s := look()).get("phase") == "Running" and "retrying in" in s.get("message", "") and s,
            HOLD + DOWN,
            0.5,
        )
        first_retry = time.monotonic() - t0
        while time.monotonic() - t0 < stopped + DOWN:
            assert look().get("phase") == "Running", seen  # never Failed while S3 is down
            time.sleep(1)
    started = time.monotonic() - t0

    done = wait_terminal(custom, namespace, "held", timeout=180)
    completed = time.monotonic() - t0
    look()
    st = done["status"]
    assert st["phase"] == "Completed", seen
    assert st["message"].startswith("snapshot ") and "stored and verified" in st["message"]
    assert st["conditions"][0]["type"] == "Completed"
    assert "Retrying" not in [c["type"] for c in st["conditions"]]
    (cond,) = [c for c in retrying["conditions"] if c["type"] == "Retrying"]
    assert cond["reason"] == "StorageUnavailable"
    assert retrying["message"].startswith("storage unreachable while verifying the snapshot: ")
    assert "1 h after the Job finished" in retrying["message"]
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=held").items
    assert "VerificationRetrying" in {e.reason for e in events}
    print(
        f"\nJob succeeded at 0 s; S3 stopped at {stopped:.1f} s; first 'retrying' status at "
        f"{first_retry:.1f} s; S3 started at {started:.1f} s; Completed at {completed:.1f} s "
        f"({completed - first_retry:.0f} s retrying, {completed - started:.1f} s after S3 came back)"
    )
    for t, phase, message in seen:
        print(f"  {t:6.1f} s  {phase:9}  {message}")
