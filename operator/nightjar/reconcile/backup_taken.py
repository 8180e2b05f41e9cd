"""Taken backups: Queued → Running → Completed | Failed, driven by one Job.

Status is derived from what exists (the Job, its Pods' termination messages, the manifest in
the bucket), so a restarted operator converges instead of duplicating: the Job has a
deterministic name, and a terminal phase is never changed again. A transient error while the
finished Job's snapshot is verified keeps the Backup Running with a message saying so and is
retried with capped backoff (:mod:`nightjar.reconcile.errors`); only a permanent one, or the
stated deadline, fails it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from nightjar.config import OperatorConfig
from nightjar.constants import ANNOTATION_EXPIRES_AT, ANNOTATION_SYNCED_FROM, STORAGES, UPLOADED
from nightjar.domain.residency import Policy
from nightjar.domain.retention import format_time, parse_time
from nightjar.jobs import build_backup_job, job_name
from nightjar.reconcile import backup_plan, errors, preflight, snapshots, status
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.backup_plan import PreflightFailed
from nightjar.reconcile.backup_status import BackupStatus
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.jobstate import finished_at
from nightjar.reconcile.ports import Clock, KubeAPI
from nightjar.storage import layout
from nightjar.storage.errors import IntegrityError
from nightjar.storage.objects import ObjectStore, S3Target

log = logging.getLogger("nightjar.backup")

#: How long after its Job finished a Backup keeps retrying the verification of its snapshot
#: while the error is transient (storage unreachable, a Secret not there yet): then Failed.
VERIFY_DEADLINE = dt.timedelta(hours=1)
#: A Job finished this long ago whose Backup is still not terminal (its event was lost, or its
#: handling failed) is followed again by :meth:`TakenBackups.retry_sweep`.
SETTLE = dt.timedelta(seconds=15)
#: Test hook (only when the operator runs with NIGHTJAR_TEST_HOOKS=1, as the dev stack's does):
#: hold the verification of the snapshot until this many seconds after the Job finished, so a
#: test can stop the S3 server between the agent's last write and the operator's verification.
ANNOTATION_TEST_VERIFY_DELAY = "nightjar.dev/test-verify-delay-seconds"


class TakenBackups:
    def __init__(
        self,
        kube: KubeAPI,
        config: OperatorConfig,
        clock: Clock,
        state: BackupStatus,
        policy: Policy,
        open_store: Callable[[S3Target], ObjectStore],
    ) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock
        self.state = state
        self.policy = policy
        self.open_store = open_store

    def reconcile(self, backup: dict[str, Any]) -> None:
        meta = backup["metadata"]
        if not status.phase_of(backup):
            expires = meta["annotations"][ANNOTATION_EXPIRES_AT]
            self.state.queued(
                backup,
                {
                    "expiresOn": expires,
                    "sourceId": layout.source_id(backup["spec"]["source"]),
                    "message": "waiting for the backup Job to start",
                },
                (
                    "Normal",
                    "Queued",
                    f"{backup['spec'].get('type') or 'OnDemand'} backup queued, expires {expires}",
                ),
            )
        job = self.kube.read_job(meta["namespace"], job_name("backup", meta["name"]))
        if job is None:
            self.start(backup)
        else:
            self.sync_from_job(backup, job)

    def start(self, backup: dict[str, Any]) -> None:
        attempts = int((backup.get("status") or {}).get("attempts") or 0)
        try:
            plan = backup_plan.plan(self.kube, self.policy, backup)
        except PreflightFailed as e:
            attempts += 1
            if attempts >= self.config.attempts:
                self.state.fail(backup, str(e), attempts, reason="PreflightFailed")
                return
            self.state.apply(
                backup,
                status.update(
                    attempts=attempts, message=f"attempt {attempts} of {self.config.attempts}: {e}"
                ),
                ("Warning", "Retrying", f"{e} (attempt {attempts} of {self.config.attempts}, retrying)"),
            )
            raise Retry(str(e), 10.0 * 2 ** (attempts - 1)) from e
        job = build_backup_job(plan, self.config)
        created = self.kube.create_job(plan.namespace, job)
        if created:
            log.info("created Job %s/%s", plan.namespace, job["metadata"]["name"])
        self.state.apply(
            backup,
            status.update(
                jobName=job["metadata"]["name"],
                modelVersion=plan.model_version,
                message="backup Job created",
                storage={
                    "storageName": backup["spec"]["storageRef"]["name"],
                    "endpoint": plan.storage.endpoint,
                    "bucket": plan.storage.bucket,
                },
            ),
            # Only the create that made the Job says so: a restarted operator finds it there.
            (
                "Normal",
                "JobCreated",
                f"created Job {job['metadata']['name']} ({self.config.attempts} attempts at most)",
            )
            if created
            else None,
        )

    # --- following the Job ------------------------------------------------------------------

    def sync_from_job(self, backup: dict[str, Any], job: dict[str, Any]) -> None:
        """Follow the Job (a dict as the API serves it): Running, then Completed or Failed."""
        st = backup.get("status") or {}
        if status.is_terminal(backup):
            return
        js = job.get("status") or {}
        conds = {c["type"]: c for c in js.get("conditions") or [] if c.get("status") == "True"}
        failed = int(js.get("failed") or 0)
        name = job["metadata"]["name"]
        if "Complete" in conds:
            self.complete(backup, job, attempts=failed + 1)
        elif "Failed" in conds:
            if self.complete_from_bucket(backup, job, attempts=max(failed, 1)):
                return
            reason = conds["Failed"].get("reason") or "JobFailed"
            message = (
                self.last_failure(backup, name) or conds["Failed"].get("message") or "the backup Job failed"
            )
            if reason == "DeadlineExceeded":
                message = f"the backup ran longer than {self.config.job_active_deadline_seconds}s: {message}"
            self.state.fail(backup, message, attempts=max(failed, 1), reason=reason)
        elif (
            int(js.get("active") or 0) > 0
            and "FailureTarget" not in conds
            and "SuccessCriteriaMet" not in conds
        ):
            attempt = failed + 1
            if st.get("phase") != status.Phase.RUNNING or st.get("attempts") != attempt:
                msg = f"attempt {attempt} of {self.config.attempts} running"
                if failed:
                    last = self.last_failure(backup, name)
                    msg += f" (attempt {failed} failed: {last})" if last else ""
                # A new attempt of a Running backup is a retry; the first Running says Running.
                event = (
                    ("Warning", "Retrying", msg)
                    if st.get("phase") == status.Phase.RUNNING
                    else ("Normal", "Running", msg)
                )
                self.state.apply(
                    backup,
                    status.update(phase=status.Phase.RUNNING.value, attempts=attempt, message=msg),
                    event,
                )

    def last_failure(self, backup: dict[str, Any], job: str) -> str:
        msgs = [
            r.get("error")
            for r in self.kube.job_results(backup["metadata"]["namespace"], job)
            if r.get("error")
        ]
        return str(msgs[-1]) if msgs else ""

    def complete_from_bucket(self, backup: dict[str, Any], job: dict[str, Any], attempts: int) -> bool:
        """A Job that failed may still have written a complete snapshot (an attempt that wrote it
        and then lost its Pod before it exited, a later attempt failing): manifest last, so one
        with every object is a good backup, never Failed. True when it completed the Backup from
        it; a transient error reading the bucket is retried (Running, said), never a failure."""
        try:
            found = self.find_snapshot(backup)
        except Exception as e:
            verdict = errors.classify(e)
            if isinstance(verdict, errors.Transient):
                finished = finished_at(job) or self.clock.now()
                self.retry_verification(backup, verdict, finished, attempts)
            return False
        if found is None:
            return False
        self.complete(backup, job, attempts, found=found)
        return True

    def complete(
        self, backup: dict[str, Any], job: dict[str, Any], attempts: int, found: dict[str, Any] | None = None
    ) -> None:
        """The Job succeeded: verify the snapshot it reported and complete the Backup.

        A transient error while verifying (storage unreachable, a 503, a Secret not there yet; see
        :mod:`nightjar.reconcile.errors`) keeps the Backup Running with a message saying so and
        raises Retry, until ``VERIFY_DEADLINE`` after the Job finished; a permanent one (the
        manifest missing or not what the agent wrote, credentials refused) fails it at once.
        """
        finished = finished_at(job) or self.clock.now()
        hold = verify_hold(backup, finished, self.clock.now())
        if hold > 0:
            raise Retry(f"test hook {ANNOTATION_TEST_VERIFY_DELAY}: verification held {hold:.0f} s", hold)
        try:
            results = (
                [found]
                if found is not None
                else [
                    r
                    for r in self.kube.job_results(backup["metadata"]["namespace"], job["metadata"]["name"])
                    if "manifestKey" in r
                ]
            )
            if not results:
                # Its Pod went (deleted, evicted, a node lost) after the agent finished: the
                # snapshot it wrote is in the bucket, manifest last, or there is none.
                found = self.find_snapshot(backup)
                if found is None:
                    self.state.fail(
                        backup, "the backup Job succeeded but reported no snapshot", attempts, "NoResult"
                    )
                    return
                results = [found]
            result = results[-1]
            self.verify_manifest(backup, result)
        except Retry:
            raise
        except Exception as e:
            verdict = errors.classify(e)
            if isinstance(verdict, errors.Permanent):
                msg = f"snapshot verification failed: {verdict.message}"
                self.state.fail(backup, msg, attempts, "VerificationFailed")
                return
            self.retry_verification(backup, verdict, finished, attempts)
            return
        size = int(result.get("sizeUncompressedBytes") or 0)
        files = result.get("files")
        done = status.completed(
            "SnapshotVerified",
            f"snapshot {result['snapshotId']} stored and verified ({result.get('objects', 0)} objects)",
            snapshotId=result["snapshotId"],
            createdOn=result["createdOn"],
            completedOn=format_time(self.clock.now()),
            sizeUncompressedBytes=size,
            sizeUncompressedMB=f"{size / 1e6:.2f}",
            database=result.get("database") or {},
            files={"count": files["count"], "bytes": files["bytes"]} if files else {"count": 0, "bytes": 0},
            attempts=attempts,
            storage={
                **((backup.get("status") or {}).get("storage") or {}),
                "manifestKey": result["manifestKey"],
                "manifestSha256": result.get("manifestSha256", ""),
            },
        )
        event = ("Normal", "Completed", f"snapshot {result['snapshotId']} completed, {size / 1e6:.2f} MB")
        self.state.complete(backup, done, event)

    def find_snapshot(self, backup: dict[str, Any]) -> dict[str, Any] | None:
        """The snapshot this Backup's Job wrote, read from the bucket when its result is lost:
        the newest manifest under the Backup's own prefix, parsed (keys checked) and with every
        object it lists present at its size. None when there is none; raises what reading
        raises (the caller classifies: retried, or failed)."""
        meta, ns = backup["metadata"], backup["metadata"]["namespace"]
        storage = self.kube.get(STORAGES, ns, backup["spec"]["storageRef"]["name"])
        if storage is None:
            return None  # nothing to look in
        target = storage_rec.target_for(self.kube, ns, storage["spec"])
        store = self.open_store(target)
        mine = layout.backup_prefix(
            target.prefix, ns, layout.source_id(backup["spec"]["source"]), meta["uid"]
        )
        found = snapshots.newest_snapshot(store, mine, preflight.keyring(self.kube, ns, storage["spec"]))
        if found is not None:
            log.warning(
                "backup %s/%s: its Job's result is lost (the Pod is gone); found snapshot %s in the bucket",
                ns,
                meta["name"],
                found["manifestKey"],
            )
        return found

    def retry_verification(
        self, backup: dict[str, Any], verdict: errors.Transient, finished: dt.datetime, attempts: int
    ) -> None:
        """Say why the verification waits and when it is tried again, then raise Retry; past the
        deadline, fail the Backup saying so."""
        now = self.clock.now()
        deadline = finished + VERIFY_DEADLINE
        what = errors.WHAT.get(verdict.reason, "an unexpected error")
        if now >= deadline:
            self.state.fail(
                backup,
                f"snapshot verification failed: {what} for {span(VERIFY_DEADLINE)} after the Job "
                f"finished: {verdict.message}",
                attempts,
                reason="VerificationTimedOut",
            )
            return
        delay = errors.backoff((now - finished).total_seconds())
        message = (
            f"{what} while verifying the snapshot: {verdict.message}; retrying in {delay:.0f} s "
            f"(until {format_time(deadline)}, {span(VERIFY_DEADLINE)} after the Job finished)"
        )
        first = status.find_condition(backup, status.RETRYING) is None
        self.state.apply(
            backup,
            status.retrying(
                verdict.reason,
                message,
                now + dt.timedelta(seconds=delay),
                phase=status.Phase.RUNNING.value,
                attempts=attempts,
            ),
        )
        if first:
            self.kube.event(backup, "Warning", "VerificationRetrying", message)
        log.warning("backup %s/%s: %s", backup["metadata"]["namespace"], backup["metadata"]["name"], message)
        raise Retry(message, delay)

    def verify_manifest(self, backup: dict[str, Any], result: dict[str, Any]) -> None:
        """The manifest the agent reported is in the bucket with the digest it reported."""
        ns = backup["metadata"]["namespace"]
        name = backup["spec"]["storageRef"]["name"]
        storage = self.kube.get(STORAGES, ns, name)
        if storage is None:
            raise storage_rec.StorageUnavailable(f'BackupStorage "{name}" is not in namespace {ns}')
        target = storage_rec.target_for(self.kube, ns, storage["spec"])
        body = self.open_store(target).read(result["manifestKey"])
        if hashlib.sha256(body).hexdigest() != result.get("manifestSha256"):
            raise IntegrityError(f"manifest {result['manifestKey']} does not match what the agent wrote")

    def retry_sweep(self, backups: Iterable[dict[str, Any]]) -> list[str]:
        """Follow again the finished Jobs of Backups that are not terminal: a verification whose
        next try is due (``nextRetryAt``), or a Job finished ``SETTLE`` ago whose event was lost
        or whose handling failed. Job events are not retried by kopf; this is their retry.
        Returns the Backups followed (``ns/name``)."""
        now = self.clock.now()
        followed = []
        for backup in backups:
            meta, st = backup["metadata"], backup.get("status") or {}
            if (
                st.get("phase") not in (status.Phase.QUEUED, status.Phase.RUNNING)
                or not st.get("jobName")
                or meta.get("deletionTimestamp")
                or (backup.get("spec") or {}).get("type") == UPLOADED
                or ANNOTATION_SYNCED_FROM in (meta.get("annotations") or {})
            ):
                continue
            try:
                job = self.kube.read_job(meta["namespace"], st["jobName"])
                finished = finished_at(job) if job is not None else None
                if job is None or finished is None:
                    continue
                retrying = status.find_condition(backup, status.RETRYING) is not None
                due = (
                    parse_time(st["nextRetryAt"]) if retrying and st.get("nextRetryAt") else finished + SETTLE
                )
                if now < due:
                    continue
                followed.append(f"{meta['namespace']}/{meta['name']}")
                self.sync_from_job(backup, job)
            except (Retry, status.StatusConflict) as e:
                log.info("backup %s/%s: %s", meta["namespace"], meta["name"], e)
            except Exception:
                log.exception("following the Job of backup %s/%s", meta["namespace"], meta["name"])
        return followed


def verify_hold(backup: dict[str, Any], finished: dt.datetime, now: dt.datetime) -> float:
    """Seconds the test hook ``ANNOTATION_TEST_VERIFY_DELAY`` still holds the verification (0
    unless the operator runs with NIGHTJAR_TEST_HOOKS=1)."""
    if os.environ.get("NIGHTJAR_TEST_HOOKS") != "1":
        return 0.0
    raw = (backup["metadata"].get("annotations") or {}).get(ANNOTATION_TEST_VERIFY_DELAY)
    try:
        seconds = float(raw or 0)
    except ValueError:
        return 0.0
    return max(0.0, (finished + dt.timedelta(seconds=seconds) - now).total_seconds())


def span(d: dt.timedelta) -> str:
    s = int(d.total_seconds())
    return f"{s // 3600} h" if s % 3600 == 0 else f"{s // 60} min" if s % 60 == 0 else f"{s} s"
