"""Pure builders for the Jobs the operator runs. No API calls: objects in, a Job manifest out.

Every Job goes through :func:`stamp`, the one place that sets labels, the owner reference,
attempts, deadline, TTL, restart policy and the non-root security context. Credentials reach the
agent only through ``secretKeyRef`` env; user values are separate argv entries, never a shell line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from nightjar.config import OperatorConfig
from nightjar.constants import (
    ANNOTATION_REPLICA,
    API_VERSION,
    LABEL_BACKUP,
    LABEL_MANAGED_BY,
    LABEL_REPLICA,
    LABEL_REPLICATION,
    LABEL_RESTORE,
    LABEL_VERIFICATION,
    MANAGED_BY,
)

FILES_MOUNT = "/nightjar/files"
#: Where the encryption key Secret is mounted in agent Pods.
KEYS_MOUNT = "/nightjar/keys"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TMP_MOUNT = "/tmp"  # noqa: S108 - an emptyDir, the agent's only writable path
DB_KEYS = {
    "uri": "NIGHTJAR_DB_URI",
    "host": "NIGHTJAR_DB_HOST",
    "port": "NIGHTJAR_DB_PORT",
    "dbname": "NIGHTJAR_DB_NAME",
    "user": "NIGHTJAR_DB_USER",
    "password": "NIGHTJAR_DB_PASSWORD",
}


def job_name(kind: str, name: str) -> str:
    """Deterministic, so a retry or a restarted operator finds the Job instead of making another."""
    full = f"nightjar-{kind}-{name}"
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{full[:54].rstrip('-')}-{digest}"


def label_value(name: str) -> str:
    """A name as a label value (at most 63 characters: long ones keep a prefix and a hash)."""
    if len(name) <= 63:
        return name
    return f"{name[:54].rstrip('-.')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class StorageRef:
    """What the agent needs of a BackupStorage (its spec, resolved)."""

    endpoint: str
    bucket: str
    region: str
    prefix: str
    secret_name: str
    access_key_key: str
    secret_key_key: str
    lock_mode: str
    insecure: bool = False
    ca_secret: str = ""
    ca_key: str = ""
    #: spec.encryption.keySecretRef.name: the key-encryption keys ("" = not encrypted).
    key_secret: str = ""

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> StorageRef:
        creds = spec["credentials"]
        tls = spec.get("tls") or {}
        ca = tls.get("caSecret") or {}
        return cls(
            endpoint=spec["endpoint"],
            bucket=spec["bucket"],
            region=spec.get("region") or "us-east-1",
            prefix=spec.get("prefix") or "",
            secret_name=creds["secretName"],
            access_key_key=creds.get("accessKeyIdKey") or "AWS_ACCESS_KEY_ID",
            secret_key_key=creds.get("secretAccessKeyKey") or "AWS_SECRET_ACCESS_KEY",
            lock_mode=(spec.get("objectLock") or {}).get("mode") or "None",
            insecure=bool(tls.get("insecureSkipVerify")),
            ca_secret=ca.get("name", ""),
            ca_key=ca.get("key") or "ca.crt",
            key_secret=((spec.get("encryption") or {}).get("keySecretRef") or {}).get("name", ""),
        )


@dataclass(frozen=True)
class BackupPlan:
    """Everything resolved for one backup's Job."""

    name: str
    namespace: str
    uid: str
    backup_type: str
    contents: str
    source: dict[str, Any]
    source_id: str
    expires: str
    storage: StorageRef
    db_secret: str
    db_keys: tuple[str, ...]
    previous_manifest: str = ""
    model_version: str = ""
    #: What the manifest keeps to re-create the Backup from the bucket: its spec and labels.
    record: dict[str, Any] = field(default_factory=dict)
    #: Count each table's rows into the manifest even when spec.source.rowCounts is not set
    #: (a schedule that verifies its backups asks for it).
    row_counts: bool = False

    @property
    def counts_rows(self) -> bool:
        """Whether the agent counts rows: spec.source.rowCounts, or the plan asks for it."""
        return self.row_counts or self.source.get("rowCounts") is True


