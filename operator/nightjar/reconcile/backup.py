"""Backup: Queued → Running → Completed | Failed, driven by its one Job.

Status is derived from what exists (the Job, its Pods' termination messages, the manifest in
the bucket), so a restarted operator converges instead of duplicating: the Job has a
deterministic name, and a terminal phase is never changed again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar import metrics
from nightjar.config import OperatorConfig
from nightjar.constants import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_SYNCED_FROM,
    FINALIZER,
    GROUP,
    LABEL_FINISHED,
    LABEL_SCHEDULE,
    LABEL_TIER,
    VERSION,
)
from nightjar.domain import residency
from nightjar.domain.retention import default_expiry, format_time, parse_time
from nightjar.jobs import BackupPlan, StorageRef, build_backup_job, job_name
from nightjar.kube import Kube, SecretMissing
from nightjar.reconcile import errors, preflight, replication
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.replication import Replicator
from nightjar.storage import layout
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import Manifest, PublicManifest
from nightjar.storage.objects import Lock, ObjectMissing, ObjectStore, StorageError

log = logging.getLogger("nightjar.backup")

PLURAL = "backups"
TERMINAL = ("Completed", "Failed")


#: How long the deletion of a Backup waits for unreachable storage before letting go.
GIVE_UP = dt.timedelta(minutes=10)
#: How long after its Job finished a Backup keeps retrying the verification of its snapshot
#: while the error is transient (storage unreachable, a Secret not there yet): then Failed.
VERIFY_DEADLINE = dt.timedelta(hours=1)
#: The condition a Backup carries while a transient error is retried; its lastTransitionTime is
#: the time of the last try (the next one is due ``errors.backoff`` after it).
RETRYING = "Retrying"
#: A Job finished this long ago whose Backup is still not terminal (its event was lost, or its
#: handling failed) is followed again by :meth:`BackupReconciler.retry_sweep`.
SETTLE = dt.timedelta(seconds=15)
#: Test hook (only when the operator runs with NIGHTJAR_TEST_HOOKS=1, as the dev stack's does):
#: hold the verification of the snapshot until this many seconds after the Job finished, so a
#: test can stop the S3 server between the agent's last write and the operator's verification.
ANNOTATION_TEST_VERIFY_DELAY = "nightjar.dev/test-verify-delay-seconds"


class Retry(Exception):
    """A precondition does not hold yet; try again after ``delay`` seconds."""

    retryable = True

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class PreflightFailed(Exception):
    """What the Backup needs is missing; the message names it."""

    retryable = True  # retried (a few attempts): it may be there soon


class UploadRefused(Exception):
    """An uploaded snapshot cannot become this Backup, for good; ``reason`` is the condition's."""

    retryable = False

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


#: Backups of this type hold an archive brought in with ``nightjar upload``: no source, no Job.
UPLOADED = "Uploaded"
#: The source id uploads are stored under: ``<prefix>nightjar/v1/<ns>/uploaded/<upload-id>/<snapshot-id>/``.
UPLOADED_SOURCE = "uploaded"
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def upload_prefix(storage_prefix: str, namespace: str, manifest_key: str) -> str | None:
    """The prefix of the upload ``manifest_key`` belongs to, or None unless the key is exactly
    ``<prefix>nightjar/v1/<namespace>/uploaded/<upload-id>/<snapshot-id>/manifest.json``.

    The tenancy rule of uploaded Backups: one may only ever point at its own namespace's uploads,
    never at another namespace's data (nor at a taken snapshot, which its own Backup deletes).
    """
    base = layout.source_prefix(storage_prefix, namespace, UPLOADED_SOURCE)
    if not manifest_key.startswith(base):
        return None
    parts = manifest_key[len(base) :].split("/")
    if len(parts) != 3 or parts[2] != layout.MANIFEST or not all(_ID.match(p) for p in parts[:2]):
        return None
    return f"{base}{parts[0]}/"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _cond(ctype: str, ok: bool, reason: str, message: str, now: dt.datetime) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:1024],
        "lastTransitionTime": format_time(now),
    }


