"""Secondary locations: every Completed snapshot copied to each replica of its storage.

A Backup is Completed when its snapshot is verified in the primary. Its ``status.locations``
then lists the primary (Replicated) and each replica of the primary BackupStorage (Pending). For
each replica a Job (``nightjar agent replicate``) streams the snapshot across, verifying every
object's sha256; its result makes the location Replicated, or Failed with the reason. A replica
that cannot be reached (down, missing, refused by the residency policy) gets no Job: it stays
Pending and the periodic sweep starts the copy when it can be reached again, so nothing is
lost. One Job per (Backup, replica, attempt): a restarted operator finds it instead of making
another.

Residency: a replica is used only when the policy allows the primary's jurisdiction to be
replicated into the replica's; a BackupStorage that breaks the rule is Unavailable, and its
Backups do not start (no data goes anywhere).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar import metrics
from nightjar.config import OperatorConfig
from nightjar.constants import ANNOTATION_REPLICA, BACKUPS, STORAGES
from nightjar.domain.residency import Policy
from nightjar.domain.retention import format_time, parse_time
from nightjar.jobs import build_replicate_job, replicate_job_name
from nightjar.reconcile import status
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.ports import Clock, KubeAPI, SystemClock
from nightjar.reconcile.replicas import (
    FAILED,
    PENDING,
    REPLICATED,
    check_replicas,
    copy_outcome,
    due,
    expired,
    initial_locations,
    location_update,
    replica_names,
    replicate_plan,
)
from nightjar.storage.objects import ObjectStore, S3Target

log = logging.getLogger("nightjar.replication")


@dataclass
class SweepReport:
    examined: int = 0
    started: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    extended: list[str] = field(default_factory=list)


class Replicator:
    def __init__(
        self,
        kube: KubeAPI,
        config: OperatorConfig,
        policy: Policy,
        clock: Clock | None = None,
        open_store: Callable[[S3Target], ObjectStore] = storage_rec.store_of,
    ) -> None:
        self.kube = kube
        self.config = config
        self.policy = policy
        self.clock = clock or SystemClock()
        self.open_store = open_store
        self.writer = status.StatusWriter(kube, BACKUPS, self.clock)

    # --- status -------------------------------------------------------------------------------

    def _update(
        self,
        backup: dict[str, Any],
        change: Callable[[list[dict[str, Any]]], list[dict[str, Any]] | None],
        event: Callable[[dict[str, Any]], tuple[str, str, str] | None] | None = None,
    ) -> status.Written | None:
        """Apply ``change`` to the Completed Backup's locations through the one status writer
        (conditional on the resourceVersion read, decided again on a conflict); ``change``
        returns None when there is nothing to do."""

        def decide(fresh: dict[str, Any]) -> dict[str, Any] | None:
            st = fresh.get("status") or {}
            if st.get("phase") != status.Phase.COMPLETED or not st.get("locations"):
                return None
            locs = change(copy.deepcopy(st["locations"]))
            return None if locs is None else location_update(locs).patch(st, self.clock.now())

        done = self.writer.write(backup, decide)
        if done is not None and event is not None and (ev := event(done.before)) is not None:
            self.kube.event(done.before, *ev)
        return done

    # --- starting copies ---------------------------------------------------------------------

    def start(
        self,
        backup: dict[str, Any],
        reachable: dict[str, str] | None = None,
        storages: dict[str, dict[str, Any] | None] | None = None,
    ) -> list[str]:
        """Start a copy for each replica location not yet Replicated that has no Job running, is
        due (failed copies back off), and can be reached now; returns the replicas started.

        Decisions are made on a fresh read of the Backup. ``reachable`` ("namespace/name" → ""
        or why not) and ``storages`` ("namespace/name" → object) cache lookups across one sweep.
        """
        meta = backup["metadata"]
        ns = meta["namespace"]
        fresh = self.kube.get(BACKUPS, ns, meta["name"])
        if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
            return []
        backup = fresh
        st = backup.get("status") or {}
        if st.get("phase") != "Completed" or backup["metadata"].get("deletionTimestamp"):
            return []
        todo = [
            loc
            for loc in st.get("locations") or []
            if loc["role"] == "Replica" and loc["state"] != REPLICATED and not loc.get("final")
        ]
        if not todo:
            return []
        cache = reachable if reachable is not None else {}
        objs = storages if storages is not None else {}

        def storage(name: str) -> dict[str, Any] | None:
            if f"{ns}/{name}" not in objs:
                objs[f"{ns}/{name}"] = self.kube.get(STORAGES, ns, name)
            return objs[f"{ns}/{name}"]

        primary = storage(backup["spec"]["storageRef"]["name"])
        where = st.get("storage") or {}
        moved = ""
        if primary is None:
            moved = "its primary BackupStorage is gone"
        elif where.get("bucket") and (where["bucket"], where.get("endpoint")) != (
            primary["spec"]["bucket"],
            primary["spec"]["endpoint"],
        ):
            moved = (
                f"BackupStorage {primary['metadata']['name']} now points at bucket "
                f"{primary['spec']['bucket']} at {primary['spec']['endpoint']}; the snapshot is in "
                f"bucket {where['bucket']}"
            )
        if moved or primary is None:
            self._finish(backup, [loc["storage"] for loc in todo], moved)
            return []
        policy_j = primary["spec"].get("jurisdiction") or ""
        wanted = set(replica_names(primary))
        now = self.clock.now()
        started = []
        for loc in todo:
            name = loc["storage"]
            attempt = int(loc.get("attempts") or 0)
            if attempt and loc["state"] == PENDING:
                job = self.kube.read_job(
                    ns, loc.get("jobName") or replicate_job_name(meta["name"], name, attempt)
                )
                if job is not None:
                    js = job.get("status") or {}
                    if js.get("succeeded") or js.get("failed"):
                        self.sync_from_job(backup, job)  # finished, its event not handled yet
                    continue  # the copy runs, or just ended
            if loc["state"] == FAILED and not due(loc, now, self.config.gc_interval_seconds):
                continue
            replica = storage(name)
            if name not in wanted:
                self._finish(backup, [name], "no longer a replica of the primary storage (spec.replicas)")
                continue
            if replica is None:
                self._wait(backup, [name], f'BackupStorage "{name}" not found')
                continue
            verdict = self.policy.check(policy_j, replica["spec"].get("jurisdiction") or "")
            if not verdict.allowed:
                self._finish(backup, [name], verdict.message)
                continue
            if f"{ns}/{name}" not in cache:
                cache[f"{ns}/{name}"] = storage_rec.unreachable(self.kube, ns, replica, self.open_store)
            if cache[f"{ns}/{name}"]:
                self._wait(backup, [name], cache[f"{ns}/{name}"])
                continue
            try:
                if self._create_job(backup, primary, replica, loc, attempt + 1):
                    started.append(name)
            except ApiException as e:
                self._fail_loc(backup, name, loc.get("jobName"), f"could not create the copy Job: {e.reason}")
        return started

    def _wait(self, backup: dict[str, Any], names: list[str], why: str) -> None:
        """The replica cannot take the copy now: say why (once); it stays Pending or Failed and
        the sweep tries again."""

        def change(locs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            hit = False
            for loc in locs:
                if loc["storage"] in names and loc["state"] != REPLICATED:
                    msg = f"waiting: {why}; retried every {self.config.gc_interval_seconds}s"
                    if loc.get("message") != msg:
                        loc["message"] = msg
                        hit = True
            return locs if hit else None

        self._update(backup, change)

    def _finish(self, backup: dict[str, Any], names: list[str], why: str) -> None:
        """The copy can never happen (refused by the residency policy, no longer a replica, the
        primary gone or moved): Failed for good, with the reason; never retried, left out of the
        unreplicated gauge (the Replicated condition stays False and says why)."""

        def change(locs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            hit = False
            for loc in locs:
                if loc["storage"] in names and loc["state"] != REPLICATED and not loc.get("final"):
                    loc.update(state=FAILED, final=True, message=f"not copied: {why}")
                    hit = True
            return locs if hit else None

        self._update(
            backup,
            change,
            lambda _: ("Warning", "ReplicationRefused", f"not copied to {', '.join(names)}: {why}"),
        )

    def _fail_loc(self, backup: dict[str, Any], name: str, job_name: str | None, why: str) -> None:
        def change(locs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            for loc in locs:
                if loc["storage"] == name and loc["state"] != REPLICATED and loc.get("jobName") == job_name:
                    loc.update(state=FAILED, message=why[:1000], lastAttemptAt=format_time(self.clock.now()))
                    return locs
            return None

        self._update(backup, change)

    def _create_job(
        self,
        backup: dict[str, Any],
        primary: dict[str, Any],
        replica: dict[str, Any],
        loc: dict[str, Any],
        attempt: int,
    ) -> bool:
        meta = backup["metadata"]
        name = replica["metadata"]["name"]
        plan = replicate_plan(backup, primary, replica, attempt)
        job = build_replicate_job(plan, self.config)
        created = self.kube.create_job(meta["namespace"], job)
        decided_on = (loc.get("jobName"), loc["state"])

        def change(locs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            for cur in locs:
                if cur["storage"] != name:
                    continue
                # Somebody moved it on since the decision (a sync, another sweep): leave it.
                if (cur.get("jobName"), cur["state"]) != decided_on or cur["state"] == REPLICATED:
                    return None
                cur.update(
                    state=PENDING,
                    attempts=attempt,
                    jobName=job["metadata"]["name"],
                    lastAttemptAt=format_time(self.clock.now()),
                    message=f"copying (attempt {attempt}, Job {job['metadata']['name']})",
                )
                return locs
            return None

        self._update(
            backup,
            change,
            lambda _: (
                (
                    "Normal",
                    "ReplicationStarted",
                    f"copying the snapshot to {name} ({replica['spec'].get('jurisdiction', '')}), "
                    f"attempt {attempt}",
                )
                if created
                else None
            ),
        )
        return created

    # --- following the copy ------------------------------------------------------------------

    def sync_from_job(self, backup: dict[str, Any], job: dict[str, Any]) -> None:
        """A replication Job finished: its location becomes Replicated, or Failed with why."""
        s = job.get("status") or {}
        if not (s.get("succeeded") or s.get("failed")):
            return
        name = (job["metadata"].get("annotations") or {}).get(ANNOTATION_REPLICA, "")
        job_name = job["metadata"]["name"]
        ns = backup["metadata"]["namespace"]
        results = self.kube.job_results(ns, job_name)
        now = self.clock.now()
        completed_on = (backup.get("status") or {}).get("completedOn")
        fields, said = copy_outcome(job, results[-1] if results else {}, name, now)
        ok = fields["state"] == REPLICATED

        def change(locs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            for loc in locs:
                if loc["storage"] == name and loc.get("jobName") == job_name and loc["state"] == PENDING:
                    loc.update(fields)
                    return locs
            return None

        if self._update(backup, change, lambda _fresh: said) is not None:
            if ok:
                lag = (now - parse_time(completed_on)).total_seconds() if completed_on else None
                metrics.replication_done(ns, name, lag)
            else:
                metrics.replication_failed(ns, name)

    # --- the sweep ---------------------------------------------------------------------------

    def sweep(self, backups: Iterable[dict[str, Any]]) -> SweepReport:
        """Start the copies that wait (a replica back up, a failed copy due again), and give
        Completed Backups the locations of replicas added to their storage since."""
        report = SweepReport()
        now = self.clock.now()
        reachable: dict[str, str] = {}
        storages: dict[str, dict[str, Any] | None] = {}
        pending: dict[str, int] = {}
        oldest: dict[str, float] = {}  # namespace -> completion time of its oldest pending Backup
        for b in backups:  # a page at a time: nothing kept per Backup
            st = b.get("status") or {}
            meta = b["metadata"]
            if st.get("phase") != "Completed" or meta.get("deletionTimestamp") or expired(b, now):
                continue
            ns = meta["namespace"]
            key = f"{ns}/{meta['name']}"
            try:
                locs = st.get("locations") or []
                if self._adopt_new_replicas(b, locs, storages):
                    report.extended.append(key)
                    locs = (self.kube.get(BACKUPS, ns, meta["name"]) or b).get("status", {}).get(
                        "locations"
                    ) or []
                if all(loc.get("state") == REPLICATED or loc.get("final") for loc in locs):
                    continue
                pending[ns] = pending.get(ns, 0) + 1
                if st.get("completedOn"):
                    t = parse_time(st["completedOn"]).timestamp()
                    oldest[ns] = min(oldest.get(ns, t), t)
                report.examined += 1
                started = self.start(b, reachable=reachable, storages=storages)
            except Exception:
                log.exception("replication of %s", key)
                continue
            (report.started if started else report.waiting).append(key)
        metrics.unreplicated(pending, oldest)
        return report

    def _adopt_new_replicas(
        self, backup: dict[str, Any], locs: list[dict[str, Any]], storages: dict[str, dict[str, Any] | None]
    ) -> bool:
        """A replica added to the storage after this Backup completed gets a Pending location,
        so every snapshot ends up in every location, old ones too."""
        ns = backup["metadata"]["namespace"]
        name = backup["spec"]["storageRef"]["name"]
        if f"{ns}/{name}" not in storages:
            storages[f"{ns}/{name}"] = self.kube.get(STORAGES, ns, name)
        primary = storages[f"{ns}/{name}"]
        if primary is None or not locs:
            return False
        have = {loc["storage"] for loc in locs}
        new = [r for r in replica_names(primary) if r not in have]
        if not new:
            return False
        checks = [c for c in check_replicas(self.kube, self.policy, ns, primary) if c.name in new]

        def change(cur: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            names = {loc["storage"] for loc in cur}
            added = [
                loc
                for loc in initial_locations(primary, checks, self.clock.now())[1:]
                if loc["storage"] not in names
            ]
            return [*cur, *added] if added else None

        return bool(self._update(backup, change) is not None)