def _secret_env(env_name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def stamp(
    job: dict[str, Any], *, owner: dict[str, Any], labels: dict[str, str], config: OperatorConfig
) -> dict[str, Any]:
    """Apply what every Nightjar Job has in common."""
    meta = job.setdefault("metadata", {})
    meta.setdefault("labels", {}).update({LABEL_MANAGED_BY: MANAGED_BY, **labels})
    meta["ownerReferences"] = [{**owner, "controller": True, "blockOwnerDeletion": True}]
    spec = job.setdefault("spec", {})
    spec["backoffLimit"] = config.attempts - 1
    spec["activeDeadlineSeconds"] = config.job_active_deadline_seconds
    spec["ttlSecondsAfterFinished"] = config.job_ttl_seconds_after_finished
    tmpl = spec.setdefault("template", {})
    tmpl.setdefault("metadata", {}).setdefault("labels", {}).update({LABEL_MANAGED_BY: MANAGED_BY, **labels})
    pod = tmpl.setdefault("spec", {})
    pod["restartPolicy"] = "Never"
    pod["automountServiceAccountToken"] = False
    pod["enableServiceLinks"] = False
    uid = config.agent_run_as_user
    pod["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod.setdefault("volumes", []).append({"name": "tmp", "emptyDir": {}})
    for c in pod["containers"]:
        c["image"] = config.agent_image
        c["imagePullPolicy"] = config.agent_image_pull_policy
        c["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        c["resources"] = {
            "requests": {"cpu": config.agent_cpu_request, "memory": config.agent_memory_request},
            "limits": {"memory": config.agent_memory_limit},
        }
        c["terminationMessagePolicy"] = "FallbackToLogsOnError"
        c["terminationMessagePath"] = TERMINATION_MESSAGE_PATH
        c.setdefault("volumeMounts", []).append({"name": "tmp", "mountPath": TMP_MOUNT})
        c.setdefault("env", []).extend(
            [{"name": k, "value": v} for k, v in sorted(config.agent_extra_env.items())]
            + [{"name": "HOME", "value": TMP_MOUNT}]
        )
    return job


@dataclass
class _Wiring:
    """Arguments, env and volumes of an agent container, built up by the steps Jobs share."""

    args: list[str]
    env: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)

    def storage_credentials(self, st: StorageRef, role: str = "") -> None:
        """The BackupStorage's access key pair (by Secret reference) and its CA bundle, if any.

        ``role`` "replica" wires a second storage (a replication's destination) beside the first:
        its own env names, CA mount and ``--replica-ca-file``.
        """
        env = "NIGHTJAR_REPLICA_S3" if role == "replica" else "NIGHTJAR_S3"
        self.env += [
            _secret_env(f"{env}_ACCESS_KEY_ID", st.secret_name, st.access_key_key),
            _secret_env(f"{env}_SECRET_ACCESS_KEY", st.secret_name, st.secret_key_key),
        ]
        if st.ca_secret:
            name = f"{role or 'storage'}-ca"
            self.volumes.append(
                {
                    "name": name,
                    "secret": {"secretName": st.ca_secret, "items": [{"key": st.ca_key, "path": "ca.crt"}]},
                }
            )
            self.mounts.append({"name": name, "mountPath": f"/nightjar/{name}", "readOnly": True})
            self.args += [f"--{role + '-' if role else ''}ca-file", f"/nightjar/{name}/ca.crt"]

    def encryption_keys(self, st: StorageRef) -> None:
        """The storage's key-encryption keys, as a read-only Secret volume (never env, never
        arguments): only backup Jobs and restores in the storage's own namespace get them; a
        replication copies ciphertext and needs none."""
        if not st.key_secret:
            return
        self.volumes.append({"name": "keys", "secret": {"secretName": st.key_secret, "defaultMode": 0o400}})
        self.mounts.append({"name": "keys", "mountPath": KEYS_MOUNT, "readOnly": True})
        self.args += ["--keys-dir", KEYS_MOUNT]
        self.env.append({"name": "NIGHTJAR_KEY_SECRET", "value": st.key_secret})

    def files(self, files: dict[str, Any], read_only: bool) -> None:
        """The app's files: a PVC directory (read-only for a backup) or an S3 prefix."""
        if "persistentVolumeClaim" in files:
            pvc = files["persistentVolumeClaim"]
            claim: dict[str, Any] = {"claimName": pvc["claimName"]}
            mount: dict[str, Any] = {"name": "files", "mountPath": FILES_MOUNT}
            if read_only:
                claim["readOnly"] = mount["readOnly"] = True
            self.volumes.append({"name": "files", "persistentVolumeClaim": claim})
            self.mounts.append(mount)
            sub = (pvc.get("path") or "").strip("/")
            self.args += ["--files-dir", f"{FILES_MOUNT}/{sub}" if sub else FILES_MOUNT]
        elif "s3" in files:
            s3 = files["s3"]
            creds = s3["credentials"]
            self.args += [
                "--files-s3-endpoint",
                s3["endpoint"],
                "--files-s3-bucket",
                s3["bucket"],
                "--files-s3-prefix",
                s3.get("prefix") or "",
                "--files-s3-region",
                s3.get("region") or "us-east-1",
            ]
            self.env += [
                _secret_env(
                    "NIGHTJAR_FILES_S3_ACCESS_KEY_ID",
                    creds["secretName"],
                    creds.get("accessKeyIdKey") or "AWS_ACCESS_KEY_ID",
                ),
                _secret_env(
                    "NIGHTJAR_FILES_S3_SECRET_ACCESS_KEY",
                    creds["secretName"],
                    creds.get("secretAccessKeyKey") or "AWS_SECRET_ACCESS_KEY",
                ),
            ]


def build_backup_job(plan: BackupPlan, config: OperatorConfig) -> dict[str, Any]:
    """The Job that runs ``nightjar agent backup`` for one Backup."""
    st = plan.storage
    args = [
        "agent",
        "backup",
        "--endpoint",
        st.endpoint,
        "--bucket",
        st.bucket,
        "--region",
        st.region,
        "--prefix",
        st.prefix,
        "--lock-mode",
        st.lock_mode,
        "--namespace",
        plan.namespace,
        "--backup-name",
        plan.name,
        "--backup-uid",
        plan.uid,
        "--type",
        plan.backup_type,
        "--source-id",
        plan.source_id,
        "--contents",
        plan.contents,
        "--expires",
        plan.expires,
        # Each attempt (Pod) writes under its own prefix: nothing is ever overwritten.
        "--attempt",
        "$(NIGHTJAR_POD_UID)",
        "--db-wait-seconds",
        str(config.db_wait_seconds),
        "--result-file",
        TERMINATION_MESSAGE_PATH,
    ]
    if st.insecure:
        args.append("--insecure")
    if plan.previous_manifest:
        args += ["--previous-manifest", plan.previous_manifest]
    if plan.model_version:
        args += ["--model-version", plan.model_version]
    if plan.counts_rows:
        args.append("--row-counts")
    if plan.record:
        # `$$`: the kubelet expands $(VAR) in args; a comment is text, never a variable.
        record = json.dumps(plan.record, sort_keys=True, separators=(",", ":")).replace("$", "$$")
        args += ["--record", record]
    pod = _Wiring(args)
    pod.env.append({"name": "NIGHTJAR_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}})
    pod.storage_credentials(st)
    pod.encryption_keys(st)
    pod.env += [_secret_env(DB_KEYS[k], plan.db_secret, k) for k in plan.db_keys if k in DB_KEYS]
    if plan.contents == "Full":
        pod.files(plan.source.get("files") or {}, read_only=True)
    args, env, volumes, mounts = pod.args, pod.env, pod.volumes, pod.mounts
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name("backup", plan.name),
            "namespace": plan.namespace,
            "annotations": {"nightjar.dev/expires-at": plan.expires},
        },
        "spec": {
            "template": {
                "spec": {
                    "containers": [{"name": "agent", "args": args, "env": env, "volumeMounts": mounts}],
                    "volumes": volumes,
                }
            }
        },
    }
    owner = {"apiVersion": API_VERSION, "kind": "Backup", "name": plan.name, "uid": plan.uid}
    return stamp(job, owner=owner, labels={LABEL_BACKUP: plan.name}, config=config)


# --- restore --------------------------------------------------------------------------------

API_DIR = "/nightjar/api"
PRESIGNED_DIR = "/nightjar/presigned"
PRESIGNED_KEY = "urls.json"
PRESIGNED_CA_KEY = "ca.crt"


def restore_access_name(restore_name: str) -> str:
    """Name of the ServiceAccount, Role, RoleBinding and Secret one Restore's Job uses."""
    return job_name("restore", restore_name)


@dataclass(frozen=True)
class RestorePlan:
    """Everything resolved for one restore's Job.

    ``presigned`` is set for a restore from another namespace: the Job then reads the snapshot
    through presigned URLs held in a Secret of its own namespace (one snapshot, for a limited
    time) and never sees the other namespace's storage credentials.
    """

    name: str
    namespace: str
    uid: str
    storage: StorageRef
    manifest_key: str
    manifest_sha256: str
    contents: str
    target: dict[str, Any]
    db_secret: str
    db_keys: tuple[str, ...]
    presigned: bool = False
    #: Set when reading a replica: the primary's prefix, which the manifest's keys carry.
    primary_prefix: str | None = None


#: New Pods a restore Job gets after its Pod was killed (never after the agent reported a failure).
RESTORE_DISRUPTIONS = 4


def build_restore_job(plan: RestorePlan, config: OperatorConfig) -> dict[str, Any]:
    """The Job that runs ``nightjar agent restore`` for one Restore, in the target namespace."""
    st = plan.storage
    access = restore_access_name(plan.name)
    args = [
        "agent",
        "restore",
        "--endpoint",
        st.endpoint,
        "--bucket",
        st.bucket,
        "--region",
        st.region,
        "--prefix",
        st.prefix,
        "--manifest-key",
        plan.manifest_key,
        "--manifest-sha256",
        plan.manifest_sha256,
        "--contents",
        plan.contents,
        "--restore-namespace",
        plan.namespace,
        "--restore-name",
        plan.name,
        "--api-dir",
        API_DIR,
        "--db-wait-seconds",
        str(config.db_wait_seconds),
        "--result-file",
        TERMINATION_MESSAGE_PATH,
    ]
    if st.insecure:
        args.append("--insecure")
    if plan.primary_prefix is not None:
        args += ["--primary-prefix", plan.primary_prefix]
    pod = _Wiring(args)
    pod.env += [_secret_env(DB_KEYS[k], plan.db_secret, k) for k in plan.db_keys if k in DB_KEYS]
    pod.volumes.append(
        {
            "name": "api",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                ]
            },
        }
    )
    pod.mounts.append({"name": "api", "mountPath": API_DIR, "readOnly": True})
    if plan.presigned:
        # The storage's CA (not a secret) travels with the URLs: the other namespace's Secret
        # holding it is out of reach.
        pod.volumes.append({"name": "presigned", "secret": {"secretName": access}})
        pod.mounts.append({"name": "presigned", "mountPath": PRESIGNED_DIR, "readOnly": True})
        pod.args += ["--presigned-file", f"{PRESIGNED_DIR}/{PRESIGNED_KEY}"]
        if st.ca_secret:
            pod.args += ["--ca-file", f"{PRESIGNED_DIR}/{PRESIGNED_CA_KEY}"]
    else:
        pod.storage_credentials(st)
        pod.encryption_keys(st)
    if plan.contents == "Full":
        pod.files(plan.target.get("files") or {}, read_only=False)
    args, env, volumes, mounts = pod.args, pod.env, pod.volumes, pod.mounts
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": access, "namespace": plan.namespace},
        "spec": {
            "template": {
                "spec": {
                    "serviceAccountName": access,
                    "containers": [{"name": "agent", "args": args, "env": env, "volumeMounts": mounts}],
                    "volumes": volumes,
                }
            }
        },
    }
    owner = {"apiVersion": API_VERSION, "kind": "Restore", "name": plan.name, "uid": plan.uid}
    stamp(job, owner=owner, labels={LABEL_RESTORE: plan.name}, config=config)
    # A restore that failed has said what state the target is in (the agent exits 1 with its
    # result): running it again is the user's call (a new Restore), never a silent retry over
    # half-restored data. A Pod that was killed (deleted, evicted, its node lost: no result) is
    # another matter: the restore is idempotent (the database in one transaction, rolled back
    # when its connection dies; the files written exactly), so a new Pod finishes it. So is a
    # failure that changed nothing and may pass (the S3 server or the database connection lost
    # mid-way): the agent exits 75 and a new Pod runs it again.
    job["spec"]["backoffLimit"] = RESTORE_DISRUPTIONS
    job["spec"]["podFailurePolicy"] = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "agent", "operator": "In", "values": [1]}}
        ]
    }
    return job