class BackupReconciler:
    def __init__(self, kube: Kube, config: OperatorConfig, replicator: Replicator | None = None) -> None:
        self.kube = kube
        self.config = config
        self.replicator = replicator or Replicator(kube, config, residency.load(config.residency_policy_file))

    def _with_locations(self, backup: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """A Completed status gains its locations: the primary (verified) and each replica
        (Pending), the n/m summary, the Replicated condition and the primary's key prefix."""
        ns = backup["metadata"]["namespace"]
        storage = self.kube.get(storage_rec.PLURAL, ns, backup["spec"]["storageRef"]["name"])
        if storage is None:
            return status
        now = _now()
        checks = replication.check_replicas(self.kube, self.replicator.policy, ns, storage)
        locs = replication.initial_locations(storage, checks, now)
        status["storage"] = {**status.get("storage", {}), "prefix": replication.primary_prefix(status)}
        return {**status, **replication.with_conditions(status, locs, now)}

    def _replicate(self, backup: dict[str, Any]) -> None:
        """Start the copies of a just-Completed Backup (the sweep retries what cannot start)."""
        fresh = self.kube.get(PLURAL, backup["metadata"]["namespace"], backup["metadata"]["name"])
        if fresh is None:
            return
        try:
            self.replicator.start(fresh)
        except Exception:
            log.exception(
                "starting the replication of %s/%s", fresh["metadata"]["namespace"], fresh["metadata"]["name"]
            )

    # --- status --------------------------------------------------------------------------

    def _set(
        self, backup: dict[str, Any], status: dict[str, Any], event: tuple[str, str, str] | None = None
    ) -> bool:
        """Patch status unless the Backup reached a terminal phase meanwhile (then nothing changes).

        The one place a Backup's status, its Events and its metrics change. ``event`` is posted
        only when the write changed something worth saying: a new phase, a new attempt, or a
        write without a phase (the caller decided). A transition is counted in the metrics only
        after the patch (conditional on the resourceVersion read) succeeded, so exactly once.
        Returns False when nothing was written on purpose (terminal, or gone); raises Retry when
        five writes in a row conflicted (409), so a write is never silently lost.
        """
        meta = backup["metadata"]
        for _ in range(5):
            fresh = self.kube.get(PLURAL, meta["namespace"], meta["name"])
            if fresh is None:
                return False
            old = fresh.get("status") or {}
            cur = old.get("phase")
            if cur in TERMINAL:
                return False
            if status.get("phase") == "Queued" and cur:
                return False  # Queued is only ever the first phase: a stale body never moves it back
            try:
                self.kube.patch_status(
                    PLURAL,
                    meta["namespace"],
                    meta["name"],
                    status,
                    resource_version=fresh["metadata"]["resourceVersion"],
                )
            except ApiException as e:
                if e.status == 409:
                    continue
                raise
            new_phase: str | None = status.get("phase")
            new_attempt = "attempts" in status and status["attempts"] != old.get("attempts")
            if event is not None and (new_phase != cur or new_attempt):
                self.kube.event(fresh, *event)
            if new_phase is not None and new_phase != cur:
                metrics.backup_transition(fresh, cur, new_phase, status)
            if new_phase in TERMINAL:
                self.mark_finished(fresh)
            return True
        # Never a lost write: the caller is run again (kopf's retry, or retry_sweep).
        raise Retry(f"the status of Backup {meta['namespace']}/{meta['name']} kept changing (409)", 5)

    def mark_finished(self, backup: dict[str, Any]) -> None:
        """Label a terminal Backup so the kopf layer stops watching it (see LABEL_FINISHED)."""
        meta = backup["metadata"]
        if (meta.get("labels") or {}).get(LABEL_FINISHED) == "true" or meta.get("deletionTimestamp"):
            return
        try:
            self.kube.patch_meta(
                PLURAL, meta["namespace"], meta["name"], {"labels": {LABEL_FINISHED: "true"}}
            )
        except ApiException as e:
            if e.status != 404:
                raise

    # --- entry points ----------------------------------------------------------------------

    def reconcile(self, backup: dict[str, Any]) -> None:
        """Drive one Backup one step further; idempotent. Raises Retry to be called again later."""
        status = backup.get("status") or {}
        if status.get("phase") in TERMINAL:
            self.mark_finished(backup)
            return
        if (backup.get("spec") or {}).get("type") == UPLOADED:
            self.reconcile_uploaded(backup)
            return
        if ANNOTATION_SYNCED_FROM in (backup["metadata"].get("annotations") or {}):
            self.reconcile_synced(backup)
            return
        meta = backup["metadata"]
        ns, name = meta["namespace"], meta["name"]
        backup = self._ensure_expiry(backup)
        if not status.get("phase"):
            expires = backup["metadata"]["annotations"][ANNOTATION_EXPIRES_AT]
            self._set(
                backup,
                {
                    "phase": "Queued",
                    "attempts": 0,
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
        job = self.kube.read_job(ns, job_name("backup", name))
        if job is None:
            self._start(backup)
        else:
            self.sync_from_job(backup, job)

    def _ensure_expiry(self, backup: dict[str, Any]) -> dict[str, Any]:
        meta = backup["metadata"]
        ann = meta.get("annotations") or {}
        if ANNOTATION_EXPIRES_AT in ann:
            return backup
        created = parse_time(meta["creationTimestamp"])
        expires = format_time(
            default_expiry(created, backup["spec"].get("type") or "OnDemand", self.config.default_retention)
        )
        return self.kube.patch_meta(
            PLURAL, meta["namespace"], meta["name"], {"annotations": {ANNOTATION_EXPIRES_AT: expires}}
        )

    def _start(self, backup: dict[str, Any]) -> None:
        status = backup.get("status") or {}
        attempts = int(status.get("attempts") or 0)
        try:
            plan = self.plan(backup)
        except PreflightFailed as e:
            attempts += 1
            if attempts >= self.config.attempts:
                self._fail(backup, str(e), attempts, reason="PreflightFailed")
                return
            delay = 10.0 * 2 ** (attempts - 1)
            self._set(
                backup,
                {"attempts": attempts, "message": f"attempt {attempts} of {self.config.attempts}: {e}"},
                ("Warning", "Retrying", f"{e} (attempt {attempts} of {self.config.attempts}, retrying)"),
            )
            raise Retry(str(e), delay) from e
        job = build_backup_job(plan, self.config)
        created = self.kube.create_job(plan.namespace, job)
        if created:
            log.info("created Job %s/%s", plan.namespace, job["metadata"]["name"])
        self._set(
            backup,
            {
                "jobName": job["metadata"]["name"],
                "modelVersion": plan.model_version,
                "message": "backup Job created",
                "storage": {
                    "storageName": backup["spec"]["storageRef"]["name"],
                    "endpoint": plan.storage.endpoint,
                    "bucket": plan.storage.bucket,
                },
            },
            # Only the create that made the Job says so: a restarted operator finds it there.
            (
                "Normal",
                "JobCreated",
                f"created Job {job['metadata']['name']} ({self.config.attempts} attempts at most)",
            )
            if created
            else None,
        )

    # --- preflight ---------------------------------------------------------------------------

    def plan(self, backup: dict[str, Any]) -> BackupPlan:
        """Resolve everything the Job needs, or say what is missing."""
        meta, spec = backup["metadata"], backup["spec"]
        ns = meta["namespace"]
        storage_name = spec["storageRef"]["name"]
        storage = self.kube.get(storage_rec.PLURAL, ns, storage_name)
        if storage is None:
            raise PreflightFailed(f'BackupStorage "{storage_name}" not found in namespace {ns}')
        ref = StorageRef.from_spec(storage["spec"])
        try:
            self.kube.secret_keys(ns, ref.secret_name, [ref.access_key_key, ref.secret_key_key])
        except SecretMissing as e:
            raise PreflightFailed(f"BackupStorage {storage_name} credentials: {e}") from e
        refusal = replication.residency_refusal(
            replication.check_replicas(self.kube, self.replicator.policy, ns, storage), storage_name
        )
        if refusal:
            raise PreflightFailed(f"BackupStorage {storage_name}: {refusal}")
        try:
            preflight.keyring(self.kube, ns, storage["spec"])
        except preflight.Missing as e:
            raise PreflightFailed(f"BackupStorage {storage_name}: {e}") from e
        db_secret = spec["source"]["database"]["secretRef"]["name"]
        try:
            db_keys = preflight.database_keys(self.kube, ns, db_secret)
        except preflight.Missing as e:
            raise PreflightFailed(f"database: {e}") from e
        if (spec.get("contents") or "Full") == "Full":
            try:
                preflight.files(self.kube, ns, spec["source"].get("files") or {})
            except preflight.Missing as e:
                raise PreflightFailed(f"files: {e}") from e
        model_version = self._model_version(ns, spec["source"].get("app"))
        return BackupPlan(
            name=meta["name"],
            namespace=ns,
            uid=meta["uid"],
            backup_type=spec.get("type") or "OnDemand",
            contents=spec.get("contents") or "Full",
            source=spec["source"],
            source_id=layout.source_id(spec["source"]),
            expires=meta["annotations"][ANNOTATION_EXPIRES_AT],
            storage=ref,
            db_secret=db_secret,
            db_keys=db_keys,
            previous_manifest=self._previous_manifest(backup, storage_name),
            model_version=model_version,
            record={
                "spec": spec,
                "labels": {
                    k: v for k, v in (meta.get("labels") or {}).items() if k in (LABEL_SCHEDULE, LABEL_TIER)
                },
            },
        )

    def _model_version(self, ns: str, app: dict[str, Any] | None) -> str:
        if not app:
            return ""
        obj = self.kube.read_workload(ns, app)
        if obj is None:
            kind = app.get("kind") or "Deployment"
            raise PreflightFailed(f'app: {kind} "{app["name"]}" not found in namespace {ns}')
        ann = obj.metadata.annotations or {}
        labels = obj.metadata.labels or {}
        return str(ann.get(ANNOTATION_MODEL_VERSION) or labels.get("app.kubernetes.io/version") or "")

    def _previous_manifest(self, backup: dict[str, Any], storage_name: str) -> str:
        """The newest Completed snapshot of the same source in the same storage (content to reuse)."""
        sid = layout.source_id(backup["spec"]["source"])
        best: tuple[str, str] | None = None
        for other in self.kube.list_objects(PLURAL, backup["metadata"]["namespace"]):
            st = other.get("status") or {}
            if (
                st.get("phase") == "Completed"
                and st.get("sourceId") == sid
                and other["spec"]["storageRef"]["name"] == storage_name
                and (st.get("storage") or {}).get("manifestKey")
            ):
                cand = (st.get("createdOn") or "", st["storage"]["manifestKey"])
                if best is None or cand > best:
                    best = cand
        return best[1] if best else ""

    # --- following the Job ------------------------------------------------------------------

    def sync_from_job(self, backup: dict[str, Any], job: dict[str, Any]) -> None:
        """Follow the Job (a dict as the API serves it): Running, then Completed or Failed."""
        status = backup.get("status") or {}
        if status.get("phase") in TERMINAL:
            return
        js = job.get("status") or {}
        conds = {c["type"]: c for c in js.get("conditions") or [] if c.get("status") == "True"}
        failed = int(js.get("failed") or 0)
        name = job["metadata"]["name"]
        if "Complete" in conds:
            self._complete(backup, job, attempts=failed + 1)
        elif "Failed" in conds:
            reason = conds["Failed"].get("reason") or "JobFailed"
            message = (
                self._last_failure(backup, name) or conds["Failed"].get("message") or "the backup Job failed"
            )
            if reason == "DeadlineExceeded":
                message = f"the backup ran longer than {self.config.job_active_deadline_seconds}s: {message}"
            self._fail(backup, message, attempts=max(failed, 1), reason=reason)
        elif (
            int(js.get("active") or 0) > 0
            and "FailureTarget" not in conds
            and "SuccessCriteriaMet" not in conds
        ):
            attempt = failed + 1
            if status.get("phase") != "Running" or status.get("attempts") != attempt:
                msg = f"attempt {attempt} of {self.config.attempts} running"
                if failed:
                    last = self._last_failure(backup, name)
                    msg += f" (attempt {failed} failed: {last})" if last else ""
                # A new attempt of a Running backup is a retry; the first Running says Running.
                event = (
                    ("Warning", "Retrying", msg)
                    if status.get("phase") == "Running"
                    else ("Normal", "Running", msg)
                )
                self._set(backup, {"phase": "Running", "attempts": attempt, "message": msg}, event)

    def _last_failure(self, backup: dict[str, Any], job: str) -> str:
        msgs = [
            r.get("error")
            for r in self.kube.job_results(backup["metadata"]["namespace"], job)
            if r.get("error")
        ]
        return str(msgs[-1]) if msgs else ""

    def _complete(self, backup: dict[str, Any], job: dict[str, Any], attempts: int) -> None:
        """The Job succeeded: verify the snapshot it reported and complete the Backup.

        A transient error while verifying (storage unreachable, a 503, a Secret not there yet; see
        :mod:`nightjar.reconcile.errors`) keeps the Backup Running with a message saying so and
        raises Retry, until ``VERIFY_DEADLINE`` after the Job finished; a permanent one (the
        manifest missing or not what the agent wrote, credentials refused) fails it at once.
        """
        finished = job_finished_at(job) or _now()
        hold = _test_verify_hold(backup, finished)
        if hold > 0:
            raise Retry(f"test hook {ANNOTATION_TEST_VERIFY_DELAY}: verification held {hold:.0f} s", hold)
        try:
            results = [
                r
                for r in self.kube.job_results(backup["metadata"]["namespace"], job["metadata"]["name"])
                if "manifestKey" in r
            ]
            if not results:
                self._fail(
                    backup, "the backup Job succeeded but reported no snapshot", attempts, reason="NoResult"
                )
                return
            result = results[-1]
            self._verify_manifest(backup, result)
        except Retry:
            raise
        except Exception as e:
            verdict = errors.classify(e)
            if isinstance(verdict, errors.Permanent):
                self._fail(
                    backup, f"snapshot verification failed: {verdict.message}", attempts, "VerificationFailed"
                )
                return
            self._retry_verification(backup, verdict, finished, attempts)
            return
        now = _now()
        size = int(result.get("sizeUncompressedBytes") or 0)
        files = result.get("files")
        status: dict[str, Any] = {
            "phase": "Completed",
            "snapshotId": result["snapshotId"],
            "createdOn": result["createdOn"],
            "completedOn": format_time(now),
            "sizeUncompressedBytes": size,
            "sizeUncompressedMB": f"{size / 1e6:.2f}",
            "database": result.get("database") or {},
            "files": {"count": files["count"], "bytes": files["bytes"]}
            if files
            else {"count": 0, "bytes": 0},
            "attempts": attempts,
            "message": f"snapshot {result['snapshotId']} stored and verified "
            f"({result.get('objects', 0)} objects)",
            "storage": {
                **((backup.get("status") or {}).get("storage") or {}),
                "manifestKey": result["manifestKey"],
                "manifestSha256": result.get("manifestSha256", ""),
            },
            "conditions": [_cond("Completed", True, "SnapshotVerified", "snapshot stored and verified", now)],
        }
        if self._set(
            backup,
            self._with_locations(backup, status),
            (
                "Normal",
                "Completed",
                f"snapshot {result['snapshotId']} completed, {status['sizeUncompressedMB']} MB",
            ),
        ):
            self._replicate(backup)

    def _retry_verification(
        self, backup: dict[str, Any], verdict: errors.Transient, finished: dt.datetime, attempts: int
    ) -> None:
        """Say why the verification waits and when it is tried again, then raise Retry; past the
        deadline, fail the Backup saying so."""
        now = _now()
        deadline = finished + VERIFY_DEADLINE
        what = _WHAT.get(verdict.reason, "an unexpected error")
        if now >= deadline:
            self._fail(
                backup,
                f"snapshot verification failed: {what} for {_span(VERIFY_DEADLINE)} after the Job "
                f"finished: {verdict.message}",
                attempts,
                reason="VerificationTimedOut",
            )
            return
        delay = errors.backoff((now - finished).total_seconds())
        message = (
            f"{what} while verifying the snapshot: {verdict.message}; retrying in {delay:.0f} s "
            f"(until {format_time(deadline)}, {_span(VERIFY_DEADLINE)} after the Job finished)"
        )
        first = not retrying_condition(backup)
        self._set(
            backup,
            {
                "phase": "Running",
                "attempts": attempts,
                "message": message,
                "conditions": [_cond(RETRYING, True, verdict.reason, message, now)],
            },
        )
        if first:
            self.kube.event(backup, "Warning", "VerificationRetrying", message)
        log.warning("backup %s/%s: %s", backup["metadata"]["namespace"], backup["metadata"]["name"], message)
        raise Retry(message, delay)

    def _verify_manifest(self, backup: dict[str, Any], result: dict[str, Any]) -> None:
        """The manifest the agent reported is in the bucket with the digest it reported."""
        ns = backup["metadata"]["namespace"]
        name = backup["spec"]["storageRef"]["name"]
        storage = self.kube.get(storage_rec.PLURAL, ns, name)
        if storage is None:
            raise storage_rec.StorageUnavailable(f'BackupStorage "{name}" is not in namespace {ns}')
        target = storage_rec.target_for(self.kube, ns, storage["spec"])
        body = storage_rec.store_of(target).read(result["manifestKey"])
        if hashlib.sha256(body).hexdigest() != result.get("manifestSha256"):
            raise IntegrityError(f"manifest {result['manifestKey']} does not match what the agent wrote")

    def retry_sweep(self, backups: Iterable[dict[str, Any]], now: dt.datetime) -> list[str]:
        """Follow again the finished Jobs of Backups that are not terminal: a verification whose
        next try is due (its Retrying condition), or a Job finished ``SETTLE`` ago whose event was
        lost or whose handling failed. Job events are not retried by kopf; this is their retry.
        Returns the Backups followed (``ns/name``)."""
        followed = []
        for backup in backups:
            meta, st = backup["metadata"], backup.get("status") or {}
            ann = meta.get("annotations") or {}
            if (
                st.get("phase") not in ("Queued", "Running")
                or not st.get("jobName")
                or meta.get("deletionTimestamp")
                or (backup.get("spec") or {}).get("type") == UPLOADED
                or ANNOTATION_SYNCED_FROM in ann
            ):
                continue
            try:
                job = self.kube.read_job(meta["namespace"], st["jobName"])
                finished = job_finished_at(job) if job is not None else None
                if job is None or finished is None:
                    continue
                cond = retrying_condition(backup)
                if cond is not None:
                    last = parse_time(cond["lastTransitionTime"])
                    due = last + dt.timedelta(seconds=errors.backoff((last - finished).total_seconds()))
                else:
                    due = finished + SETTLE
                if now < due:
                    continue
                followed.append(f"{meta['namespace']}/{meta['name']}")
                self.sync_from_job(backup, job)
            except Retry as e:
                log.info("backup %s/%s: %s", meta["namespace"], meta["name"], e)
            except Exception:
                log.exception("following the Job of backup %s/%s", meta["namespace"], meta["name"])
        return followed

    def _fail(self, backup: dict[str, Any], message: str, attempts: int, reason: str) -> None:
        now = _now()
        self._set(
            backup,
            {
                "phase": "Failed",
                "attempts": attempts,
                "message": message,
                "conditions": [_cond("Failed", True, reason, message, now)],
            },
            ("Warning", "Failed", message),
        )

    # --- uploaded backups --------------------------------------------------------------------

    def reconcile_uploaded(self, backup: dict[str, Any]) -> None:
        """Adopt a snapshot ``nightjar upload`` stored: check it is this namespace's and intact,
        lock it until the Backup expires, and complete the Backup. No Job: the data is there.

        A problem that may pass (the BackupStorage or its Secret missing, the bucket unreachable)
        is retried like a taken backup's preflight; one that will not (another namespace's key,
        a manifest that does not match, a missing object) fails the Backup at once.
        """
        backup = self._ensure_expiry(backup)
        status = backup.get("status") or {}
        expires = backup["metadata"]["annotations"][ANNOTATION_EXPIRES_AT]
        if not status.get("phase"):
            self._set(
                backup,
                {
                    "phase": "Queued",
                    "attempts": 0,
                    "expiresOn": expires,
                    "sourceId": UPLOADED_SOURCE,
                    "message": "checking the uploaded snapshot",
                },
                ("Normal", "Queued", "uploaded backup queued for verification"),
            )
        attempts = int(status.get("attempts") or 0) + 1
        try:
            done = self._adopt_upload(backup, attempts)
        except UploadRefused as e:
            self._fail(backup, str(e), attempts, reason=e.reason)
            return
        except PreflightFailed as e:
            if attempts >= self.config.attempts:
                self._fail(backup, str(e), attempts, reason="PreflightFailed")
                return
            self._set(
                backup,
                {"attempts": attempts, "message": f"attempt {attempts} of {self.config.attempts}: {e}"},
                ("Warning", "Retrying", f"{e} (attempt {attempts} of {self.config.attempts}, retrying)"),
            )
            raise Retry(str(e), 10.0 * 2 ** (attempts - 1)) from e
        if self._set(
            backup,
            self._with_locations(backup, done),
            (
                "Normal",
                "Completed",
                f"uploaded snapshot {done['snapshotId']}, {done['sizeUncompressedMB']} MB",
            ),
        ):
            self._replicate(backup)

    def _adopt_upload(self, backup: dict[str, Any], attempts: int) -> dict[str, Any]:
        """Check and lock the uploaded snapshot; returns the Completed status."""
        meta, spec = backup["metadata"], backup["spec"]
        ns = meta["namespace"]
        key = (spec.get("upload") or {}).get("manifestKey") or ""
        want_sha = (spec.get("upload") or {}).get("manifestSha256") or ""
        storage_name = spec["storageRef"]["name"]
        storage = self.kube.get(storage_rec.PLURAL, ns, storage_name)
        if storage is None:
            raise PreflightFailed(f'BackupStorage "{storage_name}" not found in namespace {ns}')
        lock_mode = StorageRef.from_spec(storage["spec"]).lock_mode
        refusal = replication.residency_refusal(
            replication.check_replicas(self.kube, self.replicator.policy, ns, storage), storage_name
        )
        if refusal:
            raise UploadRefused(f"BackupStorage {storage_name}: {refusal}", "ResidencyRefused")
        try:
            target = storage_rec.target_for(self.kube, ns, storage["spec"])
        except SecretMissing as e:
            raise PreflightFailed(f"BackupStorage {storage_name} credentials: {e}") from e
        mine = upload_prefix(target.prefix, ns, key)
        if mine is None:
            base = layout.source_prefix(target.prefix, ns, UPLOADED_SOURCE)
            raise UploadRefused(
                f"spec.upload.manifestKey {key!r} is not allowed: an uploaded Backup may only use an "
                f"upload of its own namespace ({base}<upload-id>/<snapshot-id>/{layout.MANIFEST})",
                "NotAllowed",
            )
        other = self._upload_claimed_by(backup, key, older_only=True)
        if other:
            raise UploadRefused(
                f"the uploaded snapshot {key} already belongs to Backup {other}", "AlreadyUsed"
            )
        store = storage_rec.store_of(target)
        try:
            raw = store.read(key)
        except ObjectMissing as e:
            raise UploadRefused(
                f"the uploaded manifest {key} is not in bucket {target.bucket}", "ManifestMissing"
            ) from e
        except StorageError as e:  # names the key: "reading <key>: ..."
            raise PreflightFailed(f"storage: {e}") from e
        except Exception as e:
            raise PreflightFailed(f"storage: reading {key}: {type(e).__name__}: {e}") from e
        if hashlib.sha256(raw).hexdigest() != want_sha:
            raise UploadRefused(
                f"the uploaded manifest {key} does not match spec.upload.manifestSha256", "VerificationFailed"
            )
        try:
            manifest = Manifest.parse(
                raw, preflight.keyring(self.kube, ns, storage["spec"]), f"uploaded manifest {key}"
            )
            objects = {o.key: o.bytes for o in manifest.objects}
            parts = manifest.part_keys()
            files = manifest.files
        except preflight.Missing as e:
            raise PreflightFailed(f"BackupStorage {storage_name}: {e}") from e
        except IntegrityError as e:
            raise UploadRefused(f"{e}", "VerificationFailed") from e
        if manifest.database is None:
            raise UploadRefused(
                f"the uploaded manifest {key} is not a snapshot manifest", "VerificationFailed"
            )
        outside = sorted(k for k in objects if not k.startswith(mine))
        if outside:
            raise UploadRefused(
                f"the uploaded manifest lists {outside[0]}, outside its own upload {mine}: not allowed",
                "NotAllowed",
            )
        if not parts or not parts <= set(objects):
            raise UploadRefused(
                f"the uploaded manifest {key} does not list its own parts", "VerificationFailed"
            )
        _check_objects(store, objects)
        expires = meta["annotations"][ANNOTATION_EXPIRES_AT]
        lock = Lock.of(lock_mode, parse_time(expires))
        if lock is not None:
            for k in [*sorted(objects), key]:
                try:
                    store.extend_retention(k, lock)
                except StorageError as e:  # "setting Object Lock retention on <key>: ..."
                    raise PreflightFailed(f"storage: {e}") from e
        now = _now()
        size = manifest.size_uncompressed
        return {
            "phase": "Completed",
            "snapshotId": manifest.snapshot_id or key.rsplit("/", 2)[-2],
            "createdOn": manifest.created_on or format_time(now),
            "completedOn": format_time(now),
            "expiresOn": expires,
            "modelVersion": manifest.model_version,
            "sizeUncompressedBytes": size,
            "sizeUncompressedMB": f"{size / 1e6:.2f}",
            "database": manifest.database.summary(),
            "files": {"count": files.count, "bytes": files.bytes} if files else {"count": 0, "bytes": 0},
            "attempts": attempts,
            "sourceId": UPLOADED_SOURCE,
            "message": f"uploaded snapshot {manifest.snapshot_id} verified "
            f"({len(objects)} object{'' if len(objects) == 1 else 's'})",
            "storage": {
                "storageName": storage_name,
                "endpoint": target.endpoint,
                "bucket": target.bucket,
                "manifestKey": key,
                "manifestSha256": want_sha,
            },
            "conditions": [_cond("Completed", True, "UploadVerified", "uploaded snapshot verified", now)],
        }

    # --- synced backups (re-created from the bucket) ----------------------------------------

    def reconcile_synced(self, backup: dict[str, Any]) -> None:
        """A Backup storage sync re-created: its snapshot is already in the bucket (the key in
        ``nightjar.dev/synced-from``). Check it is intact and complete the Backup; no Job.

        Retried while the storage cannot be reached; failed at once when the manifest is not
        this namespace's snapshot, does not parse, or lists a missing or short object.
        """
        status = backup.get("status") or {}
        expires = backup["metadata"]["annotations"].get(ANNOTATION_EXPIRES_AT, "")
        if not status.get("phase"):
            self._set(
                backup,
                {
                    "phase": "Queued",
                    "attempts": 0,
                    "expiresOn": expires,
                    "message": "checking the snapshot found in the bucket",
                },
                ("Normal", "Queued", "re-created from the bucket; checking its snapshot"),
            )
        attempts = int(status.get("attempts") or 0) + 1
        try:
            done = self._adopt_synced(backup, attempts)
        except UploadRefused as e:
            self._fail(backup, str(e), attempts, reason=e.reason)
            return
        except PreflightFailed as e:
            self._set(backup, {"attempts": attempts, "message": f"{e}; retrying"})
            raise Retry(str(e), min(300.0, 10.0 * 2 ** min(attempts - 1, 5))) from e
        self._set(
            backup,
            self._with_locations(backup, done),
            ("Normal", "Completed", f"snapshot {done['snapshotId']} found in the bucket and verified"),
        )

    def _adopt_synced(self, backup: dict[str, Any], attempts: int) -> dict[str, Any]:
        meta, spec = backup["metadata"], backup["spec"]
        ns = meta["namespace"]
        key = meta["annotations"][ANNOTATION_SYNCED_FROM]
        storage_name = spec["storageRef"]["name"]
        storage = self.kube.get(storage_rec.PLURAL, ns, storage_name)
        if storage is None:
            raise PreflightFailed(f'BackupStorage "{storage_name}" not found in namespace {ns}')
        try:
            target = storage_rec.target_for(self.kube, ns, storage["spec"])
        except SecretMissing as e:
            raise PreflightFailed(f"BackupStorage {storage_name} credentials: {e}") from e
        where = layout.parse_key(key, target.prefix)
        if where is None or not where.is_manifest or where.source == UPLOADED_SOURCE:
            raise UploadRefused(
                f"{ANNOTATION_SYNCED_FROM} {key!r} is not a snapshot manifest of "
                f"BackupStorage {storage_name}",
                "NotAllowed",
            )
        if where.namespace not in (ns, (storage["spec"].get("sync") or {}).get("fromNamespace")):
            raise UploadRefused(
                f"{key} is a snapshot of namespace {where.namespace}: not one BackupStorage {storage_name} "
                "serves here",
                "NotAllowed",
            )
        other = next(
            (
                b["metadata"]["name"]
                for b in self.kube.list_objects(PLURAL, ns)
                if b["metadata"].get("uid") != meta.get("uid") and snapshot_uid(b) == where.backup_uid
            ),
            "",
        )
        if other:
            # Two Backups must never stand for one snapshot: deleting one would delete the other's.
            raise UploadRefused(f"the snapshot {key} already belongs to Backup {other}", "AlreadyUsed")
        store = storage_rec.store_of(target)
        try:
            raw = store.read(key)
            keyring = preflight.keyring(self.kube, ns, storage["spec"])
            manifest = Manifest.parse(raw, keyring, f"manifest {key}")
        except ObjectMissing as e:
            raise UploadRefused(
                f"the manifest {key} is not in bucket {target.bucket}", "ManifestMissing"
            ) from e
        except preflight.Missing as e:
            raise PreflightFailed(f"BackupStorage {storage_name}: {e}") from e
        except IntegrityError as e:
            raise UploadRefused(f"{e}", "VerificationFailed") from e
        except StorageError as e:
            raise PreflightFailed(f"storage: {e}") from e
        if manifest.database is None:
            raise UploadRefused(f"{key} is not a snapshot manifest", "VerificationFailed")
        _check_objects(store, {o.key: o.bytes for o in manifest.objects})
        now = _now()
        size, files = manifest.size_uncompressed, manifest.files
        return {
            "phase": "Completed",
            "snapshotId": manifest.snapshot_id,
            "createdOn": manifest.created_on,
            "completedOn": format_time(now),
            "expiresOn": manifest.expires_on,
            "modelVersion": manifest.model_version,
            "sizeUncompressedBytes": size,
            "sizeUncompressedMB": f"{size / 1e6:.2f}",
            "database": manifest.database.summary(),
            "files": {"count": files.count, "bytes": files.bytes} if files else {"count": 0, "bytes": 0},
            "attempts": attempts,
            "sourceId": where.source,
            "message": f"snapshot {manifest.snapshot_id} found in the bucket and verified "
            f"({len(manifest.objects)} objects)",
            "storage": {
                "storageName": storage_name,
                "endpoint": target.endpoint,
                "bucket": target.bucket,
                "manifestKey": key,
                "manifestSha256": hashlib.sha256(raw).hexdigest(),
            },
            "conditions": [_cond("Completed", True, "SyncedFromStorage", "snapshot found and verified", now)],
        }

    def _upload_claimed_by(self, backup: dict[str, Any], key: str, older_only: bool) -> str:
        """Another live Backup of the namespace pointing at the same upload (the older one owns
        it), or "". Two Backups must never own one upload: deleting one would delete the other's."""
        meta = backup["metadata"]
        me = (meta.get("creationTimestamp") or "", meta["name"])
        for other in self.kube.list_objects(PLURAL, meta["namespace"]):
            om = other["metadata"]
            if (
                om.get("uid") == meta.get("uid")
                or om.get("deletionTimestamp")
                or ((other.get("spec") or {}).get("upload") or {}).get("manifestKey") != key
            ):
                continue
            if not older_only or (om.get("creationTimestamp") or "", om["name"]) < me:
                return str(om["name"])
        return ""

    def finish_deletion(self, backup: dict[str, Any], give_up_after: dt.timedelta | None = None) -> bool:
        """Delete the stored objects and drop our finalizer: the deletion path of finished Backups
        (which kopf no longer watches) and of deletions kopf never got to.

        When the storage stays unreachable for ``give_up_after`` (default ``GIVE_UP``) since the
        deletion was asked for, say so in an Event and let the Backup go: a lost bucket never
        blocks its deletion forever.
        """
        meta = backup["metadata"]
        try:
            summary = self.delete_stored(backup)
        except Retry as e:
            since = parse_time(meta["deletionTimestamp"]) if meta.get("deletionTimestamp") else _now()
            if _now() - since < (give_up_after or GIVE_UP):
                log.warning("deleting %s/%s: %s; will retry", meta["namespace"], meta["name"], e)
                return False
            self.kube.event(
                backup,
                "Warning",
                "StorageUnreachable",
                f"stored objects were not deleted within {give_up_after or GIVE_UP}: {e}",
            )
            summary = f"gave up on the stored objects: {e}"
        finalizers = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        try:
            self.kube.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}},
            )
        except ApiException as e:
            if e.status in (404, 409):
                return False  # gone, or changed under us: the next sweep looks again
            raise
        log.info("finished the stuck deletion of %s/%s: %s", meta["namespace"], meta["name"], summary)
        return True

    # --- deletion ------------------------------------------------------------------------------

    def delete_stored(self, backup: dict[str, Any]) -> str:
        """Delete the Backup's objects in every location (the primary, then each replica);
        content other live snapshots still use stays.

        Returns a summary. Raises Retry when a storage cannot be reached (the caller gives up
        after a few tries, so a lost bucket never blocks deletion forever).
        """
        meta, spec = backup["metadata"], backup["spec"]
        ns = meta["namespace"]
        st = backup.get("status") or {}
        if self.kube.namespace_terminating(ns):
            # `kubectl delete namespace` is not a request to delete the backups: they are what
            # brings the namespace back. The snapshot stays until its own expiry (in its manifest).
            expires = (meta.get("annotations") or {}).get(ANNOTATION_EXPIRES_AT) or "its expiry"
            return f"namespace {ns} is being deleted: kept the stored snapshot until {expires}"
        primary = spec["storageRef"]["name"]
        written = [
            loc
            for loc in st.get("locations") or []
            if loc.get("role") == "Replica" and (loc.get("state") == "Replicated" or loc.get("attempts"))
        ]
        for loc in written:  # a copy still running would write after the delete: wait for it
            job = self.kube.read_job(ns, loc["jobName"]) if loc.get("jobName") else None
            js = (job or {}).get("status") or {}
            if job is not None and not (js.get("succeeded") or js.get("failed")):
                raise Retry(f"a copy into replica {loc['storage']} is running; deleting when it ends", 15)
        replicas = [loc["storage"] for loc in written]
        primary_prefix = replication.primary_prefix(st) if st.get("storage") else None
        done = []
        for name in [primary, *replicas]:
            storage = self.kube.get(storage_rec.PLURAL, ns, name)
            if storage is None:
                done.append(f'BackupStorage "{name}" is gone; nothing to delete there')
                continue
            try:
                target = storage_rec.target_for(self.kube, ns, storage["spec"])
            except SecretMissing as e:
                raise Retry(f"cannot delete stored objects in {name}: {e}", 30) from e
            where = "" if name == primary else name
            done.append(
                self._delete_in(backup, storage_rec.store_of(target), target.prefix, where, primary_prefix)
            )
        return "; ".join(done) if len(done) > 1 else done[0]

    def _delete_in(
        self,
        backup: dict[str, Any],
        store: ObjectStore,
        prefix: str,
        replica: str,
        primary_prefix: str | None,
    ) -> str:
        """Delete in one location (``prefix``: its storage's). In a replica, keys are the
        primary's under the replica's prefix."""
        meta, spec = backup["metadata"], backup["spec"]

        def here(key: str) -> str:
            return layout.relocate(key, prefix, primary_prefix) if replica else key

        label = f"in replica {replica}: " if replica else ""
        if spec.get("type") == UPLOADED:
            return label + self._delete_upload(backup, store, prefix, here)
        prefixes = snapshot_prefixes(backup, prefix)
        if prefixes is None:
            return label + "never adopted a snapshot from the bucket; nothing deleted"
        mine, source_root = prefixes
        tombstone = json.dumps(
            {"deletedOn": format_time(_now()), "backup": meta["name"], "uid": meta["uid"]}
        ).encode()
        try:
            # A tombstone first: deleted on purpose, so storage sync never brings the Backup back
            # if this deletion stops half way; it goes with the rest when nothing is locked.
            store.put(mine + layout.TOMBSTONE, tombstone, content_type="application/json")
            deleted, doomed, locked = delete_snapshot(store, mine, source_root, prefix if replica else None)
            if any(k.startswith(mine) and layout.is_manifest(k) for k in locked):
                # Object Lock keeps its manifest: the tombstone stays (a new object, not a rewrite).
                store.put(mine + layout.TOMBSTONE, tombstone, content_type="application/json")
        except StorageError as e:
            where = f" in replica {replica}" if replica else ""
            raise Retry(f"deleting stored objects{where}: {e}", 30) from e
        except Exception as e:
            raise Retry(f"deleting stored objects {label}{type(e).__name__}: {e}", 30) from e
        return label + self._deleted(backup, f"deleted {deleted} object versions of {doomed} objects", locked)

    def _delete_upload(
        self,
        backup: dict[str, Any],
        store: ObjectStore,
        storage_prefix: str,
        here: Callable[[str], str] = str,
    ) -> str:
        """An upload shares nothing: its objects are everything under its own upload prefix. A key
        outside this namespace's uploads is never touched, nor one another Backup still uses."""
        meta = backup["metadata"]
        original = (backup["spec"].get("upload") or {}).get("manifestKey") or ""
        try:
            key = here(original)
        except ValueError:
            return "nothing deleted: spec.upload.manifestKey is not an upload of this namespace"
        mine = upload_prefix(storage_prefix, meta["namespace"], key)
        if mine is None:
            return "nothing deleted: spec.upload.manifestKey is not an upload of this namespace"
        other = self._upload_claimed_by(backup, original, older_only=False)
        if other:
            return f"kept the uploaded snapshot: Backup {other} uses it too"
        try:
            deleted, locked = store.delete(mine)
        except StorageError as e:
            raise Retry(f"deleting stored objects: {e}", 30) from e
        except Exception as e:
            raise Retry(f"deleting stored objects: {type(e).__name__}: {e}", 30) from e
        return self._deleted(backup, f"deleted {deleted} object versions of the upload {mine}", locked)

    def _deleted(self, backup: dict[str, Any], msg: str, locked: list[str]) -> str:
        if locked:
            expires = (backup.get("metadata", {}).get("annotations") or {}).get(
                ANNOTATION_EXPIRES_AT, "its expiry"
            )
            self.kube.event(
                backup,
                "Warning",
                "ObjectsLocked",
                f"{len(locked)} objects are under Object Lock and stay until their retention ends "
                f"({expires}); {msg}",
            )
            msg += f"; {len(locked)} locked objects left to expire"
        return msg


