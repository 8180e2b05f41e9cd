"""Prometheus metrics of the operator, each updated where the reconciler did what it counts.

Registry: prometheus_client's default ``REGISTRY``. The operator is one process with one
exporter, so a module registry would buy nothing, and the default one also carries the client's
process and platform collectors (CPU, memory, open file descriptors, Python GC) for free. Tests
read values with ``REGISTRY.get_sample_value``. The agent (what runs in Jobs) never imports this.

Counting rule: a reconciler calls a ``*_transition`` helper right after the status patch that
records the new phase succeeded. That patch is conditional on the resourceVersion it read and a
terminal phase is never written twice, so each transition is counted once by whichever writer won
it; an operator that restarts and re-reads a Completed Backup writes nothing and counts nothing.
Counters start at zero with the process (Prometheus' ``increase()``/``rate()`` handle the reset).
The "last completed backup" gauges are the exception: they are rebuilt from the Backups that
exist on every scheduler tick (:func:`completed_backup_seen`), so a restart does not blank them.

Cardinality stays bounded: labels are namespaces, schedules, source ids, and enums (type,
contents, phase, skip reason); never a Backup's or a Restore's name.

Updating a metric never raises into a reconciler: every helper logs and swallows its own errors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from nightjar.constants import LABEL_SCHEDULE as SCHEDULE_LABEL
from nightjar.domain.retention import parse_time

log = logging.getLogger("nightjar.metrics")

# Every counter and histogram would also export a ``*_created`` series per label set: twice the
# series for a start time that Prometheus does not use. The operator owns its process, so off.
disable_created_metrics()  # type: ignore[no-untyped-call]  # the client leaves it untyped

__all__ = [
    "REGISTRY",
    "backup_transition",
    "completed_backup_seen",
    "gc_deferred",
    "gc_deleted",
    "leader",
    "restore_transition",
    "schedule_slot_missed",
    "schedule_slot_skipped",
    "schedules_seen",
    "start_server",
    "storage_checked",
    "storages_seen",
    "verification_finished",
    "verified_backup_seen",
]

#: From a second to a day: a small database takes seconds, a large app's files take hours.
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)

BACKUPS_TOTAL = Counter(
    "nightjar_backups_total",
    "Backup phase transitions (Queued, Running, Completed, Failed), by the Backup's type "
    "(OnDemand, Nightly, Weekly, Monthly, Uploaded).",
    ["namespace", "type", "phase"],
)
RESTORES_TOTAL = Counter(
    "nightjar_restores_total",
    "Restore phase transitions (Queued, Running, Completed, Failed), by what was restored "
    "(Full or DatabaseOnly).",
    ["namespace", "contents", "phase"],
)
BACKUP_DURATION = Histogram(
    "nightjar_backup_duration_seconds",
    "Duration of Completed backups: from the snapshot's start (status.createdOn) to its "
    "verification (status.completedOn); for Uploaded ones, from the Backup's creation.",
    ["namespace", "type"],
    buckets=DURATION_BUCKETS,
)
RESTORE_DURATION = Histogram(
    "nightjar_restore_duration_seconds",
    "Duration of Completed restores, from status.startedAt to status.completedAt.",
    ["namespace", "contents"],
    buckets=DURATION_BUCKETS,
)
BACKUP_BYTES_TOTAL = Counter(
    "nightjar_backup_bytes_total",
    "Bytes of completed backups (status.sizeUncompressedBytes: the database dump plus the files, "
    "uncompressed), summed as each one completes.",
    ["namespace"],
)
BACKUP_SIZE = Gauge(
    "nightjar_backup_size_bytes",
    "status.sizeUncompressedBytes of the last completed backup of each source.",
    ["namespace", "source"],
)
LAST_SUCCESS = Gauge(
    "nightjar_last_successful_backup_timestamp_seconds",
    "Unix time at which the last completed backup of each source completed (status.completedOn).",
    ["namespace", "source"],
)
SLOTS_SKIPPED = Counter(
    "nightjar_schedule_slots_skipped_total",
    "Schedule slots skipped on purpose (reason AppMissing or AppNotRunning: onlyWhenAppRunning).",
    ["namespace", "schedule", "reason"],
)
SLOTS_MISSED = Counter(
    "nightjar_schedule_slots_missed_total",
    "Schedule slots whose window closed before their backup could start (e.g. the operator was down).",
    ["namespace", "schedule"],
)
GC_DELETIONS = Counter(
    "nightjar_gc_deletions_total",
    "Expired Backups deleted by garbage collection.",
    ["namespace"],
)
GC_DEFERRED = Counter(
    "nightjar_gc_deferred_total",
    "Expired Backups left for a later sweep because their storage was unreachable (once per sweep).",
    ["namespace"],
)
REPLICATION_LAG = Histogram(
    "nightjar_replication_lag_seconds",
    "From a Backup's completion in its primary storage to its snapshot verified in a replica.",
    ["namespace", "replica"],
    buckets=DURATION_BUCKETS,
)
REPLICATIONS_TOTAL = Counter(
    "nightjar_replications_total",
    "Finished copies of snapshots into replicas, by result (Replicated or Failed).",
    ["namespace", "replica", "result"],
)
UNREPLICATED = Gauge(
    "nightjar_backups_unreplicated",
    "Completed Backups whose snapshot is not yet in every location (as of the last sweep).",
    ["namespace"],
)

# --- state gauges for the chart's alerts (charts/nightjar/templates/prometheusrule.yaml) --------
SCHEDULE_LAST_SUCCESS = Gauge(
    "nightjar_schedule_last_successful_backup_timestamp_seconds",
    "Unix time at which the last completed backup of each schedule completed (status.completedOn).",
    ["namespace", "schedule"],
)
SCHEDULE_CREATED = Gauge(
    "nightjar_schedule_created_timestamp_seconds",
    "Creation time of each BackupSchedule that exists (as of the last scheduler tick).",
    ["namespace", "schedule"],
)
SCHEDULE_SUSPENDED = Gauge(
    "nightjar_schedule_suspended",
    "1 while a BackupSchedule has spec.suspend set, else 0; one series per existing schedule.",
    ["namespace", "schedule"],
)
STORAGE_AVAILABLE = Gauge(
    "nightjar_backupstorage_available",
    "1 while a BackupStorage is Ready, 0 while Unavailable (as of its last check).",
    ["namespace", "storage"],
)
REPLICATION_OLDEST_PENDING = Gauge(
    "nightjar_replication_oldest_pending_timestamp_seconds",
    "Completion time of the oldest Completed Backup whose snapshot is not yet in every location "
    "(as of the last replication sweep); no series for a namespace with none.",
    ["namespace"],
)
VERIFICATIONS_TOTAL = Counter(
    "nightjar_verifications_total",
    "Restore drills (Verifications) that ended, by result (Passed or Failed).",
    ["namespace", "result"],
)
VERIFY_RESTORE_SECONDS = Histogram(
    "nightjar_verification_restore_seconds",
    "Measured restore time of passed drills (status.restoreSeconds): the database restored into a "
    "scratch server, the files read back. What a real restore would take (the RTO).",
    ["namespace"],
    buckets=DURATION_BUCKETS,
)
LAST_VERIFIED = Gauge(
    "nightjar_backup_last_verified_timestamp_seconds",
    "Unix time at which a backup of each source last passed a restore drill.",
    ["namespace", "source"],
)
LEADER = Gauge(
    "nightjar_leader",
    "1 while this operator process acts (holds the leader Lease, or runs without leader "
    "election), 0 while it waits as a standby.",
)

#: (namespace, source) -> completion time already in the gauges: they only ever move forward.
_last: dict[tuple[str, str], float] = {}
#: (namespace, source) -> time of the last passed drill already in the gauge.
_last_verified: dict[tuple[str, str], float] = {}
#: The same per (namespace, schedule).
_last_schedule: dict[tuple[str, str], float] = {}
_last_lock = threading.Lock()

_P = ParamSpec("_P")


def _safe(fn: Callable[_P, None]) -> Callable[_P, None]:
    """A metric is never worth a failed reconcile: log and go on."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.warning("updating metrics in %s failed", fn.__name__, exc_info=True)

    return wrapper


