"""Leader election's decision: pure, with the candidate's own monotonic clock."""

from __future__ import annotations

from nightjar.leader import Observation, Record, decide


def held(by: str, version: str = "1", lease: int = 15) -> Record:
    return Record(holder=by, lease_seconds=lease, version=version)


def test_nobody_holds_it_yet() -> None:
    assert decide("a", None, Observation(), 0.0, 15).take


def test_a_released_lease_is_free() -> None:
    assert decide("a", held(""), Observation(held(""), 0.0), 0.0, 15).take


def test_the_holder_renews() -> None:
    d = decide("a", held("a"), Observation(held("a"), 0.0), 100.0, 15)
    assert d.take and d.why == "renew"


def test_a_live_holder_keeps_it() -> None:
    rec = held("b")
    d = decide("a", rec, Observation(rec, 100.0), 110.0, 15)
    assert not d.take and "b" in d.why


def test_a_holder_that_stopped_renewing_loses_it_after_a_lease_period_on_our_clock() -> None:
    rec = held("b")
    assert not decide("a", rec, Observation(rec, 100.0), 114.9, 15).take
    d = decide("a", rec, Observation(rec, 100.0), 115.0, 15)
    assert d.take and "stopped renewing" in d.why


def test_a_renewed_record_restarts_the_wait() -> None:
    # The holder renewed (a new resourceVersion) since we last looked: not expired, whatever
    # its timestamps say (we never compare clocks across machines).
    assert not decide("a", held("b", version="2"), Observation(held("b", version="1"), 0.0), 1000.0, 15).take


def test_the_longer_of_the_two_lease_durations_counts() -> None:
    rec = held("b", lease=60)
    assert not decide("a", rec, Observation(rec, 0.0), 30.0, 15).take
    assert decide("a", rec, Observation(rec, 0.0), 60.0, 15).take