#: How a retried verification's message names the kind of transient error.
_WHAT = {
    errors.STORAGE_UNAVAILABLE: "storage unreachable",
    errors.NETWORK: "storage unreachable",
    errors.NOT_THERE_YET: "something it needs is not there (yet)",
    errors.CONFLICT: "the Kubernetes API failed",
    errors.KUBERNETES_UNAVAILABLE: "the Kubernetes API failed",
}


def job_finished_at(job: dict[str, Any]) -> dt.datetime | None:
    """When the Job succeeded or failed for good, or None while it has not."""
    js = job.get("status") or {}
    for c in js.get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            when = js.get("completionTime") or c.get("lastTransitionTime")
            return parse_time(when) if when else _now()
    return None


def retrying_condition(backup: dict[str, Any]) -> dict[str, Any] | None:
    """The Backup's Retrying condition (a transient error being retried), or None."""
    conds = (backup.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == RETRYING and c.get("status") == "True"), None)


def _test_verify_hold(backup: dict[str, Any], finished: dt.datetime) -> float:
    """Seconds the test hook ``ANNOTATION_TEST_VERIFY_DELAY`` still holds the verification (0
    unless the operator runs with NIGHTJAR_TEST_HOOKS=1)."""
    if os.environ.get("NIGHTJAR_TEST_HOOKS") != "1":
        return 0.0
    raw = (backup["metadata"].get("annotations") or {}).get(ANNOTATION_TEST_VERIFY_DELAY)
    try:
        seconds = float(raw or 0)
    except ValueError:
        return 0.0
    return max(0.0, (finished + dt.timedelta(seconds=seconds) - _now()).total_seconds())


