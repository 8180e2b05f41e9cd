"""One fault-injection run against a running local stack (``devstack chaos``, ``make chaos``).

1. Lanes (namespaces) start taking Backups, restoring them and expiring old ones; the operator
   replicates every Backup to the replica server and its GC sweep deletes the expired ones.
2. Meanwhile the seeded schedule's faults are injected one after another, each held a moment and
   then recovered.
3. Every component is brought back; the lanes finish their operation; the run waits (bounded)
   for every Backup to be terminal, replicated or collected, and for the storage sweep.
4. The invariants are checked against what is really there (bucket objects read back and their
   digests checked through the storage seam, database rows and files compared), then every Backup
   is deleted and both buckets must be left with nothing of them.
5. The table: operations, faults of each kind, violations per invariant, the seed.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes import client, config

from nightjar.constants import LABEL_BACKUP
from nightjar.devstack.chaos.faults import Injector
from nightjar.devstack.chaos.invariants import (
    COMPLETED,
    FAILED,
    BackupSeen,
    check_backups,
    check_restores,
    find_orphans,
    rebase,
    verifiable_attempt,
    verify_snapshot,
)
from nightjar.devstack.chaos.plan import Pace, Tally, Violation, lane_rng, plan_faults, table
from nightjar.devstack.chaos.workload import TERMINAL, ChaosError, G, Kube, Lane, Pg, V, call
from nightjar.devstack.stack import S3_SERVERS, Stack, parse_env
from nightjar.storage import layout
from nightjar.storage.manifest import PublicManifest
from nightjar.storage.objects import ObjectStore, StorageError

#: How often a fault that found nothing to hit (no agent Pod running) goes back in the queue.
MAX_REQUEUE = 5


class JobWatch(threading.Thread):
    """Polls the backup Jobs of the lanes' namespaces: every Job uid seen per Backup, and the most
    seen at one time (two Jobs for one Backup is a violation)."""

    def __init__(self, batch: Any, namespaces: list[str]) -> None:
        super().__init__(daemon=True, name="chaos-jobs")
        self.batch, self.namespaces = batch, namespaces
        self.uids: dict[str, set[str]] = defaultdict(set)
        self.at_once: dict[str, int] = defaultdict(int)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.5):
            self.poll()

    def poll(self) -> None:
        for ns in self.namespaces:
            try:
                jobs = self.batch.list_namespaced_job(
                    ns, label_selector=LABEL_BACKUP, _request_timeout=10
                ).items
            except Exception:  # noqa: S112 - the API server may be down on purpose
                continue
            now: dict[str, int] = defaultdict(int)
            for job in jobs:
                ref = f"{ns}/{job.metadata.labels[LABEL_BACKUP]}"
                self.uids[ref].add(job.metadata.uid)
                now[ref] += 1
            for ref, n in now.items():
                self.at_once[ref] = max(self.at_once[ref], n)


class Run:
    def __init__(
        self,
        state_dir: Path,
        faults: int,
        seed: int,
        lanes: int = 3,
        settle: float = 300,
        pace: Pace | None = None,
        out: Callable[[str], None] = print,
    ) -> None:
        self.t0 = time.monotonic()
        self.out = out
        self.seed, self.faults_wanted, self.settle = seed, faults, settle
        # The stack's own lines (restarted X, data kept) only while mending it at the end: each
        # fault's line says what was hit and how long it took to come back.
        self.stack_lines = False
        self.stack = Stack(state_dir, out=self._stack_line)
        st, _, dead = self.stack.status()
        if st is None or dead or st.stopped:
            raise ChaosError(f"the stack in {self.stack.dir} is not up: start it (`up`) first")
        self.env = parse_env(self.stack.dir / "env")
        api = config.new_client_from_config(str(self.stack.dir / "kubeconfig"))
        self.kube = Kube(client.CoreV1Api(api), client.CustomObjectsApi(api), client.BatchV1Api(api))
        self.pg = Pg(self.env)
        self.tally = Tally()
        self.lock = threading.Lock()
        self.tag = secrets.token_hex(3)
        self.plan = plan_faults(seed, faults, pace or Pace())
        self.lanes = [
            Lane(i, self.tag, self.kube, self.pg, self.env, lane_rng(seed, i), self.log, self.count)
            for i in range(lanes)
        ]
        self.namespaces = [lane.ns for lane in self.lanes]
        self.primary = self.stack.s3_store("primary", self.env["NIGHTJAR_S3_BUCKET_PLAIN"])
        self.replica = self.stack.s3_store("replica", self.env["NIGHTJAR_S3_REPLICA_BUCKET_PLAIN"])
        self.violations: list[Violation] = []
        self.checked: dict[str, int] = {}  # bucket -> objects the last orphan check looked at

    def log(self, line: str) -> None:
        with self.lock:
            self.out(f"[{time.monotonic() - self.t0:7.1f}s] {line}")

    def _stack_line(self, line: str) -> None:
        if self.stack_lines:
            self.log(f"  stack: {line.strip()}")

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.tally.ops[what] += n

    def _phase(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.tally.seconds[name] = now - since
        return now

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        self.log(f"seed {self.seed}: {len(self.plan)} faults, {len(self.lanes)} lanes, run tag {self.tag}")
        t = time.monotonic()
        for lane in self.lanes:
            lane.setup()
        t = self._phase("setup", t)
        injector = Injector(self.stack, self.kube.core, self.namespaces, self.log)
        jobs = JobWatch(self.kube.batch, self.namespaces)
        jobs.start()
        stop = threading.Event()
        threads = [
            threading.Thread(target=lane.run, args=(stop,), name=f"lane-{lane.index}") for lane in self.lanes
        ]
        for th in threads:
            th.start()
        try:
            self._faults(injector, stop)
        finally:
            stop.set()
            self.stack_lines = True
            injector.heal(fresh_controllers=True)
        t = self._phase("faults", t)
        self.log("faults done, every component runs; waiting for the lanes' last operations")
        for th in threads:
            th.join()
        for lane in self.lanes:
            self._judge_pending(lane)
        t = self._phase("lanes finishing", t)
        self._settle()
        jobs.stop.set()
        jobs.join()
        jobs.poll()
        t = self._phase("settling", t)
        self._check(jobs)
        self._check_orphans()
        t = self._phase("checks", t)
        self._delete_all()
        self._phase("deleting everything", t)
        self.tally.seconds["total"] = time.monotonic() - self.t0
        for v in self.violations:
            self.log(f"VIOLATION {v.line()}")
        self.out(table(self.seed, self.tally, self.violations, self.faults_wanted))
        if not self.violations:
            self._cleanup()
        else:
            self.out(f"Namespaces {', '.join(self.namespaces)} are left for inspection.")
        return 1 if self.violations else 0

    def _faults(self, injector: Injector, stop: threading.Event) -> None:
        queue = deque(self.plan)
        tries: Counter[int] = Counter()
        while queue:
            fault = queue.popleft()
            time.sleep(fault.wait)
            t = time.monotonic()
            try:
                hit = injector.inject(fault)
            except Exception as e:  # the driver's trouble, not a verdict: mend, go on
                self.count("driver errors (faults)")
                self.log(
                    f"fault {fault.index + 1} {fault.kind.value}: injecting failed: {type(e).__name__}: {e}"
                )
                injector.heal()
                continue
            if not hit:
                self.tally.skipped[fault.kind] += 1
                tries[fault.index] += 1
                again = tries[fault.index] <= MAX_REQUEUE
                if again:  # an agent Pod runs only while a Job does: try again after the others
                    queue.append(fault)
                self.log(
                    f"fault {fault.index + 1}/{len(self.plan)} {fault.kind.value}: nothing to hit, "
                    + ("tried again later" if again else "given up")
                )
                continue
            self.tally.faults[fault.kind] += 1
            time.sleep(fault.hold)
            try:
                injector.recover(fault)
            except Exception as e:  # as above
                self.count("driver errors (faults)")
                self.log(
                    f"fault {fault.index + 1} {fault.kind.value}: recovering failed: {type(e).__name__}: {e}"
                )
                injector.heal()
            self.log(
                f"fault {fault.index + 1}/{len(self.plan)} {fault.kind.value}: {hit}, held {fault.hold:.1f}s,"
                f" back after {time.monotonic() - t:.1f}s"
            )

    def _judge_pending(self, lane: Lane) -> None:
        for p in lane.pending:
            st = self._wait_terminal(lane.ns, "restores", p.name, self.settle)
            lane.judge(p, st)
        lane.pending.clear()

    def _wait_terminal(self, ns: str, plural: str, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            obj = call(self.kube.custom.get_namespaced_custom_object, G, V, ns, plural, name)
            st: dict[str, Any] = obj.get("status") or {}
            if st.get("phase") in TERMINAL or time.monotonic() > deadline:
                return st
            time.sleep(2)

    def _backups(self, ns: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = call(
            self.kube.custom.list_namespaced_custom_object, G, V, ns, "backups"
        )["items"]
        return items

    def _settled(self) -> list[str]:
        """What the run still waits for: Backups not terminal, not replicated, not collected."""
        waiting = []
        for lane in self.lanes:
            for b in self._backups(lane.ns):
                name, st = b["metadata"]["name"], b.get("status") or {}
                ref = f"{lane.ns}/{name}"
                if name in lane.expired:
                    waiting.append(f"{ref} (expired, not yet collected)")
                elif st.get("phase") not in TERMINAL:
                    waiting.append(f"{ref} ({st.get('phase') or 'no phase'})")
                elif st.get("phase") == COMPLETED and not _replicated(st):
                    waiting.append(f"{ref} (not yet replicated)")
        return waiting

    def _settle(self) -> None:
        deadline = time.monotonic() + self.settle
        last = ""
        while True:
            waiting = self._settled()
            if not waiting or time.monotonic() > deadline:
                break
            now = f"waiting for {len(waiting)}: {', '.join(waiting[:4])}"
            if now != last:
                self.log(now)
                last = now
            time.sleep(3)
        self.log(
            "settled" if not waiting else f"gave up waiting after {self.settle:.0f}s: {', '.join(waiting)}"
        )

    # --- invariants ---------------------------------------------------------------------------

    def _check(self, jobs: JobWatch) -> None:
        seen: list[BackupSeen] = []
        for lane in self.lanes:
            present = {b["metadata"]["name"]: b for b in self._backups(lane.ns)}
            names = sorted(set(present) | set(lane.expected))
            for name in names:
                ref = f"{lane.ns}/{name}"
                b = present.get(name)
                st = (b or {}).get("status") or {}
                phase = st.get("phase", "")
                verify = replica = None
                verifiable = ""
                if b is not None and phase == COMPLETED and name not in lane.expired:
                    verify, replica = self._verify(lane, st)
                    self.count("backups verified independently")
                if b is not None and phase == FAILED:
                    uid = b["metadata"]["uid"]
                    source = _source_prefix(self.primary, lane, uid)
                    if source:
                        verifiable = self._retrying(
                            partial(verifiable_attempt, self.primary, source, lane.prefix)
                        )
                if b is not None and phase == COMPLETED and _replicated(st):
                    self.count("replications completed")
                seen.append(
                    BackupSeen(
                        ref=ref,
                        phase=phase,
                        message=st.get("message", ""),
                        exists=b is not None,
                        expired=name in lane.expired,
                        jobs=len(jobs.uids.get(ref, ())),
                        max_jobs_at_once=jobs.at_once.get(ref, 0),
                        verify=verify,
                        replica=replica,
                        verifiable=verifiable,
                    )
                )
                if name in lane.expired and b is None:
                    self.count("backups collected by GC")
        self.violations += check_backups(seen)
        self.violations += check_restores(r for lane in self.lanes for r in lane.seen_restores)

    def _verify(self, lane: Lane, st: dict[str, Any]) -> tuple[str, str]:
        storage = st.get("storage") or {}
        key, sha = storage.get("manifestKey", ""), storage.get("manifestSha256", "")
        if not key:
            return "Completed without a manifest key in its status", ""
        primary = self._retrying(lambda: verify_snapshot(self.primary, key, sha))
        if not _replicated(st):
            states = [
                f"{loc.get('storage')}: {loc.get('state')} {loc.get('message', '')}"
                for loc in st.get("locations") or []
            ]
            return primary, f"not replicated after the run settled ({'; '.join(states) or 'no locations'})"
        where = rebase(lane.prefix, lane.replica_prefix)
        replica = self._retrying(lambda: verify_snapshot(self.replica, key, sha, where))
        return primary, replica

    def _retrying(self, fn: Callable[[], str], timeout: float = 60) -> str:
        """A check through the storage seam; an unreachable server (it should not be, now) is
        asked again, and reported as the check's result when it stays so."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn()
            except StorageError as e:
                if time.monotonic() > deadline:
                    return f"could not be checked: {e}"
                time.sleep(2)

    def _owned(self, lane: Lane) -> tuple[set[str], set[str]]:
        """The uids of the lane's live Backups, and every key their manifests list (with the
        manifests themselves), as the primary names them."""
        uids: set[str] = set()
        owned: set[str] = set()
        for b in self._backups(lane.ns):
            uids.add(b["metadata"]["uid"])
            key = ((b.get("status") or {}).get("storage") or {}).get("manifestKey", "")
            if key:
                with contextlib.suppress(StorageError, ValueError):
                    owned.add(key)
                    owned.update(o.key for o in PublicManifest.parse(self.primary.read(key), key).objects)
        return uids, owned

    def _orphans(self) -> list[Violation]:
        out = []
        self.checked.clear()
        for lane in self.lanes:
            uids, owned = self._owned(lane)
            where = rebase(lane.prefix, lane.replica_prefix)
            for store, prefix, keys in (
                (self.primary, lane.prefix, owned),
                (self.replica, lane.replica_prefix, {where(k) for k in owned}),
            ):
                listed = [i.key for i in store.list(layout.namespace_prefix(prefix, lane.ns))]
                self.checked[store.bucket] = self.checked.get(store.bucket, 0) + len(listed)
                for key in find_orphans(listed, prefix, uids, keys):
                    out.append(Violation("no-orphans", f"{store.bucket}/{key}", "no Backup owns it"))
        return out

    def _check_orphans(self) -> None:
        """Orphans must go by the storage sweep (an attempt's leftovers after the grace period):
        allowed two sweeps' time past the grace, then every object left must be owned."""
        deadline = time.monotonic() + 90
        while True:
            try:
                found = self._orphans()
            except StorageError as e:
                found = [Violation("no-orphans", "(listing)", f"could not list: {e}")]
            if not found or time.monotonic() > deadline:
                break
            time.sleep(5)
        for bucket, n in self.checked.items():
            self.count(f"objects checked for an owner in {bucket}", n)
        if found:
            self.log(f"{len(found)} objects nobody owns, e.g. {found[0].resource}")
        self.violations += found

    def _delete_all(self) -> None:
        """Delete every Backup (their finalizers delete the objects): nothing of them may stay."""
        for lane in self.lanes:
            for plural in ("restores", "backups"):
                for obj in call(self.kube.custom.list_namespaced_custom_object, G, V, lane.ns, plural)[
                    "items"
                ]:
                    with contextlib.suppress(client.ApiException):
                        call(
                            self.kube.custom.delete_namespaced_custom_object,
                            G,
                            V,
                            lane.ns,
                            plural,
                            obj["metadata"]["name"],
                        )
        deadline = time.monotonic() + self.settle
        left: list[str] = []
        while time.monotonic() < deadline:
            left = [
                f"{lane.ns}/{b['metadata']['name']}" for lane in self.lanes for b in self._backups(lane.ns)
            ]
            if not left:
                break
            time.sleep(2)
        for ref in left:
            self.violations.append(
                Violation("empty-after-deletion", ref, "the deleted Backup is still there")
            )
        deadline = time.monotonic() + 90
        while True:
            stays = []
            for lane in self.lanes:
                for store, prefix in ((self.primary, lane.prefix), (self.replica, lane.replica_prefix)):
                    with contextlib.suppress(StorageError):
                        stays += [
                            f"{store.bucket}/{i.key}"
                            for i in store.list(layout.namespace_prefix(prefix, lane.ns))
                        ]
            if not stays or time.monotonic() > deadline:
                break
            time.sleep(5)
        for key in stays:
            self.violations.append(
                Violation("empty-after-deletion", key, "left after every Backup was deleted")
            )

    def _cleanup(self) -> None:
        for lane in self.lanes:
            with contextlib.suppress(Exception):
                call(self.kube.core.delete_namespace, lane.ns)
            for db in (lane.db, lane.target_db):
                with contextlib.suppress(ChaosError):
                    self.pg.run("postgres", f"drop database if exists {db} with (force)")


def _replicated(st: dict[str, Any]) -> bool:
    locs = st.get("locations") or []
    return bool(locs) and all(loc.get("state") == "Replicated" for loc in locs)


def _source_prefix(store: ObjectStore, lane: Lane, uid: str) -> str:
    """The key prefix of Backup ``uid``'s objects in the primary ("" when it has none)."""
    for info in store.list(layout.namespace_prefix(lane.prefix, lane.ns)):
        where = layout.parse_key(info.key, lane.prefix)
        if where is not None and where.backup_uid == uid:
            return where.backup_prefix
    return ""


def run(
    state_dir: Path,
    faults: int,
    seed: int | None = None,
    lanes: int = 2,
    settle: float = 300,
    out: Callable[[str], None] = print,
) -> int:
    """One run; returns its exit status (0: no violation, 1: violations)."""
    if seed is None:
        seed = random.SystemRandom().randrange(1, 10**6)
    out(f"chaos: seed {seed} (replay with CHAOS_SEED={seed}); state {state_dir}")
    if S3_SERVERS.keys() != {"primary", "replica"}:  # the faults name both
        raise ChaosError("the stack has other S3 servers than primary and replica")
    return Run(state_dir, faults, seed, lanes, settle, out=out).run()