def build_restore_access(plan: RestorePlan) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding that let the Job report progress to its Restore only."""
    access = restore_access_name(plan.name)
    owner = [
        {
            "apiVersion": API_VERSION,
            "kind": "Restore",
            "name": plan.name,
            "uid": plan.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    meta = {
        "name": access,
        "namespace": plan.namespace,
        "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_RESTORE: plan.name},
        "ownerReferences": owner,
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": dict(meta),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": [
                {
                    "apiGroups": ["nightjar.dev"],
                    "resources": ["restores/status"],
                    "resourceNames": [plan.name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": access},
            "subjects": [{"kind": "ServiceAccount", "name": access, "namespace": plan.namespace}],
        },
    ]


# --- replication ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicatePlan:
    """One copy of one Backup's snapshot from its primary storage into one replica."""

    backup_name: str
    backup_uid: str
    namespace: str
    replica_name: str
    attempt: int
    primary: StorageRef
    replica: StorageRef
    #: The primary's prefix when the snapshot was written (its keys in the manifest carry it).
    primary_prefix: str
    manifest_key: str
    manifest_sha256: str
    retain_until: str


def replicate_job_name(backup_name: str, replica_name: str, attempt: int) -> str:
    """One Job per (Backup, replica, attempt): a retry is a new attempt, a restart finds the Job."""
    digest = hashlib.sha256(f"{backup_name}/{replica_name}".encode()).hexdigest()[:6]
    return job_name("replicate", f"{backup_name}-{digest}-{attempt}")