def _span(d: dt.timedelta) -> str:
    s = int(d.total_seconds())
    return f"{s // 3600} h" if s % 3600 == 0 else f"{s // 60} min" if s % 60 == 0 else f"{s} s"


def _check_objects(store: ObjectStore, objects: dict[str, int]) -> None:
    """Every object is in the bucket with the size the manifest says."""
    for k, size in sorted(objects.items()):
        try:
            head = store.head(k)
        except StorageError as e:  # "checking <key>: ..."
            raise PreflightFailed(f"storage: {e}") from e
        if head is None:
            raise UploadRefused(f"{k} is missing from the bucket", "VerificationFailed")
        if head.size != size:
            raise UploadRefused(f"{k} has {head.size} bytes, the manifest says {size}", "VerificationFailed")


def snapshot_uid(backup: dict[str, Any]) -> str:
    """The uid under which a Backup's snapshot is stored: its own, or for a synced Backup the
    uid of the Backup that took it (in the manifest key it stands for)."""
    meta = backup["metadata"]
    synced = (meta.get("annotations") or {}).get(ANNOTATION_SYNCED_FROM)
    if synced:
        where = layout.parse_key(synced, synced[: synced.find(layout.ROOT + "/")])
        if where is not None:
            return where.backup_uid
    return str(meta.get("uid") or "")


