"""The one status module (issue 15, item 2): the conflict-safe writer, the common rule of
``apply``, conditions that keep their transition time, and the outcome updates of every kind.

Driven against the in-memory Kubernetes of tests/fakes.py: a conflict is either a real one (the
object changed between the writer's read and its write, so the resourceVersion precondition
fails) or one injected with ``fail``; the clock is fixed and moved by hand.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from nightjar.domain.retention import format_time
from nightjar.reconcile import status
from nightjar.reconcile.status import StatusConflict, StatusWriter
from tests.fakes import NOW, FakeClock, FakeKube

T0 = format_time(NOW)
LATER = NOW + dt.timedelta(minutes=5)


def an_object(**st: Any) -> dict[str, Any]:
    return {"metadata": {"name": "o1", "namespace": "ns"}, "spec": {}, "status": st}


def setup(**st: Any) -> tuple[FakeKube, FakeClock, StatusWriter, dict[str, Any]]:
    kube, clock = FakeKube(), FakeClock()
    body = kube.add("backups", an_object(**st))
    return kube, clock, StatusWriter(kube, "backups", clock), body


def stored(kube: FakeKube) -> dict[str, Any]:
    return kube.status_of("backups", "ns", "o1")


# --- the writer --------------------------------------------------------------------------------


def test_a_write_is_decided_on_a_fresh_read_and_conditional_on_its_resource_version() -> None:
    kube, _clock, writer, stale = setup(phase="Running", attempts=1)
    kube.patch_status("backups", "ns", "o1", {"attempts": 2})  # moved on since `stale` was read
    seen: list[dict[str, Any]] = []

    def decide(fresh: dict[str, Any]) -> dict[str, Any]:
        seen.append(fresh)
        return {"message": f"attempt {fresh['status']['attempts']}"}

    done = writer.write(stale, decide)

    assert done is not None
    assert [s["status"]["attempts"] for s in seen] == [2]  # never the stale body's 1
    assert done.patch == {"message": "attempt 2"} and done.old == {"phase": "Running", "attempts": 2}
    assert stored(kube) == {"phase": "Running", "attempts": 2, "message": "attempt 2"}
    assert stale["status"] == stored(kube)  # the caller's body now says what was written
    assert (done.old_phase, done.new_phase, done.transition) == ("Running", "", False)
    assert kube.calls["patch_status"] == 2  # the test's own write, then exactly one


def test_a_real_conflict_is_decided_again_on_the_object_as_it_is_now() -> None:
    kube, _clock, writer, body = setup(phase="Running", attempts=1)
    decided_on: list[int] = []

    def decide(fresh: dict[str, Any]) -> dict[str, Any]:
        decided_on.append(fresh["status"]["attempts"])
        if len(decided_on) == 1:  # somebody else writes between this read and our write
            kube.patch_status("backups", "ns", "o1", {"attempts": 5})
        return {"message": f"seen {fresh['status']['attempts']}"}

    done = writer.write(body, decide)

    assert decided_on == [1, 5]
    assert done is not None and done.patch == {"message": "seen 5"}
    assert stored(kube) == {"phase": "Running", "attempts": 5, "message": "seen 5"}


def test_an_injected_409_is_retried_and_the_write_lands_once() -> None:
    kube, _clock, writer, body = setup(phase="Queued")
    kube.fail("patch_status", 409, 409)
    done = writer.write(body, lambda fresh: {"phase": "Running"})
    assert done is not None and done.transition and (done.old_phase, done.new_phase) == ("Queued", "Running")
    assert stored(kube)["phase"] == "Running"
    assert kube.calls["patch_status"] == 3 and kube.calls["get"] == 3


def test_an_object_gone_before_or_during_the_write_is_none() -> None:
    kube, _clock, writer, body = setup(phase="Running")
    kube.fail("patch_status", 404)  # deleted between the read and the write
    assert writer.write(body, lambda fresh: {"message": "x"}) is None
    del kube.objects[("backups", "ns", "o1")]
    asked: list[dict[str, Any]] = []
    assert writer.write(body, lambda fresh: asked.append(fresh) or {"message": "x"}) is None
    assert asked == []  # nothing to decide on


def test_another_object_of_the_same_name_is_never_written() -> None:
    kube, _clock, writer, body = setup(phase="Running")
    del kube.objects[("backups", "ns", "o1")]
    kube.add("backups", {**an_object(), "metadata": {"name": "o1", "namespace": "ns", "uid": "uid-new"}})
    assert writer.write(body, lambda fresh: {"phase": "Failed"}) is None
    assert stored(kube) == {}
    assert kube.calls["patch_status"] == 0


def test_nothing_decided_is_nothing_written() -> None:
    kube, _clock, writer, body = setup(phase="Running")
    assert writer.write(body, lambda fresh: None) is None
    assert kube.calls["patch_status"] == 0


def test_a_write_that_keeps_conflicting_raises_a_transient_status_conflict() -> None:
    kube, clock = FakeKube(), FakeClock()
    body = kube.add("backups", an_object(phase="Running"))
    writer = StatusWriter(kube, "backups", clock, tries=3)
    kube.fail("patch_status", 409, 409, 409, 409)
    with pytest.raises(StatusConflict, match=r"backups ns/o1 kept changing \(409 3 times\)") as e:
        writer.write(body, lambda fresh: {"phase": "Completed"})
    assert e.value.retryable and e.value.delay == 5.0
    assert kube.calls["patch_status"] == 3
    assert stored(kube) == {"phase": "Running"}  # nothing silently half-written
    # The fourth queued 409 is still there: the next run conflicts once, then writes.
    assert writer.write(body, lambda fresh: {"phase": "Completed"}) is not None
    assert stored(kube)["phase"] == "Completed"


def test_another_api_error_is_raised_to_the_caller() -> None:
    kube, _clock, writer, body = setup(phase="Running")
    kube.fail("patch_status", 503)
    with pytest.raises(ApiException) as e:
        writer.write(body, lambda fresh: {"message": "x"})
    assert e.value.status == 503
    assert stored(kube) == {"phase": "Running"}


# --- apply: the common rule ---------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["Completed", "Failed"])
def test_a_terminal_phase_never_changes(phase: str) -> None:
    kube, _clock, writer, body = setup(phase=phase, message="done")
    for change in (
        status.update(phase="Running"),
        status.update(message="overwritten"),
        status.failed("X", "late failure"),
        status.completed("Y", "late completion"),
        status.retrying("StorageUnavailable", "down", LATER),
    ):
        assert writer.apply(body, change) is None
    assert stored(kube) == {"phase": phase, "message": "done"}
    assert kube.calls["patch_status"] == 0


def test_allow_on_terminal_lets_only_those_keys_through() -> None:
    kube, _clock, writer, body = setup(phase="Completed", app={"stopped": True})
    assert writer.apply(body, status.update(app={"restarted": True}), allow_on_terminal=("app",))
    assert stored(kube)["app"] == {"stopped": True, "restarted": True}
    # Any other key, or a condition, is still refused on a terminal object.
    assert writer.apply(body, status.update(app={}, message="m"), allow_on_terminal=("app",)) is None
    with_cond = status.Update({"app": {}}, (status.condition("X", True, "R", "m"),))
    assert writer.apply(body, with_cond, allow_on_terminal=("app",)) is None
    assert writer.apply(body, status.update(app={"x": 1})) is None  # nothing allowed by default
    assert stored(kube) == {"phase": "Completed", "app": {"stopped": True, "restarted": True}}


def test_queued_is_only_ever_the_first_phase() -> None:
    kube, _clock, writer, body = setup()
    first = writer.apply(body, status.update(phase="Queued", attempts=0))
    assert first is not None and first.transition and first.old_phase == ""
    assert stored(kube) == {"phase": "Queued", "attempts": 0}
    kube.patch_status("backups", "ns", "o1", {"phase": "Running", "attempts": 1})
    stale = an_object()  # a body from before any status
    stale["metadata"]["uid"] = "uid-o1"
    assert writer.apply(stale, status.update(phase="Queued", attempts=0)) is None
    assert stored(kube) == {"phase": "Running", "attempts": 1}


def test_apply_merges_conditions_with_the_fresh_status_not_the_stale_body() -> None:
    kube, clock, writer, stale = setup(phase="Running")  # `stale` has no conditions
    kube.patch_status("backups", "ns", "o1", {"conditions": [status.condition("Other", True, "R", "m")]})
    clock.advance(60)
    done = writer.apply(copy.deepcopy(stale), status.update(message="m"))
    assert done is not None and "conditions" not in done.patch  # no conditions asked: none written
    writer.apply(copy.deepcopy(stale), status.Update({}, (status.condition("Mine", True, "R", "m"),)))
    assert [c["type"] for c in stored(kube)["conditions"]] == ["Other", "Mine"]


# --- conditions ---------------------------------------------------------------------------------


def test_a_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    old = {"conditions": [{**status.condition("Ready", True, "A", "first"), "lastTransitionTime": T0}]}
    out = status.conditions(old, [status.condition("Ready", True, "B", "second")], LATER)
    assert out == [
        {"type": "Ready", "status": "True", "reason": "B", "message": "second", "lastTransitionTime": T0}
    ]


def test_a_condition_whose_status_changes_is_stamped_again() -> None:
    old = {"conditions": [{**status.condition("Ready", True, "A", "up"), "lastTransitionTime": T0}]}
    (out,) = status.conditions(old, [status.condition("Ready", False, "Down", "down")], LATER)
    assert (out["status"], out["lastTransitionTime"]) == ("False", format_time(LATER))
    # Without a time of its own an unchanged condition gets one.
    (again,) = status.conditions({"conditions": [status.condition("Ready", False, "D", "d")]}, [out], LATER)
    assert again["lastTransitionTime"] == format_time(LATER)


def test_new_conditions_are_appended_and_dropped_types_removed() -> None:
    old = {
        "conditions": [
            {**status.condition("Retrying", True, "S", "down"), "lastTransitionTime": T0},
            {**status.condition("Replicated", False, "P", "pending"), "lastTransitionTime": T0},
        ]
    }
    out = status.conditions(old, [status.condition("Completed", True, "V", "ok")], LATER, drop=["Retrying"])
    assert [(c["type"], c["lastTransitionTime"]) for c in out] == [
        ("Replicated", T0),
        ("Completed", format_time(LATER)),
    ]
    assert status.conditions({}, [], LATER, drop=["Nothing"]) == []


def test_a_condition_message_is_bounded() -> None:
    assert len(status.condition("X", True, "R", "m" * 5000)["message"]) == 1024


def test_find_condition_is_true_conditions_only_and_phase_helpers() -> None:
    obj = {"status": {"phase": "Failed", "conditions": [status.condition("Retrying", False, "R", "")]}}
    assert status.find_condition(obj, "Retrying") is None
    obj["status"]["conditions"].append(status.condition("Failed", True, "R", "why"))
    assert (status.find_condition(obj, "Failed") or {})["message"] == "why"
    assert status.phase_of(obj) == "Failed" and status.is_terminal(obj)
    assert status.phase_of({}) == "" and not status.is_terminal({"status": {"phase": "Running"}})
    assert {"Completed", "Failed"} == status.TERMINAL
    assert [p.value for p in status.Phase] == ["Queued", "Running", "Completed", "Failed"]


# --- outcomes -----------------------------------------------------------------------------------


def test_retrying_then_completed_removes_next_retry_at_with_a_merge_null() -> None:
    kube, clock, writer, body = setup(phase="Running", attempts=1)
    first = writer.apply(
        body,
        status.retrying(
            "StorageUnavailable", "storage down; retrying in 10 s", NOW + dt.timedelta(seconds=10)
        ),
    )
    assert first is not None
    st = stored(kube)
    assert st["phase"] == "Running" and st["nextRetryAt"] == format_time(NOW + dt.timedelta(seconds=10))
    assert st["message"] == "storage down; retrying in 10 s"
    (cond,) = st["conditions"]
    assert (cond["type"], cond["status"], cond["reason"], cond["lastTransitionTime"]) == (
        "Retrying",
        "True",
        "StorageUnavailable",
        T0,
    )

    clock.advance(30)  # still failing: the Retrying condition keeps the time the retrying began
    writer.apply(body, status.retrying("StorageUnavailable", "still down", clock.now()))
    (cond,) = stored(kube)["conditions"]
    assert cond["lastTransitionTime"] == T0 and cond["message"] == "still down"

    clock.advance(30)
    done = writer.apply(body, status.completed("SnapshotVerified", "verified", snapshotId="s1"))
    assert done is not None and done.patch["nextRetryAt"] is None  # a merge patch's null deletes
    st = stored(kube)
    assert "nextRetryAt" not in st
    assert st["phase"] == "Completed" and st["message"] == "verified" and st["snapshotId"] == "s1"
    assert [(c["type"], c["reason"], c["lastTransitionTime"]) for c in st["conditions"]] == [
        ("Completed", "SnapshotVerified", format_time(clock.now()))
    ]


def test_failed_ends_the_retrying_too_and_completed_drops_an_old_failed_condition() -> None:
    kube, clock, writer, body = setup(phase="Running")
    writer.apply(body, status.retrying("NotThereYet", "Secret missing", LATER))
    clock.advance(3600)
    done = writer.apply(body, status.failed("VerificationTimedOut", "gave up", attempts=1))
    assert done is not None and done.transition and done.new_phase == "Failed"
    st = stored(kube)
    assert "nextRetryAt" not in st and st["attempts"] == 1 and st["message"] == "gave up"
    assert [(c["type"], c["reason"]) for c in st["conditions"]] == [("Failed", "VerificationTimedOut")]

    change = status.completed("R", "ok")
    assert change.drop == ("Retrying", "Failed") and change.phase == "Completed"
    patch = change.patch({"conditions": st["conditions"]}, clock.now())
    assert [c["type"] for c in patch["conditions"]] == ["Completed"]
    assert "nextRetryAt" not in patch  # nothing to delete: no null written


def test_a_plain_update_writes_its_fields_only() -> None:
    change = status.update(phase="Running", attempts=2)
    assert change.phase == "Running" and change.add == () and change.drop == ()
    assert change.patch({"nextRetryAt": T0, "conditions": []}, NOW) == {"phase": "Running", "attempts": 2}