def _seconds(text: Any) -> float | None:
    if not text:
        return None
    try:
        return parse_time(str(text)).timestamp()
    except ValueError:
        return None


def _observe_duration(hist: Histogram, labels: tuple[str, ...], start: Any, end: Any) -> None:
    t0, t1 = _seconds(start), _seconds(end)
    if t0 is not None and t1 is not None and t1 >= t0:
        hist.labels(*labels).observe(t1 - t0)


@_safe
def backup_transition(
    backup: Mapping[str, Any], old_phase: str | None, new_phase: str, status: Mapping[str, Any]
) -> None:
    """A Backup moved from ``old_phase`` to ``new_phase``; ``status`` is what was just written
    (merged over ``backup``'s status). Call once, after the status patch succeeded."""
    if not new_phase or new_phase == old_phase:
        return
    ns = backup["metadata"]["namespace"]
    btype = (backup.get("spec") or {}).get("type") or "OnDemand"
    BACKUPS_TOTAL.labels(ns, btype, new_phase).inc()
    # The Failed series exists (at 0) from the Backup's first transition on, so the first failure
    # is an increase() Prometheus sees, not a series that appears already at 1.
    BACKUPS_TOTAL.labels(ns, btype, "Failed")
    if new_phase != "Completed":
        return
    st = {**(backup.get("status") or {}), **status}
    start = backup["metadata"].get("creationTimestamp") if btype == "Uploaded" else st.get("createdOn")
    _observe_duration(BACKUP_DURATION, (ns, btype), start, st.get("completedOn"))
    BACKUP_BYTES_TOTAL.labels(ns).inc(max(0, int(st.get("sizeUncompressedBytes") or 0)))
    _completed(ns, st, _schedule_of(backup))