def build_replicate_job(plan: ReplicatePlan, config: OperatorConfig) -> dict[str, Any]:
    """The Job that runs ``nightjar agent replicate``: primary → replica, streamed and verified."""
    p, r = plan.primary, plan.replica
    args = [
        "agent",
        "replicate",
        "--endpoint",
        p.endpoint,
        "--bucket",
        p.bucket,
        "--region",
        p.region,
        "--prefix",
        plan.primary_prefix,
        "--replica-endpoint",
        r.endpoint,
        "--replica-bucket",
        r.bucket,
        "--replica-region",
        r.region,
        "--replica-prefix",
        r.prefix,
        "--replica-lock-mode",
        r.lock_mode,
        "--manifest-key",
        plan.manifest_key,
        "--manifest-sha256",
        plan.manifest_sha256,
        "--retain-until",
        plan.retain_until,
        "--result-file",
        TERMINATION_MESSAGE_PATH,
    ]
    if p.insecure:
        args.append("--insecure")
    if r.insecure:
        args.append("--replica-insecure")
    pod = _Wiring(args)
    pod.storage_credentials(p)
    pod.storage_credentials(r, role="replica")
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": replicate_job_name(plan.backup_name, plan.replica_name, plan.attempt),
            "namespace": plan.namespace,
            "annotations": {ANNOTATION_REPLICA: plan.replica_name},
        },
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "agent", "args": pod.args, "env": pod.env, "volumeMounts": pod.mounts}
                    ],
                    "volumes": pod.volumes,
                }
            }
        },
    }
    owner = {"apiVersion": API_VERSION, "kind": "Backup", "name": plan.backup_name, "uid": plan.backup_uid}
    job = stamp(
        job,
        owner=owner,
        labels={
            LABEL_REPLICATION: label_value(plan.backup_name),
            LABEL_REPLICA: label_value(plan.replica_name),
        },
        config=config,
    )
    job["spec"]["backoffLimit"] = 0  # the operator retries, as a new attempt, when the replica is back
    return job


