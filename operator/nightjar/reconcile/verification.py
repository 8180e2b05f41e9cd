"""Verification (a restore drill): Queued → Running → Passed | Failed, driven by its one Job.

A Verification names a Completed Backup of its namespace and a scratch PostgreSQL server (a
Secret in the Backup's database-Secret shape). Its Job (``nightjar agent verify``) restores the
snapshot's database into a new temporary database on that server, checks every table (exact
row counts when the backup recorded them), drops it whatever happens, and reads every stored
file back checking its sha256. The Job reports what it measured; the operator writes it here,
on the Backup (``status.verification`` and the ``Verified`` condition), in the metrics and, when
a drill fails, in a Warning Event on the Backup.

Refusals (the Backup missing or not Completed, the scratch Secret missing) fail at once: nothing
is created. The drill never touches the source database: the Job gets only the scratch Secret.
A Verification that names no scratch Secret gets an ephemeral scratch server (reconcile.scratch):
started before the Job, deleted before the drill is terminal.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

from nightjar import metrics, scratchpod
from nightjar.config import OperatorConfig
from nightjar.constants import BACKUPS, STORAGES, VERIFICATIONS
from nightjar.domain.retention import format_time, parse_time
from nightjar.jobs import (
    VerifyPlan,
    build_verify_access,
    build_verify_cleanup_job,
    build_verify_job,
    job_name,
    verify_access_name,
)
from nightjar.reconcile import errors, preflight, scratch, status
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.jobstate import finished_at
from nightjar.reconcile.ports import Clock, KubeAPI, SystemClock

log = logging.getLogger("nightjar.verification")

PASSED, FAILED = "Passed", "Failed"
TERMINAL = frozenset({PASSED, FAILED})
#: The Backup's condition that tells its last drill's result.
VERIFIED = "Verified"
#: A finished Job whose Verification is still not terminal this long after is followed again.
SETTLE = dt.timedelta(seconds=15)
#: How long a transient error before the Job is retried: then Failed.
RETRY_DEADLINE = dt.timedelta(minutes=15)


def cleanup_job_name(verification: str) -> str:
    return job_name("verify-cleanup", verification)


def needs_cleanup(result: dict[str, Any]) -> bool:
    """The drill's agent may have left its temporary database: it never wrote its result (killed)
    or says it could not drop it."""
    if "passed" not in result:
        return True
    return bool(result.get("temporaryDatabase")) and result.get("temporaryDatabaseDropped") is not True


class Refused(Exception):
    """The drill cannot start; the message says why. Nothing was created."""

    retryable = False


class VerificationReconciler:
    def __init__(self, kube: KubeAPI, config: OperatorConfig, clock: Clock | None = None) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock or SystemClock()
        self.writer = status.StatusWriter(kube, VERIFICATIONS, self.clock)
        self.backups = status.StatusWriter(kube, BACKUPS, self.clock)
        self.scratch = scratch.ScratchServers(kube, config, self.clock)

    # --- status -------------------------------------------------------------------------------

    def _set(
        self, v: dict[str, Any], change: status.Update, event: tuple[str, str, str] | None = None
    ) -> status.Written | None:
        """The one place a Verification's status and Events change; a terminal phase never does."""

        def decide(fresh: dict[str, Any]) -> dict[str, Any] | None:
            cur = status.phase_of(fresh)
            if cur in TERMINAL or (change.phase == status.Phase.QUEUED and cur):
                return None
            return change.patch(fresh.get("status") or {}, self.clock.now())

        done = self.writer.write(v, decide)
        if done is not None and event is not None and (done.transition or not done.new_phase):
            self.kube.event(done.before, *event)
        return done

    def _end(
        self, v: dict[str, Any], result: str, message: str, reason: str, record: bool = True, **fields: Any
    ) -> None:
        """Passed or Failed: the Backup first (``record``: a drill that ran; a refusal learned
        nothing about the backup and leaves it alone), then the Verification, the metrics."""
        if status.phase_of(v) in TERMINAL:
            return
        if scratch.ephemeral(v):  # before the phase: a terminal drill has no scratch server left
            self.scratch.teardown(v)
        now = self.clock.now()
        ok = result == PASSED
        seconds = float(fields.get("restoreSeconds") or 0)
        backup = self._record_on_backup(v, result, message, reason, seconds, now) if record else None
        change = status.Update(
            {**fields, "phase": result, "message": message, "finishedAt": format_time(now)},
            (status.condition(VERIFIED, ok, reason, message),),
            (status.RETRYING,),
        )
        done = self._set(v, change, ("Normal" if ok else "Warning", result, message))
        if done is None or not done.transition:
            return  # another writer ended it: it told
        source = str(((backup or {}).get("status") or {}).get("sourceId") or "")
        metrics.verification_finished(v["metadata"]["namespace"], source, result, seconds, now.timestamp())

    def _record_on_backup(
        self, v: dict[str, Any], result: str, message: str, reason: str, seconds: float, now: dt.datetime
    ) -> dict[str, Any] | None:
        """The Backup shows its last drill: status.verification, the Verified condition, and a
        Warning Event when it failed. A terminal Backup's other status never changes."""
        ns, name = v["metadata"]["namespace"], v["spec"]["backupName"]
        # An API error here raises before the drill is terminal: the next follow (or the sweep)
        # records it, so a drill never ends without its Backup showing it.
        backup = self.kube.get(BACKUPS, ns, name)
        if backup is None:
            return None
        record = {
            "name": v["metadata"]["name"],
            "result": result,
            "time": format_time(now),
            "restoreSeconds": round(seconds, 3),
        }

        def decide(fresh: dict[str, Any]) -> dict[str, Any] | None:
            old = fresh.get("status") or {}
            last = old.get("verification") or {}
            if last.get("time") and parse_time(last["time"]) > now:
                return None  # a later drill already told
            cond = status.condition(VERIFIED, result == PASSED, reason, message)
            return {"verification": record, "conditions": status.conditions(old, [cond], now)}

        self.backups.write(backup, decide)
        if result != PASSED:
            self.kube.event(
                backup, "Warning", "VerificationFailed", f"restore drill {v['metadata']['name']}: {message}"
            )
        return backup

    # --- entry points -------------------------------------------------------------------------

    def reconcile(self, v: dict[str, Any]) -> None:
        """Drive one Verification one step further; idempotent. Raises Retry to be called again."""
        meta, spec = v["metadata"], v["spec"]
        ns, name = meta["namespace"], meta["name"]
        if status.phase_of(v) in TERMINAL:
            return
        if not status.phase_of(v):
            self._set(
                v,
                status.update(
                    phase=status.Phase.QUEUED.value,
                    backup=spec["backupName"],
                    message="checking the backup and the scratch server",
                ),
                ("Normal", "Queued", f"restore drill of Backup {spec['backupName']} queued"),
            )
        job = self.kube.read_job(ns, verify_access_name(name))
        if job is not None:
            self.sync_from_job(v, job)
            return
        try:
            backup, storage, secret, db_keys, host = self._check(v)
            plan = VerifyPlan.of(
                v, backup, storage, db_keys, report_progress=True, scratch_secret=secret, scratch_host=host
            )
            for obj in build_verify_access(plan):  # the agent reports progress to this drill only
                self.kube.create_if_absent(obj)
            body = build_verify_job(plan, self.config)
            created = self.kube.create_job(ns, body)
            self._set(
                v,
                status.Update(
                    {"jobName": body["metadata"]["name"], "message": "drill Job created"},
                    drop=(status.RETRYING,),
                ),
                ("Normal", "JobCreated", f"created Job {body['metadata']['name']}") if created else None,
            )
        except Refused as e:
            self._end(v, FAILED, f"{e}; nothing was created", "Refused", record=False)
        except scratch.ScratchFailed as e:
            self._end(v, FAILED, str(e), "ScratchServerFailed", record=False)
        except scratch.Starting as e:
            if (v.get("status") or {}).get("message") != str(e):
                self._set(v, status.update(message=str(e)))
            raise
        except (Retry, status.StatusConflict):
            raise
        except Exception as e:
            self._retry_or_fail(v, errors.classify(e))

    def _check(self, v: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str, tuple[str, ...], str]:
        """The Backup, its storage, the scratch Secret, its keys and (ephemeral server) address."""
        ns, spec = v["metadata"]["namespace"], v["spec"]
        backup = self.kube.get(BACKUPS, ns, spec["backupName"])
        if backup is None:
            raise Refused(f'Backup "{spec["backupName"]}" not found in namespace {ns}')
        bst = backup.get("status") or {}
        if bst.get("phase") != status.Phase.COMPLETED:
            raise Refused(
                f"Backup {spec['backupName']} is {bst.get('phase') or 'not started'}, not Completed: "
                "only a Completed backup can be verified"
            )
        if not (bst.get("storage") or {}).get("manifestKey"):
            raise Refused(f"Backup {spec['backupName']} records no manifest")
        storage_name = backup["spec"]["storageRef"]["name"]
        storage = self.kube.get(STORAGES, ns, storage_name)
        if storage is None:
            raise Refused(f'the Backup\'s BackupStorage "{storage_name}" no longer exists in {ns}')
        secret, host = self._scratch_secret(v), ""
        if scratch.ephemeral(v):
            host = self.scratch.ready(v, backup)  # Starting until it is Ready
        try:
            db_keys = preflight.scratch_keys(self.kube, ns, secret, host_given=bool(host))
        except preflight.Missing as e:
            raise Refused(f"scratch database: {e}") from e
        return backup, storage, secret, db_keys, host

    @staticmethod
    def _scratch_secret(v: dict[str, Any]) -> str:
        """The scratch Secret the spec names, or the ephemeral scratch server's."""
        if scratch.ephemeral(v):
            return scratchpod.scratch_name(v["metadata"]["name"])
        return str(v["spec"]["scratch"]["database"]["secretRef"]["name"])

    def _retry_or_fail(self, v: dict[str, Any], verdict: errors.Verdict) -> None:
        if isinstance(verdict, errors.Permanent):
            self._end(v, FAILED, f"{verdict.message}; nothing was created", verdict.reason, record=False)
            return
        now = self.clock.now()
        cond = status.find_condition(v, status.RETRYING)
        since = parse_time(cond["lastTransitionTime"]) if cond and cond.get("lastTransitionTime") else now
        if now - since >= RETRY_DEADLINE:
            message = f"{verdict.message} (still failing after 15 min); nothing was created"
            self._end(v, FAILED, message, verdict.reason, record=False)
            return
        delay = errors.backoff((now - since).total_seconds())
        message = f"{verdict.message}; retrying in {delay:.0f} s"
        self._set(v, status.retrying(verdict.reason, message, now + dt.timedelta(seconds=delay)))
        raise Retry(message, delay)

    def sync_from_job(self, v: dict[str, Any], job: dict[str, Any]) -> None:
        """Follow the Job: Running, then Passed or Failed with what the drill measured. A drill
        that could not drop its temporary database (its agent was killed) is cleaned up first: a
        Verification is never terminal while its temporary database may still exist."""
        if status.phase_of(v) in TERMINAL:
            return
        js = job.get("status") or {}
        conds = {c["type"]: c for c in js.get("conditions") or [] if c.get("status") == "True"}
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        if "Complete" in conds or "Failed" in conds:
            results = self.kube.job_results(ns, name)
            result = results[-1] if results else {}
            note = ""
            if needs_cleanup(result):
                done, note = self._cleaned_up(v, job)
                if not done:
                    return  # the cleanup Job runs; its end brings this back (event or sweep)
            self._finish(v, conds, result, note)
            return
        if int(js.get("active") or 0) > 0 and status.phase_of(v) != status.Phase.RUNNING:
            self._set(
                v,
                status.update(
                    phase=status.Phase.RUNNING.value,
                    startedAt=js.get("startTime") or format_time(self.clock.now()),
                    message="restoring into a temporary database on the scratch server",
                ),
                ("Normal", "Running", f"drill Job {name} running"),
            )

    def _finish(
        self, v: dict[str, Any], conds: dict[str, dict[str, Any]], result: dict[str, Any], note: str
    ) -> None:
        measured = {
            k: result[k]
            for k in (
                "restoreSeconds",
                "tablesChecked",
                "rowsChecked",
                "exactCounts",
                "filesChecked",
                "bytesChecked",
            )
            if k in result
        }
        if "Complete" in conds and result.get("passed") is True and "error" not in result:
            msg = (
                f"restored in {float(result.get('restoreSeconds') or 0):.1f} s: "
                f"{result.get('tablesChecked', 0)} tables, {result.get('rowsChecked', 0)} rows"
                f"{' (exact counts)' if result.get('exactCounts') else ''}, "
                f"{result.get('filesChecked', 0)} files checked"
            )
            self._end(v, PASSED, msg, "Restored", **measured)
            return
        reason = conds.get("Failed", {}).get("reason") or "DrillFailed"
        error = result.get("error") or conds.get("Failed", {}).get("message") or "the drill Job failed"
        if reason == "DeadlineExceeded":
            error = f"the drill ran longer than {self.config.job_active_deadline_seconds}s and was stopped"
        if note:
            error = f"{error}; {note}"
        self._end(
            v, FAILED, str(error), "DrillFailed" if reason == "BackoffLimitExceeded" else reason, **measured
        )

    def _cleaned_up(self, v: dict[str, Any], job: dict[str, Any]) -> tuple[bool, str]:
        """Make sure the temporary databases of the drill's Pods are gone: run (once) the cleanup
        Job; (True, what it did) once it ended, (False, "") while it runs. A cleanup that fails
        for good ends the drill saying which database may be left to drop by hand."""
        meta = v["metadata"]
        ns = meta["namespace"]
        cleanup = self.kube.read_job(ns, cleanup_job_name(meta["name"]))
        if cleanup is None:
            backup = self.kube.get(BACKUPS, ns, v["spec"]["backupName"])
            storage_name = (backup or {}).get("spec", {}).get("storageRef", {}).get("name", "")
            storage = self.kube.get(STORAGES, ns, storage_name) if backup is not None else None
            drills = self.kube.job_pod_uids(ns, job["metadata"]["name"])
            if backup is None or storage is None or not drills:
                return True, "its temporary database (nightjar_verify_*) may be left on the scratch server"
            secret, host = self._scratch_secret(v), ""
            if scratch.ephemeral(v):
                host = self.scratch.address(v)
                if not host:
                    return True, "the scratch server is gone, and its temporary database with it"
            try:
                keys = preflight.scratch_keys(self.kube, ns, secret, host_given=bool(host))
            except preflight.Missing as e:
                return (
                    True,
                    f"its temporary database (nightjar_verify_*) may be left on the scratch server: {e}",
                )
            plan = VerifyPlan.of(v, backup, storage, keys, scratch_secret=secret, scratch_host=host)
            self.kube.create_job(ns, build_verify_cleanup_job(plan, drills, self.config))
            message = "the drill ended without dropping its temporary database: dropping it"
            self._set(v, status.update(message=message))
            return False, ""
        done = {
            c["type"]
            for c in (cleanup.get("status") or {}).get("conditions") or []
            if c.get("status") == "True"
        }
        if not done & {"Complete", "Failed"}:
            return False, ""
        out = (self.kube.job_results(ns, cleanup["metadata"]["name"]) or [{}])[-1]
        if "Complete" in done:
            return (
                True,
                f"the cleanup Job dropped {', '.join(out.get('dropped') or []) or 'nothing (none left)'}",
            )
        why = out.get("error") or "the cleanup Job failed"
        return True, f"its temporary database (nightjar_verify_*) may be left on the scratch server: {why}"

    def follow(self, v: dict[str, Any]) -> None:
        """Follow the drill's Job (after an event of it or of its cleanup Job)."""
        job = self.kube.read_job(v["metadata"]["namespace"], verify_access_name(v["metadata"]["name"]))
        if job is not None:
            self.sync_from_job(v, job)

    def retry_sweep(self, verifications: Iterable[dict[str, Any]]) -> list[str]:
        """Follow again the finished Jobs of Verifications that are not terminal (a lost event)."""
        now = self.clock.now()
        followed = []
        for v in verifications:
            meta, st = v["metadata"], v.get("status") or {}
            if status.phase_of(v) in TERMINAL or not st.get("jobName") or meta.get("deletionTimestamp"):
                continue
            try:
                job = self.kube.read_job(meta["namespace"], st["jobName"])
                ended = finished_at(job) if job is not None else None
                if job is None or ended is None or now < ended + SETTLE:
                    continue
                followed.append(f"{meta['namespace']}/{meta['name']}")
                self.sync_from_job(v, job)
            except Exception:
                log.exception("following the Job of verification %s/%s", meta["namespace"], meta["name"])
        return followed
