"""kopf registration only: each handler is a guard and one call into ``nightjar.reconcile``.

Handlers are synchronous on purpose: kopf runs them in worker threads, so the blocking
Kubernetes and S3 clients never stall its event loop.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

import kopf

from nightjar import __version__, metrics
from nightjar.config import OperatorConfig
from nightjar.constants import (
    BACKUPS,
    FINALIZER,
    GROUP,
    KOPF_PERSISTENCE_PREFIX,
    LABEL_BACKUP,
    LABEL_FINISHED,
    LABEL_REPLICATION,
    LABEL_RESTORE,
    LABEL_VERIFICATION,
    RESTORES,
    SCHEDULES,
    VERIFICATIONS,
    VERSION,
)
from nightjar.domain import residency
from nightjar.kube import Kube, load_client
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.backup import BackupReconciler
from nightjar.reconcile.deletion import watch_finished_deletions
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.gc import gc_sweep
from nightjar.reconcile.ports import list_all
from nightjar.reconcile.replication import Replicator
from nightjar.reconcile.restore import RestoreReconciler
from nightjar.reconcile.schedule import Scheduler
from nightjar.reconcile.status import StatusConflict
from nightjar.reconcile.sync import StorageSync
from nightjar.reconcile.verification import VerificationReconciler

log = logging.getLogger("nightjar")


class _State:
    """Built once at startup (kopf calls startup handlers before any other)."""

    kube: Kube
    backups: BackupReconciler
    restores: RestoreReconciler
    verifications: VerificationReconciler
    scheduler: Scheduler
    replicator: Replicator
    sync: StorageSync
    config: OperatorConfig
    stop: threading.Event


STATE = _State()
DELETE_TRIES = 3
#: The watched namespaces (empty: all), set by the runner before kopf starts.
SCOPE: list[str] = []


def set_scope(namespaces: list[str]) -> None:
    SCOPE[:] = namespaces


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PERSISTENCE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PERSISTENCE_PREFIX)
    settings.posting.level = logging.WARNING  # our reconcilers post their own Events
    settings.watching.server_timeout = 300
    # Our CRDs are installed before the operator (Helm's crds/): no cluster-wide watch of
    # CustomResourceDefinitions, which the least-privilege RBAC does not grant.
    settings.scanning.disabled = True
    settings.execution.max_workers = 8
    # Bounded concurrency: a restart facing 20,000 Backups must not flood the API server.
    settings.batching.worker_limit = 32
    # Finished Backups are not kopf's business: it keeps no state for them (see LABEL_FINISHED).
    settings.watching.label_selectors[(GROUP, BACKUPS)] = f"!{LABEL_FINISHED}"
    config = OperatorConfig.from_env()
    STATE.kube = Kube(load_client(), namespaces=tuple(SCOPE))
    policy = residency.load(config.residency_policy_file)  # a malformed policy stops the start
    STATE.replicator = Replicator(STATE.kube, config, policy)
    STATE.backups = BackupReconciler(STATE.kube, config, STATE.replicator)
    STATE.restores = RestoreReconciler(STATE.kube, config)
    STATE.verifications = VerificationReconciler(STATE.kube, config)
    STATE.scheduler = Scheduler(STATE.kube)
    STATE.sync = StorageSync(STATE.kube, config)
    STATE.config = config
    STATE.stop = threading.Event()
    threading.Thread(target=_periodic, name="nightjar-sweeps", daemon=True).start()
    threading.Thread(target=_replication_sweeps, name="nightjar-replication", daemon=True).start()
    for ns in SCOPE or (None,):
        threading.Thread(
            target=watch_finished_deletions,
            args=(STATE.kube, STATE.backups.deletion, STATE.stop, ns),
            name=f"nightjar-finished-deletions-{ns or 'all'}",
            daemon=True,
        ).start()
    log.info(
        "nightjar operator ready (version %s, agent image %s, namespaces %s)",
        __version__,
        config.agent_image,
        ", ".join(SCOPE) or "all",
    )


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    STATE.stop.set()


def _replication_sweeps() -> None:
    """Every storage re-checked, then the copies that wait for a replica (down, or a failed copy
    due again); on their own clock, so an unreachable bucket never delays the scheduler."""
    while not STATE.stop.wait(STATE.config.gc_interval_seconds):
        try:
            now = dt.datetime.now(dt.UTC)
            storages = list(list_all(STATE.kube, storage_rec.PLURAL))
            storage_rec.sweep(STATE.kube, storages, now, STATE.replicator.policy)
            metrics.storages_seen((s["metadata"]["namespace"], s["metadata"]["name"]) for s in storages)
        except Exception:
            log.exception("storage check sweep failed; the next sweep retries")
        try:
            STATE.sync.sweep(list_all(STATE.kube, storage_rec.PLURAL), dt.datetime.now(dt.UTC))
        except Exception:
            log.exception("storage sync sweep failed; the next sweep retries")
        try:
            finished = list_all(STATE.kube, BACKUPS, f"{LABEL_FINISHED}=true")
            rep = STATE.replicator.sweep(finished)
            if rep.started or rep.extended:
                log.info("replication: started copies of %s; new replicas for %s", rep.started, rep.extended)
        except Exception:
            log.exception("replication sweep failed; the next sweep retries")


def _periodic() -> None:
    """The operator's only clock: a scheduler tick and a GC sweep, each over all objects."""
    next_gc = time.monotonic() + 10
    while not STATE.stop.is_set():
        now = dt.datetime.now(dt.UTC)
        try:
            report = STATE.scheduler.tick(now)
            if report.created or report.skipped or report.missed:
                log.info(
                    "scheduler: %d schedules, created %s, skipped %s, missed %s",
                    report.schedules,
                    report.created,
                    report.skipped,
                    report.missed,
                )
        except Exception:
            log.exception("scheduler tick failed; next tick retries")
        try:
            # Job events are not retried by kopf: a verification to retry, a lost event.
            STATE.backups.retry_sweep(list_all(STATE.kube, BACKUPS, f"!{LABEL_FINISHED}"))
        except Exception:
            log.exception("backup retry sweep failed; the next tick retries")
        try:
            STATE.restores.retry_sweep(list_all(STATE.kube, RESTORES))
        except Exception:
            log.exception("restore retry sweep failed; the next tick retries")
        try:
            STATE.verifications.retry_sweep(list_all(STATE.kube, VERIFICATIONS))
        except Exception:
            log.exception("verification retry sweep failed; the next tick retries")
        if time.monotonic() >= next_gc:
            try:
                started = time.monotonic()
                sweep = gc_sweep(STATE.kube, now, finalize=STATE.backups.finish_deletion)
                log.info(
                    "gc: examined %d backups, deleted %d, deferred %d, finished %d stuck deletions in %.1fs",
                    sweep.examined,
                    len(sweep.deleted),
                    len(sweep.deferred),
                    len(sweep.finalized),
                    time.monotonic() - started,
                )
            except Exception:
                log.exception("gc sweep failed; the next sweep retries")
            next_gc = time.monotonic() + STATE.config.gc_interval_seconds
        STATE.stop.wait(STATE.config.scheduler_interval_seconds)