# --- restore drill (Verification) -----------------------------------------------------------

SCRATCH_KEYS = {
    "uri": "NIGHTJAR_SCRATCH_URI",
    "host": "NIGHTJAR_SCRATCH_HOST",
    "port": "NIGHTJAR_SCRATCH_PORT",
    "dbname": "NIGHTJAR_SCRATCH_NAME",
    "user": "NIGHTJAR_SCRATCH_USER",
    "password": "NIGHTJAR_SCRATCH_PASSWORD",
}


@dataclass(frozen=True)
class VerifyPlan:
    """Everything resolved for one restore drill's Job (in the Backup's namespace)."""

    name: str
    namespace: str
    uid: str
    backup_name: str
    storage: StorageRef
    manifest_key: str
    manifest_sha256: str
    #: The scratch server's Secret and the keys it has (only those are wired: a missing key
    #: would keep the Pod from starting; the agent says which are missing instead).
    scratch_secret: str
    scratch_keys: tuple[str, ...]
    #: The address of the drill's ephemeral scratch server (its Pod's IP), handed to the agent as
    #: plain environment: the operator writes no Secret it did not create whole.
    scratch_host: str = ""
    #: The Backup's contents: a DatabaseOnly snapshot has no files to read back.
    contents: str = "Full"
    #: Wire the projected token so the agent reports progress (the caller made the access
    #: objects, :func:`build_verify_access`).
    report_progress: bool = False

    @classmethod
    def of(
        cls,
        verification: dict[str, Any],
        backup: dict[str, Any],
        storage: dict[str, Any],
        scratch_keys: tuple[str, ...],
        *,
        report_progress: bool = False,
        scratch_secret: str = "",
        scratch_host: str = "",
    ) -> VerifyPlan:
        """From the Verification, its Completed Backup, the Backup's BackupStorage and the keys of
        the scratch Secret (the reconciler checked they exist): ``scratch_secret``, or else the one
        the spec names (a drill without one gets the Secret of its ephemeral scratch server)."""
        meta, spec = verification["metadata"], verification["spec"]
        bst = backup.get("status") or {}
        stored = bst.get("storage") or {}
        scratch = ((spec.get("scratch") or {}).get("database") or {}).get("secretRef") or {}
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid", ""),
            backup_name=spec["backupName"],
            storage=StorageRef.from_spec(storage["spec"]),
            manifest_key=stored["manifestKey"],
            manifest_sha256=stored.get("manifestSha256") or "",
            scratch_secret=scratch_secret or scratch.get("name", ""),
            scratch_keys=tuple(scratch_keys),
            scratch_host=scratch_host,
            contents=(backup.get("spec") or {}).get("contents") or "Full",
            report_progress=report_progress,
        )