def _schedule_of(backup: Mapping[str, Any]) -> str:
    return str((backup["metadata"].get("labels") or {}).get(SCHEDULE_LABEL) or "")


@_safe
def completed_backup_seen(backup: Mapping[str, Any]) -> None:
    """Feed an existing Backup to the "last completed" gauges (no counter changes): called for
    every Backup the scheduler lists, so the gauges survive an operator restart."""
    st = backup.get("status") or {}
    if st.get("phase") == "Completed":
        _completed(backup["metadata"]["namespace"], st, _schedule_of(backup))


def _completed(ns: str, st: Mapping[str, Any], schedule: str = "") -> None:
    source = str(st.get("sourceId") or "")
    when = _seconds(st.get("completedOn"))
    if when is not None and schedule:
        with _last_lock:
            if _last_schedule.get((ns, schedule), float("-inf")) <= when:
                _last_schedule[(ns, schedule)] = when
                SCHEDULE_LAST_SUCCESS.labels(ns, schedule).set(when)
    if not source or when is None:
        return
    with _last_lock:
        if _last.get((ns, source), float("-inf")) > when:
            return
        _last[(ns, source)] = when
        LAST_SUCCESS.labels(ns, source).set(when)
        BACKUP_SIZE.labels(ns, source).set(int(st.get("sizeUncompressedBytes") or 0))


@_safe
def restore_transition(
    restore: Mapping[str, Any], old_phase: str | None, new_phase: str, status: Mapping[str, Any]
) -> None:
    """A Restore moved from ``old_phase`` to ``new_phase`` (see :func:`backup_transition`)."""
    if not new_phase or new_phase == old_phase:
        return
    ns = restore["metadata"]["namespace"]
    contents = (restore.get("spec") or {}).get("contents") or "Full"
    RESTORES_TOTAL.labels(ns, contents, new_phase).inc()
    if new_phase == "Completed":
        st = {**(restore.get("status") or {}), **status}
        _observe_duration(RESTORE_DURATION, (ns, contents), st.get("startedAt"), st.get("completedAt"))


@_safe
def schedule_slot_skipped(namespace: str, schedule: str, reason: str) -> None:
    """``reason`` is a code (AppMissing, AppNotRunning), never free text."""
    SLOTS_SKIPPED.labels(namespace, schedule, reason).inc()


@_safe
def schedule_slot_missed(namespace: str, schedule: str) -> None:
    SLOTS_MISSED.labels(namespace, schedule).inc()


@_safe
def gc_deleted(namespace: str) -> None:
    GC_DELETIONS.labels(namespace).inc()


@_safe
def gc_deferred(namespace: str) -> None:
    GC_DEFERRED.labels(namespace).inc()


@_safe
def replication_done(namespace: str, replica: str, lag_seconds: float | None) -> None:
    REPLICATIONS_TOTAL.labels(namespace, replica, "Replicated").inc()
    REPLICATIONS_TOTAL.labels(namespace, replica, "Failed")  # at 0: a later failure is an increase
    if lag_seconds is not None and lag_seconds >= 0:
        REPLICATION_LAG.labels(namespace, replica).observe(lag_seconds)


@_safe
def replication_failed(namespace: str, replica: str) -> None:
    REPLICATIONS_TOTAL.labels(namespace, replica, "Failed").inc()