# --- BackupSchedule ------------------------------------------------------------------------------


@kopf.on.create(GROUP, VERSION, SCHEDULES)
@kopf.on.update(GROUP, VERSION, SCHEDULES, field="spec")
@kopf.on.resume(GROUP, VERSION, SCHEDULES)
def schedule_changed(body: kopf.Body, **_: Any) -> None:
    STATE.scheduler.reconcile_one(_plain(body), dt.datetime.now(dt.UTC))


# --- BackupStorage -----------------------------------------------------------------------------


@kopf.on.create(GROUP, VERSION, storage_rec.PLURAL)
@kopf.on.update(GROUP, VERSION, storage_rec.PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, storage_rec.PLURAL)
def storage_check(body: kopf.Body, **_: Any) -> None:
    now, policy = dt.datetime.now(dt.UTC), STATE.replicator.policy
    storage_rec.reconcile_storage(STATE.kube, dict(body), now, policy)
    storage_rec.reconcile_dependents(STATE.kube, dict(body), now, policy)
    # A new storage (or one the operator resumes) shows what its bucket holds at once.
    STATE.sync.run(_plain(body), now)


# --- Backup --------------------------------------------------------------------------------------


@kopf.on.create(GROUP, VERSION, BACKUPS)
@kopf.on.resume(GROUP, VERSION, BACKUPS)
def backup_reconcile(body: kopf.Body, **_: Any) -> None:
    try:
        STATE.backups.reconcile(_plain(body))
    except (Retry, StatusConflict) as e:
        raise kopf.TemporaryError(str(e), delay=e.delay) from e


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_BACKUP: kopf.PRESENT})
def backup_job_changed(
    body: kopf.Body, type: str | None, **_: Any
) -> None:  # kopf passes the event type as `type`
    backup = _owner(body, type, "Backup", BACKUPS)
    if backup is None:
        return
    try:
        STATE.backups.sync_from_job(backup, _plain(body))
    except (Retry, StatusConflict) as e:  # kopf does not retry event handlers: the retry sweep does
        log.info("backup %s: %s", backup["metadata"]["name"], e)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_REPLICATION: kopf.PRESENT})