def _scratch_env(plan: VerifyPlan) -> list[dict[str, Any]]:
    """The scratch server's settings: from its Secret's keys, the address of an ephemeral one as
    a value."""
    env: list[dict[str, Any]] = [{"name": "NIGHTJAR_SCRATCH_SECRET", "value": plan.scratch_secret}]
    keys = [k for k in plan.scratch_keys if k in SCRATCH_KEYS and not (plan.scratch_host and k == "host")]
    env += [_secret_env(SCRATCH_KEYS[k], plan.scratch_secret, k) for k in keys]
    if plan.scratch_host:
        env.append({"name": SCRATCH_KEYS["host"], "value": plan.scratch_host})
    return env


def verify_access_name(verification_name: str) -> str:
    """Name of the Job and of the ServiceAccount, Role and RoleBinding one Verification uses."""
    return job_name("verify", verification_name)


def build_verify_job(plan: VerifyPlan, config: OperatorConfig) -> dict[str, Any]:
    """The Job that runs ``nightjar agent verify`` for one Verification (one attempt: a drill
    that failed has said why; a new drill is a new Verification)."""
    st = plan.storage
    name = verify_access_name(plan.name)
    args = [
        "agent",
        "verify",
        "--endpoint",
        st.endpoint,
        "--bucket",
        st.bucket,
        "--region",
        st.region,
        "--prefix",
        st.prefix,
        "--manifest-key",
        plan.manifest_key,
        "--manifest-sha256",
        plan.manifest_sha256,
        # Each attempt (Pod) restores into a database of its own: nightjar_verify_<pod uid>.
        "--drill-id",
        "$(NIGHTJAR_POD_UID)",
        "--result-file",
        TERMINATION_MESSAGE_PATH,
    ]
    if st.insecure:
        args.append("--insecure")
    if plan.contents != "Full":
        args.append("--database-only")
    pod = _Wiring(args)
    pod.env.append({"name": "NIGHTJAR_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}})
    pod.env += _scratch_env(plan)
    pod.storage_credentials(st)
    pod.encryption_keys(st)
    pod_spec: dict[str, Any] = {}
    if plan.report_progress:
        pod.volumes.append(_api_volume())
        pod.mounts.append({"name": "api", "mountPath": API_DIR, "readOnly": True})
        pod.args += [
            "--verification-namespace",
            plan.namespace,
            "--verification-name",
            plan.name,
            "--api-dir",
            API_DIR,
        ]
        pod_spec["serviceAccountName"] = name
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": plan.namespace},
        "spec": {
            "template": {
                "spec": {
                    **pod_spec,
                    "containers": [
                        {"name": "agent", "args": pod.args, "env": pod.env, "volumeMounts": pod.mounts}
                    ],
                    "volumes": pod.volumes,
                }
            }
        },
    }
    owner = {"apiVersion": API_VERSION, "kind": "Verification", "name": plan.name, "uid": plan.uid}
    stamp(
        job,
        owner=owner,
        labels={LABEL_VERIFICATION: label_value(plan.name), LABEL_BACKUP: label_value(plan.backup_name)},
        config=config,
    )
    job["spec"]["backoffLimit"] = 0
    return job


def _api_volume() -> dict[str, Any]:
    """A short-lived token of the Job's own ServiceAccount and the cluster's CA, projected."""
    return {
        "name": "api",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            ]
        },
    }