def adopted(backup: dict[str, Any]) -> bool:
    """A synced Backup the operator verified: its status names the manifest of its annotation
    (only the operator writes status). An annotation anyone could add is never trusted alone."""
    meta = backup["metadata"]
    synced = (meta.get("annotations") or {}).get(ANNOTATION_SYNCED_FROM)
    st = backup.get("status") or {}
    return (
        bool(synced)
        and st.get("phase") == "Completed"
        and (st.get("storage") or {}).get("manifestKey") == synced
    )


def snapshot_prefixes(backup: dict[str, Any], prefix: str) -> tuple[str, str] | None:
    """The Backup's own key prefix in a storage with ``prefix`` and the prefix of its source's
    snapshots (the ones that may share its content). A synced Backup's snapshot was written
    under the uid of the Backup that took it: its keys come from the manifest it stands for,
    once the operator adopted it; before that (or never) it has no keys: None."""
    meta = backup["metadata"]
    synced = (meta.get("annotations") or {}).get(ANNOTATION_SYNCED_FROM)
    if synced:
        where = layout.parse_key(layout.relocate(synced, prefix), prefix) if adopted(backup) else None
        if where is None:
            return None
        return where.backup_prefix, where.source_prefix
    sid = layout.source_id(backup["spec"]["source"])
    ns = meta["namespace"]
    return layout.backup_prefix(prefix, ns, sid, meta["uid"]), layout.source_prefix(prefix, ns, sid)


