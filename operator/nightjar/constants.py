"""API group, label and annotation keys, finalizer: the names Nightjar puts on objects, in one place."""

from __future__ import annotations

GROUP = "nightjar.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: Finalizer on Backups: deleting one first deletes its stored objects.
FINALIZER = f"{GROUP}/finalizer"
#: Prefix kopf uses for its own bookkeeping annotations on our objects.
KOPF_PERSISTENCE_PREFIX = f"kopf.{GROUP}"

#: RFC 3339 UTC instant after which garbage collection deletes a Backup.
ANNOTATION_EXPIRES_AT = f"{GROUP}/expires-at"
#: "true" pins a Backup: garbage collection never deletes it.
ANNOTATION_KEEP = f"{GROUP}/keep"
#: The app's model version, read from its workload (falls back to app.kubernetes.io/version).
ANNOTATION_MODEL_VERSION = f"{GROUP}/model-version"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_BACKUP = f"{GROUP}/backup"
LABEL_SCHEDULE = f"{GROUP}/schedule"
#: A scheduled Backup's tier (Nightly, Weekly, Monthly).
LABEL_TIER = f"{GROUP}/tier"
#: "true" on a Backup that storage sync re-created from the bucket (its snapshot was already there).
LABEL_SYNCED = f"{GROUP}/synced"
#: On a synced Backup: the manifest key of the snapshot it stands for (its data, never re-taken).
ANNOTATION_SYNCED_FROM = f"{GROUP}/synced-from"
LABEL_RESTORE = f"{GROUP}/restore"
#: On a restore drill's Job: the Verification it runs for.
LABEL_VERIFICATION = f"{GROUP}/verification"
#: On a replication Job: the Backup it copies, and the replica BackupStorage it copies into.
LABEL_REPLICATION = f"{GROUP}/replication-of"
LABEL_REPLICA = f"{GROUP}/replica"
#: On a replication Job: the replica BackupStorage's full name (a label value holds 63 characters).
ANNOTATION_REPLICA = f"{GROUP}/replica"
#: "true" once a Backup is Completed or Failed. The kopf layer watches only Backups without it
#: (server-side selector), so 20,000 finished Backups cost the operator no per-object state; a
#: lightweight watch of its own handles their deletion.
LABEL_FINISHED = f"{GROUP}/finished"
MANAGED_BY = "nightjar"

#: The plural (resource) names of the kinds, as the API serves them.
BACKUPS = "backups"
RESTORES = "restores"
SCHEDULES = "backupschedules"
STORAGES = "backupstorages"
VERIFICATIONS = "verifications"
#: Backups of this type hold an archive brought in with ``nightjar upload``: no source, no Job.
UPLOADED = "Uploaded"
#: The source id uploads are stored under: ``<prefix>nightjar/v1/<ns>/uploaded/<upload-id>/<snapshot-id>/``.
UPLOADED_SOURCE = "uploaded"