def replication_job_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
    done = body.get("status", {}).get("succeeded") or body.get("status", {}).get("failed")
    backup = _owner(body, type, "Backup", BACKUPS) if done else None
    if backup is None:
        return
    STATE.replicator.sync_from_job(backup, _plain(body))


@kopf.on.delete(GROUP, VERSION, BACKUPS, retries=DELETE_TRIES)
def backup_delete(body: kopf.Body, retry: int, **_: Any) -> None:
    backup = _plain(body)
    try:
        summary = STATE.backups.delete_stored(backup)
    except Retry as e:
        if retry + 1 >= DELETE_TRIES:
            # Never block deletion forever on a lost bucket: say what was left, and let go.
            STATE.kube.event(
                backup,
                "Warning",
                "StorageUnreachable",
                f"stored objects were not deleted after {DELETE_TRIES} tries: {e}",
            )
            return
        raise kopf.TemporaryError(str(e), delay=e.delay) from e
    log.info("backup %s/%s deleted: %s", body.metadata.namespace, body.metadata.name, summary)


# --- Restore -------------------------------------------------------------------------------------


@kopf.on.create(GROUP, VERSION, RESTORES)
@kopf.on.resume(GROUP, VERSION, RESTORES)
def restore_reconcile(body: kopf.Body, **_: Any) -> None:
    try:
        STATE.restores.reconcile(_plain(body))
    except (Retry, StatusConflict) as e:
        raise kopf.TemporaryError(str(e), delay=e.delay) from e


@kopf.on.delete(GROUP, VERSION, RESTORES)
def restore_deleted(body: kopf.Body, **_: Any) -> None:
    """A Restore deleted while it runs still gives the app its replicas back."""
    STATE.restores.restart_app_on_delete(_plain(body))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RESTORE: kopf.PRESENT})
def restore_job_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
    restore = _owner(body, type, "Restore", RESTORES)
    if restore is None:
        return
    STATE.restores.sync_from_job(restore, _plain(body))


# --- Verification (restore drill) ---------------------------------------------------------------


@kopf.on.create(GROUP, VERSION, VERIFICATIONS)
@kopf.on.resume(GROUP, VERSION, VERIFICATIONS)
def verification_reconcile(body: kopf.Body, **_: Any) -> None:
    try:
        STATE.verifications.reconcile(_plain(body))
    except (Retry, StatusConflict) as e:
        raise kopf.TemporaryError(str(e), delay=e.delay) from e


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_VERIFICATION: kopf.PRESENT})
def verification_job_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
    verification = _owner(body, type, "Verification", VERIFICATIONS)
    if verification is None:
        return
    try:  # the drill's Job or its cleanup Job: either way the drill's Job is followed
        STATE.verifications.follow(verification)
    except (Retry, StatusConflict) as e:  # the retry sweep follows it again
        log.info("verification %s: %s", verification["metadata"]["name"], e)


def _owner(body: kopf.Body, event_type: str | None, kind: str, plural: str) -> dict[str, Any] | None:
    """The live object of ``kind`` that owns a Job (same uid), or None (gone, or the Job is)."""
    if event_type == "DELETED":
        return None
    owner = next((o for o in body.metadata.get("ownerReferences") or [] if o.get("kind") == kind), None)
    if owner is None:
        return None
    obj = STATE.kube.get(plural, body.metadata.namespace or "", owner["name"])
    if obj is None or obj["metadata"]["uid"] != owner["uid"]:
        return None
    return obj


def _plain(body: kopf.Body) -> dict[str, Any]:
    """A deep, mutable copy of a kopf body."""
    import copy

    return copy.deepcopy(dict(body))
