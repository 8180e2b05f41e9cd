"""Leader election against the real API server: one leader, a standby that waits, a handover on
release and a takeover when the leader stops renewing."""

from __future__ import annotations

import threading
import time

from kubernetes import client

from nightjar.leader import LeaderElector


def elector(api_client: client.ApiClient, ns: str, me: str, lost: list[str]) -> LeaderElector:
    return LeaderElector(
        api_client,
        namespace=ns,
        name="nightjar-operator",
        me=me,
        lease_seconds=3,
        renew_deadline_seconds=2,
        retry_seconds=0.5,
        on_lost=lambda: lost.append(me),
    )


def holder(api_client: client.ApiClient, ns: str) -> str:
    lease = client.CoordinationV1Api(api_client).read_namespaced_lease("nightjar-operator", ns)
    return str(lease.spec.holder_identity or "")


def test_one_leader_a_waiting_standby_and_a_handover(api_client: client.ApiClient, namespace: str) -> None:
    lost: list[str] = []
    a, b = elector(api_client, namespace, "a", lost), elector(api_client, namespace, "b", lost)
    assert a.acquire()
    a.start_renewing()
    b_done = threading.Event()
    threading.Thread(target=lambda: (b.acquire(), b_done.set()), daemon=True).start()
    # a renews: b keeps waiting well past a lease period.
    assert not b_done.wait(5)
    assert holder(api_client, namespace) == "a"
    # a stops cleanly and releases: b takes over at once, not after a lease period.
    started = time.monotonic()
    a.release()
    assert b_done.wait(3)
    assert time.monotonic() - started < 3
    assert holder(api_client, namespace) == "b" and b.is_leader
    lease = client.CoordinationV1Api(api_client).read_namespaced_lease("nightjar-operator", namespace)
    assert lease.spec.lease_transitions == 1
    assert lost == []
    b._stop.set()


def test_a_leader_that_stops_renewing_is_replaced(api_client: client.ApiClient, namespace: str) -> None:
    lost: list[str] = []
    a, b = elector(api_client, namespace, "a", lost), elector(api_client, namespace, "b", lost)
    assert a.acquire()  # and never renews: a hung or partitioned leader
    stop = threading.Event()
    t0 = time.monotonic()
    assert b.acquire(stop)
    assert 3 <= time.monotonic() - t0 < 8
    assert holder(api_client, namespace) == "b"
    # a notices on its next renewal and gives up (the process would exit).
    a.start_renewing()
    deadline = time.monotonic() + 5
    while "a" not in lost and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lost == ["a"] and not a.is_leader