def delete_snapshot(
    store: ObjectStore, mine: str, source_root: str, replica_prefix: str | None = None
) -> tuple[int, int, list[str]]:
    """Delete everything under ``mine`` (every attempt of one Backup) and the objects its
    manifests list, except what another snapshot of the source (under ``source_root``) lists.
    In a replica (``replica_prefix``) manifests name the primary's keys: they are relocated.

    Returns (object versions deleted, objects to delete, keys Object Lock kept).
    """
    own = {k for k, _ in store.list_versions(mine)}
    referenced: set[str] = set()
    keep: set[str] = set()
    for info in store.list(source_root):
        if not layout.is_manifest(info.key):
            continue
        try:
            listed = PublicManifest.parse(store.read(info.key), info.key).objects
        except IntegrityError as e:
            if info.key.startswith(mine):
                continue  # my own: only what lies under my prefix goes
            # Another snapshot's manifest this operator cannot read (damaged, or of a newer
            # format): what it shares is unknown, so nothing is deleted.
            raise IntegrityError(f"cannot tell what {info.key} shares ({e}); nothing deleted") from e
        objs = {
            layout.relocate(o.key, replica_prefix) if replica_prefix is not None else o.key for o in listed
        }
        if info.key.startswith(mine):
            referenced |= objs
        else:
            keep |= objs
    doomed = sorted((own | referenced) - keep)
    deleted, locked = store.delete(doomed)
    return deleted, len(doomed), locked


