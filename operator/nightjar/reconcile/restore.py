"""Restore: Queued → Running → Completed | Failed, driven by its one Job in the target namespace.

Before the Job, :mod:`nightjar.reconcile.restore_plan` checks the Backup, the grant and the
target; refusals end in Failed at once, with a message saying what is wrong and that nothing
was changed. Across namespaces the Job reads through presigned URLs
(:mod:`nightjar.reconcile.restore_access`).

With ``stopApp`` the target workload is scaled to 0 (its replicas recorded in status first, so a
restarted operator scales it back), the Job runs once it has no Pods left, and the workload is
scaled back before the Restore reaches a terminal phase, whatever the outcome.

The Job reports progress itself (see ``agent.progress``); the operator derives everything else
from what exists: the Job, its Pod's termination message, the workload. A finished Job whose
event was lost (or whose handling failed) is followed again by :meth:`RestoreReconciler.retry_sweep`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar import metrics
from nightjar.config import OperatorConfig
from nightjar.constants import RESTORES
from nightjar.domain.retention import format_time, parse_time
from nightjar.jobs import RestorePlan, build_restore_access, build_restore_job, restore_access_name
from nightjar.reconcile import errors, status
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.jobstate import finished_at
from nightjar.reconcile.ports import Clock, KubeAPI, SystemClock
from nightjar.reconcile.restore_access import presigned_secret
from nightjar.reconcile.restore_plan import Refused, RestorePlanner, target_summary
from nightjar.storage.objects import ObjectStore, S3Target

log = logging.getLogger("nightjar.restore")

PLURAL = RESTORES
#: A finished Job whose Restore is still not terminal this long after is followed again.
SETTLE = dt.timedelta(seconds=15)
#: How long a transient error before the Job (storage or API unreachable) is retried: then Failed.
RETRY_DEADLINE = dt.timedelta(minutes=15)


class RestoreReconciler:
    def __init__(
        self,
        kube: KubeAPI,
        config: OperatorConfig,
        clock: Clock | None = None,
        open_store: Callable[[S3Target], ObjectStore] = storage_rec.store_of,
    ) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock or SystemClock()
        self.open_store = open_store
        self.planner = RestorePlanner(kube, open_store)
        self.writer = status.StatusWriter(kube, PLURAL, self.clock)

    # --- status -------------------------------------------------------------------------------

    def _set(
        self, restore: dict[str, Any], change: status.Update, event: tuple[str, str, str] | None = None
    ) -> bool:
        """The one place a Restore's status, its Events and its metrics change: a terminal
        phase never changes (but for ``app``: the app is scaled back after it); a write that
        does not change the phase posts ``event`` only when it sets no phase; a transition is
        counted once, after the conditional write succeeded."""
        done = self.writer.apply(restore, change, allow_on_terminal=("app",))
        if done is None:
            return False
        if event is not None and (done.transition or not done.new_phase):
            self.kube.event(done.before, *event)
        if done.transition:
            metrics.restore_transition(done.before, done.old_phase or None, done.new_phase, done.patch)
        return True

    def _fail(self, restore: dict[str, Any], message: str, reason: str, target_state: str) -> None:
        completed_at = (restore.get("status") or {}).get("completedAt") or format_time(self.clock.now())
        self._set(
            restore,
            status.failed(reason, message, targetState=target_state, completedAt=completed_at),
            ("Warning", "Failed", message),
        )

    # --- entry points -------------------------------------------------------------------------

    def reconcile(self, restore: dict[str, Any]) -> None:
        """Drive one Restore one step further; idempotent. Raises Retry to be called again."""
        meta, spec = restore["metadata"], restore["spec"]
        ns, name = meta["namespace"], meta["name"]
        if status.is_terminal(restore):
            self._restart_app(restore)  # a crash between the two steps is finished here
            return
        contents = spec.get("contents") or "Full"
        if not status.phase_of(restore):
            bns = spec["backupRef"].get("namespace") or ns
            target = target_summary(ns, spec["target"], contents)
            self._set(
                restore,
                status.update(
                    phase=status.Phase.QUEUED.value,
                    backup=f"{bns}/{spec['backupRef']['name']}",
                    target=target,
                    message="checking the backup and the target",
                ),
                (
                    "Normal",
                    "Queued",
                    f"restore of Backup {bns}/{spec['backupRef']['name']} into {target} queued",
                ),
            )
        job = self.kube.read_job(ns, restore_access_name(name))
        if job is not None:
            self.sync_from_job(restore, job)
            return
        try:
            planned = self.planner.plan(restore)
            self._record_plan(restore, planned.source, planned.versions, planned.version_warning)
            if not self._app_stopped(restore):
                # Planning got past any transient error: waiting for Pods to go is not one.
                self._end_retrying(restore)
                raise Retry("waiting for the app to stop", 3)
            self._start(restore, planned.plan, planned.storage_namespace, planned.storage_spec)
        except Refused as e:
            self._restart_app(restore)
            self._fail(restore, f"{e}; nothing was changed", "Refused", "Unchanged")
        except (Retry, status.StatusConflict):
            raise
        except Exception as e:
            self._retry_or_fail(restore, errors.classify(e))

    def _end_retrying(self, restore: dict[str, Any]) -> None:
        if status.find_condition(restore, status.RETRYING) is not None:
            self._set(
                restore, status.Update({"message": "waiting for the app to stop"}, drop=(status.RETRYING,))
            )

    def _retry_or_fail(self, restore: dict[str, Any], verdict: errors.Verdict) -> None:
        """Before its Job: a permanent error fails the Restore (nothing was changed); a transient
        one (storage or API unreachable, a Secret not there yet) is retried with capped backoff
        and said in status, until ``RETRY_DEADLINE`` after the retrying began."""
        if isinstance(verdict, errors.Permanent):
            self._restart_app(restore)
            self._fail(restore, f"{verdict.message}; nothing was changed", verdict.reason, "Unchanged")
            return
        now = self.clock.now()
        cond = status.find_condition(restore, status.RETRYING)
        since = parse_time(cond["lastTransitionTime"]) if cond and cond.get("lastTransitionTime") else now
        if now - since >= RETRY_DEADLINE:
            self._restart_app(restore)
            self._fail(
                restore,
                f"{verdict.message} (still failing {int(RETRY_DEADLINE.total_seconds() // 60)} min after "
                "the first try); nothing was changed",
                verdict.reason,
                "Unchanged",
            )
            return
        delay = errors.backoff((now - since).total_seconds())
        message = f"{verdict.message}; retrying in {delay:.0f} s"
        first = cond is None
        self._set(restore, status.retrying(verdict.reason, message, now + dt.timedelta(seconds=delay)))
        if first:
            self.kube.event(restore, "Warning", "Retrying", message)
        raise Retry(message, delay)

    def _record_plan(
        self, restore: dict[str, Any], source: dict[str, str], versions: dict[str, Any], warning: str
    ) -> None:
        """Where the snapshot is read from (told when it is a replica) and both model versions
        (warned when they differ), written when they change."""
        current = restore.get("status") or {}
        if current.get("source") != source:
            event = (
                (
                    "Warning",
                    "UsingReplica",
                    f"reading the snapshot from replica {source['storage']}: {source['reason']}",
                )
                if source["role"] == "Replica"
                else None
            )
            self._set(restore, status.update(source=source), event)
        if any(current.get(k) != v for k, v in versions.items()):
            change = status.update(**versions)
            if warning:
                mismatch = status.condition("ModelVersionMismatch", True, "ModelVersionMismatch", warning)
                change = status.Update(change.fields, (mismatch,))
            self._set(restore, change, ("Warning", "ModelVersionMismatch", warning) if warning else None)

    # --- the app ------------------------------------------------------------------------------

    def _app_stopped(self, restore: dict[str, Any]) -> bool:
        """Scale the target app to 0 (recording its replicas first); True once it has no Pods."""
        spec = restore["spec"]
        app = spec["target"].get("app")
        if not app or spec.get("stopApp") is False:
            return True
        ns = restore["metadata"]["namespace"]
        obj = self.kube.read_workload(ns, app)
        if obj is None:
            raise Refused(f'target app: {app.get("kind") or "Deployment"} "{app["name"]}" not found')
        st_app = (restore.get("status") or {}).get("app") or {}
        if not st_app.get("stopped"):
            replicas = int(obj.spec.replicas if obj.spec.replicas is not None else 1)
            self._set(
                restore,
                status.update(
                    app={
                        "kind": app.get("kind") or "Deployment",
                        "name": app["name"],
                        "originalReplicas": replicas,
                        "stopped": True,
                        "restarted": False,
                    },
                    message=f"stopping the app ({replicas} replicas → 0) for the restore",
                ),
                ("Normal", "StoppingApp", f"scaling {app['name']} to 0 for the restore"),
            )
        if obj.spec.replicas != 0:
            self.kube.scale_workload(ns, app, 0)
            return False
        return int(obj.status.replicas or 0) == 0

    def restart_app_on_delete(self, restore: dict[str, Any]) -> None:
        if self._scale_back(restore):
            log.info("restore %s/%s deleted; its app was scaled back", *_ident(restore))
            st_app = restore["status"]["app"]
            self.kube.event(
                restore,
                "Normal",
                "RestartedApp",
                f"scaled {st_app['name']} back to {int(st_app.get('originalReplicas') or 0)} replicas: "
                "the Restore was deleted before it finished",
            )

    def _scale_back(self, restore: dict[str, Any]) -> bool:
        st_app = (restore.get("status") or {}).get("app") or {}
        if not st_app.get("stopped") or st_app.get("restarted"):
            return False
        ns = restore["metadata"]["namespace"]
        app = {"kind": st_app.get("kind"), "name": st_app["name"]}
        try:
            self.kube.scale_workload(ns, app, int(st_app.get("originalReplicas") or 0))
        except ApiException as e:
            if e.status != 404:
                raise
        return True

    def _restart_app(self, restore: dict[str, Any]) -> None:
        if not self._scale_back(restore):
            return
        st_app = restore["status"]["app"]
        app = {"kind": st_app.get("kind"), "name": st_app["name"]}
        replicas = int(st_app.get("originalReplicas") or 0)
        self._set(
            restore,
            status.update(app={**st_app, "restarted": True}),
            ("Normal", "RestartedApp", f"scaled {app['name']} back to {replicas} replicas"),
        )

    # --- the Job ------------------------------------------------------------------------------

    def _start(
        self, restore: dict[str, Any], plan: RestorePlan, storage_ns: str, storage_spec: dict[str, Any]
    ) -> None:
        if plan.presigned:
            presigned_secret(self.kube, self.config, plan, storage_ns, storage_spec, self.open_store)
        for obj in build_restore_access(plan):
            self.kube.create_if_absent(obj)
        job = build_restore_job(plan, self.config)
        jname = job["metadata"]["name"]
        event = None
        if self.kube.create_job(plan.namespace, job):  # only the create that made it says so
            log.info("created Job %s/%s", plan.namespace, jname)
            st_app = (restore.get("status") or {}).get("app") or {}
            event = (
                (
                    "Normal",
                    "AppStopped",
                    f"{st_app.get('kind')} {st_app['name']} has no Pods left; created Job {jname}",
                )
                if st_app.get("stopped")
                else ("Normal", "JobCreated", f"created Job {jname}")
            )
        self._set(
            restore,
            status.Update({"jobName": jname, "message": "restore Job created"}, drop=(status.RETRYING,)),
            event,
        )

    def sync_from_job(self, restore: dict[str, Any], job: dict[str, Any]) -> None:
        """Follow the Job: Running, then (app restarted) Completed or Failed."""
        st = restore.get("status") or {}
        if status.is_terminal(restore):
            self._restart_app(restore)
            return
        js = job.get("status") or {}
        conds = {c["type"]: c for c in js.get("conditions") or [] if c.get("status") == "True"}
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        if "Complete" in conds or "Failed" in conds:
            results = self.kube.job_results(ns, name)
            result = results[-1] if results else {}
            if "Failed" in conds and len(results) < int(js.get("failed") or 0):
                result = {}  # the last attempt was killed before it said what it changed: Unknown
            self._restart_app(restore)
            now = self.clock.now()
            if "Complete" in conds and "error" not in result:
                progress = dict(st.get("progress") or {})
                progress.update(percent=100, display="100%", stage="done")
                if "bytesTotal" in progress:
                    progress["bytesDone"] = progress["bytesTotal"]
                    progress["filesDone"] = progress.get("filesTotal", 0)
                files = (result.get("files") or {}).get("files")
                msg = f"restored snapshot {result.get('snapshotId', '')} into {st.get('target', ns)}"
                if files is not None:
                    msg += f" ({files} files)"
                self._set(
                    restore,
                    status.completed(
                        "Restored",
                        msg,
                        snapshotId=result.get("snapshotId", ""),
                        completedAt=format_time(now),
                        progress=progress,
                    ),
                    ("Normal", "Completed", msg),
                )
                return
            reason = conds.get("Failed", {}).get("reason") or "JobFailed"
            error = result.get("error") or conds.get("Failed", {}).get("message") or "the restore Job failed"
            state = result.get("targetState") or "Unknown"
            if reason == "DeadlineExceeded":
                error = (
                    f"the restore ran longer than {self.config.job_active_deadline_seconds}s and was stopped"
                )
                state = "Unknown"
            self._fail(restore, f"{error} (target state: {state})", reason, state)
            return
        if int(js.get("active") or 0) > 0 and st.get("phase") != status.Phase.RUNNING:
            self._set(
                restore,
                status.update(
                    phase=status.Phase.RUNNING.value,
                    startedAt=js.get("startTime") or format_time(self.clock.now()),
                    message="restoring",
                ),
                ("Normal", "Running", f"restore Job {name} running"),
            )

    def retry_sweep(self, restores: Iterable[dict[str, Any]]) -> list[str]:
        """Follow again the Jobs of Restores that are not terminal although their Job finished
        ``SETTLE`` ago (its event was lost, or handling it failed: kopf does not retry Job
        events). Returns the Restores followed (``ns/name``)."""
        now = self.clock.now()
        followed = []
        for restore in restores:
            meta, st = restore["metadata"], restore.get("status") or {}
            if status.is_terminal(restore) or not st.get("jobName") or meta.get("deletionTimestamp"):
                continue
            try:
                job = self.kube.read_job(meta["namespace"], st["jobName"])
                ended = finished_at(job) if job is not None else None
                if job is None or ended is None or now < ended + SETTLE:
                    continue
                followed.append(f"{meta['namespace']}/{meta['name']}")
                self.sync_from_job(restore, job)
            except Exception:
                log.exception("following the Job of restore %s/%s", meta["namespace"], meta["name"])
        return followed


def _ident(restore: dict[str, Any]) -> tuple[str, str]:
    return restore["metadata"]["namespace"], restore["metadata"]["name"]
