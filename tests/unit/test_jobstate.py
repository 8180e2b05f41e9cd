"""Reading a finished Job's status (reconcile.jobstate)."""

from __future__ import annotations

import datetime as dt

from nightjar.reconcile.jobstate import failure_reason, finished_at

T1 = "2026-11-30T03:00:00Z"
T2 = "2026-11-30T03:05:00Z"


def test_a_running_job_has_not_finished_and_has_no_failure() -> None:
    job = {"status": {"active": 1, "conditions": [{"type": "Suspended", "status": "False"}]}}
    assert finished_at(job) is None and finished_at({}) is None
    assert failure_reason(job) == "no result"


def test_a_completed_job_ended_at_its_completion_time() -> None:
    job = {
        "status": {
            "completionTime": T2,
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": T1}],
        }
    }
    assert finished_at(job) == dt.datetime(2026, 11, 30, 3, 5, tzinfo=dt.UTC)


def test_a_failed_job_ended_when_it_failed_and_says_why() -> None:
    cond = {
        "type": "Failed",
        "status": "True",
        "lastTransitionTime": T1,
        "reason": "BackoffLimitExceeded",
        "message": "Job has reached the specified backoff limit",
    }
    job = {"status": {"failed": 3, "conditions": [cond]}}
    assert finished_at(job) == dt.datetime(2026, 11, 30, 3, 0, tzinfo=dt.UTC)
    assert failure_reason(job) == "BackoffLimitExceeded: Job has reached the specified backoff limit"
    assert failure_reason({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == "no result"
