"""Operator configuration, read once from the environment. Each attribute says what it does."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nightjar import __version__
from nightjar.domain.retention import parse_period


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError as e:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from e


@dataclass(frozen=True)
class OperatorConfig:
    #: Image the backup and restore Jobs run (`nightjar agent ...`).
    agent_image: str = f"ghcr.io/nightjar-dev/nightjar:{__version__}"
    agent_image_pull_policy: str = "IfNotPresent"
    #: Resources of the agent container.
    agent_cpu_request: str = "100m"
    agent_memory_request: str = "256Mi"
    agent_memory_limit: str = "1Gi"
    #: UID/GID the agent runs as (non-root).
    agent_run_as_user: int = 65532
    #: A backup Job that runs longer than this is stopped and counts as failed.
    job_active_deadline_seconds: int = 6 * 3600
    #: Finished Jobs are removed after this long (the Backup keeps the result).
    job_ttl_seconds_after_finished: int = 24 * 3600
    #: Attempts per backup: Mendix retries a failed nightly two more times.
    attempts: int = 3
    #: How long an agent waits for a database (restarting, failing over: refused, starting up,
    #: too many clients ...) or a bucket (unreachable, 5xx) that does not answer before its
    #: attempt fails; a refusal (bad password, no such database or bucket) is not waited on.
    db_wait_seconds: int = 300
    #: Seconds between scheduler ticks (one sweep over all schedules, not a timer each).
    scheduler_interval_seconds: int = 30
    #: Seconds between garbage-collection sweeps over all Backups.
    gc_interval_seconds: int = 300
    #: Seconds between syncs of a BackupStorage with its bucket (re-created Backups, orphan
    #: sweep); each storage is also synced when it is created and when the operator starts.
    sync_interval_seconds: int = 900
    #: An attempt's objects without a manifest that no Backup stands for are deleted once the
    #: newest of them is this old (a Backup deleted while its Job still wrote).
    orphan_grace_seconds: int = 24 * 3600
    #: Retention of Backups that carry none of their own, by type (OnDemand, Uploaded):
    #: NIGHTJAR_DEFAULT_RETENTION_ONDEMAND / _UPLOADED, e.g. "3mo", "6w", "1y". Scheduled
    #: Backups take their schedule's retention.
    default_retention: dict[str, str] = field(default_factory=dict)
    #: A YAML residency policy (which replica jurisdictions a primary may use); empty: the
    #: built-in Mendix rules (nightjar.domain.residency.DEFAULT_POLICY).
    residency_policy_file: str = ""
    #: Environment passed to every agent container (e.g. NIGHTJAR_PG_BINDIR on the dev stack).
    agent_extra_env: dict[str, str] = field(default_factory=dict)
    #: The ephemeral scratch PostgreSQL server of a restore drill without spec.scratch: its image,
    #: "{major}" standing for the Backup's server major; empty: none (such a drill fails).
    scratch_image: str = ""
    #: The majors that image exists for; empty: every major.
    scratch_majors: tuple[str, ...] = ()
    scratch_image_pull_policy: str = "IfNotPresent"
    #: Resources of the scratch server's container.
    scratch_cpu_request: str = "100m"
    scratch_memory_request: str = "128Mi"
    scratch_memory_limit: str = "1Gi"
    #: A scratch server not Ready this long after its Pod was created fails the drill.
    scratch_start_timeout_seconds: int = 300

    @classmethod
    def from_env(cls) -> OperatorConfig:
        extra = {
            k.removeprefix("NIGHTJAR_AGENT_ENV_"): v
            for k, v in os.environ.items()
            if k.startswith("NIGHTJAR_AGENT_ENV_")
        }
        retention: dict[str, str] = {}
        for backup_type in ("OnDemand", "Uploaded"):
            raw = os.environ.get(f"NIGHTJAR_DEFAULT_RETENTION_{backup_type.upper()}", "").strip()
            if raw:
                try:
                    parse_period(raw)
                except ValueError as e:
                    raise ValueError(f"NIGHTJAR_DEFAULT_RETENTION_{backup_type.upper()}: {e}") from e
                retention[backup_type] = raw
        return cls(
            default_retention=retention,
            residency_policy_file=os.environ.get("NIGHTJAR_RESIDENCY_POLICY_FILE", ""),
            agent_image=os.environ.get("NIGHTJAR_AGENT_IMAGE", cls.agent_image),
            agent_image_pull_policy=os.environ.get(
                "NIGHTJAR_AGENT_IMAGE_PULL_POLICY", cls.agent_image_pull_policy
            ),
            agent_cpu_request=os.environ.get("NIGHTJAR_AGENT_CPU_REQUEST", cls.agent_cpu_request),
            agent_memory_request=os.environ.get("NIGHTJAR_AGENT_MEMORY_REQUEST", cls.agent_memory_request),
            agent_memory_limit=os.environ.get("NIGHTJAR_AGENT_MEMORY_LIMIT", cls.agent_memory_limit),
            agent_run_as_user=_int("NIGHTJAR_AGENT_RUN_AS_USER", cls.agent_run_as_user),
            sync_interval_seconds=_int("NIGHTJAR_SYNC_INTERVAL_SECONDS", cls.sync_interval_seconds),
            orphan_grace_seconds=_int("NIGHTJAR_ORPHAN_GRACE_SECONDS", cls.orphan_grace_seconds),
            job_active_deadline_seconds=_int(
                "NIGHTJAR_JOB_ACTIVE_DEADLINE_SECONDS", cls.job_active_deadline_seconds
            ),
            job_ttl_seconds_after_finished=_int(
                "NIGHTJAR_JOB_TTL_SECONDS", cls.job_ttl_seconds_after_finished
            ),
            scheduler_interval_seconds=_int(
                "NIGHTJAR_SCHEDULER_INTERVAL_SECONDS", cls.scheduler_interval_seconds
            ),
            gc_interval_seconds=_int("NIGHTJAR_GC_INTERVAL_SECONDS", cls.gc_interval_seconds),
            attempts=_int("NIGHTJAR_BACKUP_ATTEMPTS", cls.attempts),
            db_wait_seconds=_int("NIGHTJAR_DB_WAIT_SECONDS", cls.db_wait_seconds),
            agent_extra_env=extra,
            scratch_image=os.environ.get("NIGHTJAR_SCRATCH_IMAGE", cls.scratch_image),
            scratch_majors=tuple(os.environ.get("NIGHTJAR_SCRATCH_MAJORS", "").replace(",", " ").split()),
            scratch_image_pull_policy=os.environ.get(
                "NIGHTJAR_SCRATCH_IMAGE_PULL_POLICY", cls.scratch_image_pull_policy
            ),
            scratch_cpu_request=os.environ.get("NIGHTJAR_SCRATCH_CPU_REQUEST", cls.scratch_cpu_request),
            scratch_memory_request=os.environ.get(
                "NIGHTJAR_SCRATCH_MEMORY_REQUEST", cls.scratch_memory_request
            ),
            scratch_memory_limit=os.environ.get("NIGHTJAR_SCRATCH_MEMORY_LIMIT", cls.scratch_memory_limit),
            scratch_start_timeout_seconds=_int(
                "NIGHTJAR_SCRATCH_START_TIMEOUT_SECONDS", cls.scratch_start_timeout_seconds
            ),
        )