def watch_finished_deletions(
    kube: Kube, reconciler: BackupReconciler, stop: threading.Event, namespace: str | None = None
) -> None:
    """Delete the stored objects of finished Backups being deleted (kopf does not watch them).

    One watch (cluster-wide, or of ``namespace``) filtered by ``LABEL_FINISHED`` on the server;
    nothing is kept per object, so memory does not grow with the number of Backups. What fails
    here is retried on the object's next event and by the GC sweep.
    """
    from kubernetes import watch

    # The bound methods themselves (not partials): the watch reads their return type.
    lister, args = (
        (kube.custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, PLURAL))
        if namespace
        else (kube.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL))
    )
    rv = ""
    while not stop.is_set():
        w = watch.Watch()
        try:
            for ev in w.stream(
                lister,
                *args,
                label_selector=f"{LABEL_FINISHED}=true",
                resource_version=rv or None,
                timeout_seconds=300,
                allow_watch_bookmarks=True,
            ):
                obj = ev["object"]
                rv = obj.get("metadata", {}).get("resourceVersion", rv)
                if stop.is_set():
                    break
                meta = obj.get("metadata", {})
                if (
                    ev["type"] in ("ADDED", "MODIFIED")
                    and meta.get("deletionTimestamp")
                    and FINALIZER in (meta.get("finalizers") or [])
                ):
                    try:
                        reconciler.finish_deletion(obj)
                    except Exception:
                        log.exception(
                            "deleting finished backup %s/%s", meta.get("namespace"), meta.get("name")
                        )
        except ApiException as e:
            if e.status == 410:
                rv = ""  # too old: start over with a fresh listing
                continue
            log.warning("watch of finished backups failed: %s; retrying", e.reason)
            stop.wait(2)
        except Exception:
            log.exception("watch of finished backups failed; retrying")
            rv = ""
            stop.wait(2)
