"""Deleting a Backup deletes its snapshot: in every location (the primary, then each replica),
keeping the content other live snapshots of the source still use, and what Object Lock keeps
until it expires. Deleting a namespace is not a request to delete its backups: they stay.

Deciding *which* Backups go (expiry) is :mod:`nightjar.reconcile.gc`; this module does it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar.constants import (
    ANNOTATION_EXPIRES_AT,
    BACKUPS,
    FINALIZER,
    GROUP,
    LABEL_FINISHED,
    STORAGES,
    UPLOADED,
    VERSION,
)
from nightjar.domain.retention import format_time, parse_time
from nightjar.kube import Kube, SecretMissing
from nightjar.reconcile import replicas
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.adoption import upload_prefix
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.ports import Clock, KubeAPI
from nightjar.reconcile.snapshots import delete_snapshot, snapshot_prefixes
from nightjar.storage import layout
from nightjar.storage.objects import ObjectStore, S3Target, StorageError

log = logging.getLogger("nightjar.backup")

#: How long the deletion of a Backup waits for unreachable storage before letting go.
GIVE_UP = dt.timedelta(minutes=10)


class Deletion:
    def __init__(self, kube: KubeAPI, clock: Clock, open_store: Callable[[S3Target], ObjectStore]) -> None:
        self.kube = kube
        self.clock = clock
        self.open_store = open_store

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
            since = (
                parse_time(meta["deletionTimestamp"]) if meta.get("deletionTimestamp") else self.clock.now()
            )
            if self.clock.now() - since < (give_up_after or GIVE_UP):
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
        if not self.kube.set_finalizers(
            BACKUPS, meta["namespace"], meta["name"], finalizers, meta["resourceVersion"]
        ):
            return False  # gone, or changed under us: the next sweep looks again
        log.info("finished the stuck deletion of %s/%s: %s", meta["namespace"], meta["name"], summary)
        return True

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
        copies = [loc["storage"] for loc in written]
        primary_prefix = replicas.primary_prefix(st) if st.get("storage") else None
        done = []
        for name in [primary, *copies]:
            storage = self.kube.get(STORAGES, ns, name)
            if storage is None:
                done.append(f'BackupStorage "{name}" is gone; nothing to delete there')
                continue
            try:
                target = storage_rec.target_for(self.kube, ns, storage["spec"])
            except SecretMissing as e:
                raise Retry(f"cannot delete stored objects in {name}: {e}", 30) from e
            where = "" if name == primary else name
            done.append(
                self._delete_in(backup, self.open_store(target), target.prefix, where, primary_prefix)
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
        other = layout.parse_key(prefixes[0] + layout.MANIFEST, prefix)
        if (
            other is not None
            and other.namespace != meta["namespace"]
            and not self.kube.namespace_terminating(other.namespace)
        ):
            # Synced from another namespace (spec.sync.fromNamespace) that still exists (or that
            # the operator may not read): a view of its data, never a licence to delete it; that
            # namespace's own Backups and expiry decide. Once it is gone, this Backup owns it.
            return label + f"the snapshot belongs to namespace {other.namespace}, which still exists; kept"
        mine, source_root = prefixes
        tombstone = json.dumps(
            {"deletedOn": format_time(self.clock.now()), "backup": meta["name"], "uid": meta["uid"]}
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
        other = self.claimed_by(backup, original)
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

    def claimed_by(self, backup: dict[str, Any], key: str) -> str:
        """Another live Backup of the namespace pointing at the same upload, or ""."""
        meta = backup["metadata"]
        for other in self.kube.list_objects(BACKUPS, meta["namespace"]):
            om = other["metadata"]
            if (
                om.get("uid") != meta.get("uid")
                and not om.get("deletionTimestamp")
                and ((other.get("spec") or {}).get("upload") or {}).get("manifestKey") == key
            ):
                return str(om["name"])
        return ""


def watch_finished_deletions(
    kube: Kube, deletion: Deletion, stop: threading.Event, namespace: str | None = None
) -> None:
    """Delete the stored objects of finished Backups being deleted (kopf does not watch them).

    One watch (cluster-wide, or of ``namespace``) filtered by ``LABEL_FINISHED`` on the server;
    nothing is kept per object, so memory does not grow with the number of Backups. What fails
    here is retried on the object's next event and by the GC sweep.
    """
    from kubernetes import watch

    # The bound methods themselves (not partials): the watch reads their return type.
    lister, args = (
        (kube.custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, BACKUPS))
        if namespace
        else (kube.custom.list_cluster_custom_object, (GROUP, VERSION, BACKUPS))
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
                        deletion.finish_deletion(obj)
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