def build_verify_access(plan: VerifyPlan) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding that let the drill's Job report progress to its own
    Verification only (``verifications/status`` of that one name)."""
    access = verify_access_name(plan.name)
    meta = {
        "name": access,
        "namespace": plan.namespace,
        "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_VERIFICATION: label_value(plan.name)},
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": "Verification",
                "name": plan.name,
                "uid": plan.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": dict(meta),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": [
                {
                    "apiGroups": ["nightjar.dev"],
                    "resources": ["verifications/status"],
                    "resourceNames": [plan.name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": access},
            "subjects": [{"kind": "ServiceAccount", "name": access, "namespace": plan.namespace}],
        },
    ]


def build_verify_cleanup_job(
    plan: VerifyPlan, drill_ids: list[str], config: OperatorConfig
) -> dict[str, Any]:
    """The Job that runs ``nightjar agent verify-cleanup``: drops the temporary databases of a
    Verification's drills that ended without dropping their own (``drill_ids``: their Pods'
    uids). It gets the scratch Secret only; retried like a backup (a drop is idempotent)."""
    args = ["agent", "verify-cleanup", "--result-file", TERMINATION_MESSAGE_PATH]
    for drill_id in drill_ids:
        args += ["--drill-id", drill_id]
    env = _scratch_env(plan)
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name("verify-cleanup", plan.name), "namespace": plan.namespace},
        "spec": {"template": {"spec": {"containers": [{"name": "agent", "args": args, "env": env}]}}},
    }
    owner = {"apiVersion": API_VERSION, "kind": "Verification", "name": plan.name, "uid": plan.uid}
    return stamp(job, owner=owner, labels={LABEL_VERIFICATION: label_value(plan.name)}, config=config)