_unreplicated_seen: set[str] = set()


@_safe
def unreplicated(by_namespace: dict[str, int], oldest: Mapping[str, float] | None = None) -> None:
    """Set the gauges from one sweep; namespaces that had some and have none now go to 0.
    ``oldest``: per namespace, the completion time (Unix) of the oldest Backup counted."""
    for ns in _unreplicated_seen - set(by_namespace):
        UNREPLICATED.labels(ns).set(0)
    for ns, n in by_namespace.items():
        UNREPLICATED.labels(ns).set(n)
    _unreplicated_seen.update(by_namespace)
    if oldest is None:
        return
    for ns in _oldest_seen - set(oldest):
        REPLICATION_OLDEST_PENDING.remove(ns)
    for ns, t in oldest.items():
        REPLICATION_OLDEST_PENDING.labels(ns).set(t)
    _oldest_seen.clear()
    _oldest_seen.update(oldest)


_oldest_seen: set[str] = set()
_storages_seen: set[tuple[str, str]] = set()
_schedules_seen: set[tuple[str, str]] = set()


@_safe
def storage_checked(namespace: str, name: str, ready: bool) -> None:
    """A BackupStorage's check wrote phase Ready (``ready``) or Unavailable."""
    STORAGE_AVAILABLE.labels(namespace, name).set(1 if ready else 0)
    _storages_seen.add((namespace, name))


@_safe
def storages_seen(present: Iterable[tuple[str, str]]) -> None:
    """The (namespace, name) of every BackupStorage that exists: the gauges of the others go."""
    keep = set(present)
    for key in _storages_seen - keep:
        with contextlib.suppress(KeyError):
            STORAGE_AVAILABLE.remove(*key)
    _storages_seen.intersection_update(keep)


@_safe
def schedules_seen(schedules: Iterable[tuple[str, str, str, bool]]) -> None:
    """(namespace, name, creationTimestamp, suspended) of every BackupSchedule, from one tick:
    their gauges are set (and their slot counters exist at 0, so a first skip or miss counts);
    the gauges of schedules that are gone are removed."""
    now: set[tuple[str, str]] = set()
    for ns, name, created, suspended in schedules:
        now.add((ns, name))
        t = _seconds(created)
        if t is not None:
            SCHEDULE_CREATED.labels(ns, name).set(t)
        SCHEDULE_SUSPENDED.labels(ns, name).set(1 if suspended else 0)
        SLOTS_MISSED.labels(ns, name)
        for reason in ("AppMissing", "AppNotRunning"):
            SLOTS_SKIPPED.labels(ns, name, reason)
    for key in _schedules_seen - now:
        for g in (SCHEDULE_CREATED, SCHEDULE_SUSPENDED):
            with contextlib.suppress(KeyError):
                g.remove(*key)
    _schedules_seen.clear()
    _schedules_seen.update(now)


@_safe
def leader(acting: bool) -> None:
    LEADER.set(1 if acting else 0)


def start_server(port: int, address: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from outside the Pod
    """Serve ``/metrics`` of the default registry over HTTP from a daemon thread."""
    start_http_server(port, addr=address)


@_safe
def verification_finished(
    namespace: str, source: str, result: str, restore_seconds: float, when: float
) -> None:
    """A drill ended (call once, after the status write that made it terminal succeeded)."""
    VERIFICATIONS_TOTAL.labels(namespace, result).inc()
    VERIFICATIONS_TOTAL.labels(namespace, "Failed")  # the series exists before the first failure
    if result == "Passed":
        VERIFY_RESTORE_SECONDS.labels(namespace).observe(max(0.0, restore_seconds))
        _verified(namespace, source, when)


@_safe
def verified_backup_seen(backup: Mapping[str, Any]) -> None:
    """Rebuild the "last verified" gauge from a Backup's status.verification (restarts)."""
    v = (backup.get("status") or {}).get("verification") or {}
    when = _seconds(v.get("time"))
    source = str((backup.get("status") or {}).get("sourceId") or "")
    if v.get("result") == "Passed" and when is not None and source:
        _verified(backup["metadata"]["namespace"], source, when)


def _verified(namespace: str, source: str, when: float) -> None:
    if not source:
        return
    with _last_lock:
        if _last_verified.get((namespace, source), float("-inf")) <= when:
            _last_verified[(namespace, source)] = when
            LAST_VERIFIED.labels(namespace, source).set(when)
