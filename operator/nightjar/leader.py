"""Leader election on a coordination.k8s.io Lease, so two operator replicas are safe.

Only the holder of the Lease runs kopf and the sweeps; a standby waits. The model is
client-go's leaderelection: a candidate takes the Lease when it is free or when its record has
not changed for ``lease_seconds`` *as observed on the candidate's own clock* (no trust in the
holder's clock); the holder renews every ``retry_seconds``; a holder that cannot renew within
``renew_deadline_seconds`` gives up and the process exits, so two replicas never both act
(the Deployment restarts it as a standby). On a clean stop the holder releases the Lease, so a
rolling upgrade hands over at once instead of after a lease period.

``decide`` is the pure part (unit-tested); ``LeaderElector`` does the API calls.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("nightjar.leader")


@dataclass(frozen=True)
class Record:
    """What the Lease says (``spec``); ``version`` is its resourceVersion."""

    holder: str = ""
    lease_seconds: int = 15
    acquired: str | None = None
    renewed: str | None = None
    transitions: int = 0
    version: str = ""


@dataclass
class Observation:
    """The last record seen and when (monotonic, local clock)."""

    record: Record | None = None
    seen_at: float = 0.0


@dataclass(frozen=True)
class Decision:
    take: bool
    why: str


def decide(me: str, record: Record | None, obs: Observation, now: float, lease_seconds: int) -> Decision:
    """May ``me`` write itself into the Lease now? Pure: ``now`` and ``obs`` are monotonic."""
    if record is None:
        return Decision(True, "no lease yet")
    if record.holder in ("", me):
        return Decision(True, "free" if not record.holder else "renew")
    same = obs.record is not None and obs.record.version == record.version
    if not same:
        return Decision(False, f"held by {record.holder}")
    if now - obs.seen_at >= max(record.lease_seconds, lease_seconds):
        return Decision(True, f"{record.holder} stopped renewing")
    return Decision(False, f"held by {record.holder}")


def identity() -> str:
    """The Pod's name in a cluster (``POD_NAME`` from the downward API), else host and pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def _ts(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaderElector:
    api: Any  # kubernetes.client.ApiClient
    namespace: str
    name: str = "nightjar-operator"
    me: str = field(default_factory=identity)
    lease_seconds: int = 15
    renew_deadline_seconds: int = 10
    retry_seconds: float = 2.0
    on_lost: Callable[[], None] = field(default=lambda: os._exit(1))
    clock: Callable[[], float] = time.monotonic
    _obs: Observation = field(default_factory=Observation)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    is_leader: bool = False

    @property
    def _coord(self) -> Any:
        return client.CoordinationV1Api(self.api)

    def _read(self) -> Record | None:
        try:
            lease = self._coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        spec = lease.spec
        return Record(
            holder=spec.holder_identity or "",
            lease_seconds=int(spec.lease_duration_seconds or self.lease_seconds),
            acquired=_ts(spec.acquire_time) if spec.acquire_time else None,
            renewed=_ts(spec.renew_time) if spec.renew_time else None,
            transitions=int(spec.lease_transitions or 0),
            version=lease.metadata.resource_version or "",
        )

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        now_wall = _ts(dt.datetime.now(dt.UTC))
        record = self._read()
        now = self.clock()
        if record is None or self._obs.record is None or self._obs.record.version != record.version:
            self._obs = Observation(record, now)
        d = decide(self.me, record, self._obs, now, self.lease_seconds)
        if not d.take:
            return False
        ours = record is not None and record.holder == self.me
        spec = {
            "holderIdentity": self.me,
            "leaseDurationSeconds": self.lease_seconds,
            "acquireTime": record.acquired if ours and record and record.acquired else now_wall,
            "renewTime": now_wall,
            "leaseTransitions": (record.transitions + (0 if ours else 1)) if record else 0,
        }
        body: dict[str, Any] = {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
        try:
            if record is None:
                self._coord.create_namespaced_lease(self.namespace, body)
            else:
                body["metadata"]["resourceVersion"] = record.version
                self._coord.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as e:
            if e.status == 409:  # somebody else wrote first: not ours this round
                return False
            raise
        if not ours:
            log.info("became the leader (lease %s/%s): %s", self.namespace, self.name, d.why)
        return True

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this replica leads (True) or ``stop`` is set (False)."""
        stop = stop or self._stop
        waiting_logged = False
        while not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    self.is_leader = True
                    return True
            except ApiException as e:
                log.warning("leader election: lease %s/%s: %s", self.namespace, self.name, e.reason)
            except Exception as e:  # network: the API server is down; keep trying
                log.warning("leader election: %s", e)
            if not waiting_logged:
                holder = self._obs.record.holder if self._obs.record else "?"
                log.info(
                    "standby: lease %s/%s is held by %s; waiting to take over",
                    self.namespace,
                    self.name,
                    holder,
                )
                waiting_logged = True
            stop.wait(self.retry_seconds)
        return False

    def start_renewing(self) -> None:
        """Renew in a thread; when renewal fails for ``renew_deadline_seconds``, ``on_lost``."""

        def loop() -> None:
            last_ok = self.clock()
            while not self._stop.wait(self.retry_seconds):
                try:
                    if self.try_acquire_or_renew():
                        last_ok = self.clock()
                        continue
                    log.error("lost the lease %s/%s to another replica", self.namespace, self.name)
                except Exception as e:
                    log.warning("renewing the lease failed: %s", e)
                    if self.clock() - last_ok < self.renew_deadline_seconds:
                        continue
                    log.error("could not renew the lease for %ss", self.renew_deadline_seconds)
                self.is_leader = False
                self.on_lost()
                return

        self._thread = threading.Thread(target=loop, name="nightjar-leader", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and hand the Lease back (best effort), so a standby takes over now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.retry_seconds + 5)
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            record = self._read()
            if record is None or record.holder != self.me:
                return
            body = {
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    "resourceVersion": record.version,
                },
                "spec": {
                    "holderIdentity": "",
                    "leaseDurationSeconds": 1,
                    "renewTime": _ts(dt.datetime.now(dt.UTC)),
                    "leaseTransitions": record.transitions,
                },
            }
            self._coord.replace_namespaced_lease(self.name, self.namespace, body)
            log.info("released the lease %s/%s", self.namespace, self.name)
        except ApiException as e:
            log.warning("could not release the lease: %s %s", e.status, e.reason)
        except Exception as e:
            log.warning("could not release the lease: %s", e)
