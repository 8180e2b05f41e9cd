"""A dynamic provisioner of local volumes for the local stack: TEST/DEV ONLY.

The stack offers the default StorageClass ``nightjar-local`` (provisioner ``nightjar.dev/local``,
``volumeBindingMode: Immediate`` because the stack has no scheduler to wait for, reclaim policy
Delete). ``up`` runs :func:`run` as its own process (``python -m nightjar.devstack provision``);
it makes the class, then watches the PersistentVolumeClaims of that class (a claim without a
class gets it from the API server's DefaultStorageClass admission plugin) and the PVs it made:

* a pending claim of the class gets a hostPath PV ``pvc-<claim uid>`` on
  ``<state>/volumes/<namespace>-<claim>-<claim uid>`` with the claim's requested capacity and
  access modes, a ``claimRef`` to exactly that claim (the PV controller then binds the two), and
  ``pv.kubernetes.io/provisioned-by: nightjar.dev/local`` (which tells the PV controller that
  this provisioner, not an in-tree plugin, deletes it);
* a PV of ours that is Released (its claim is gone) loses its directory, then the PV itself.

The directory is made mode 0777, as the local-path provisioner does, rather than chowned to one
uid: a hostPath volume gets no fsGroup, and the provisioner cannot know which non-root uid the
Pods that mount it run as (the operator's agent is 65532, an app is anything); without the sticky
bit, so a restore running as one uid may replace what another uid wrote.

Each watch lists once, then watches from the list's resourceVersion, reconnecting from the last
resourceVersion it saw when the server ends the watch; it lists again only after a 410 (history
compacted) or when handling an object failed (each list re-handles everything, idempotently).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes.client.rest import ApiException

log = logging.getLogger("nightjar.devstack.provisioner")

CLASS_NAME = "nightjar-local"
PROVISIONER = "nightjar.dev/local"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
PV_PROTECTION = "kubernetes.io/pv-protection"
VOLUME_MODE = 0o777
WATCH_SECONDS = 300


def storage_class() -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": CLASS_NAME, "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


def volume_dir(volumes: Path, pvc: Any) -> Path:
    m = pvc.metadata
    return volumes / f"{m.namespace}-{m.name}-{m.uid}"


def persistent_volume(volumes: Path, pvc: Any) -> dict[str, Any]:
    """The PV for claim ``pvc``: pre-bound to it by uid, so nothing else can take it."""
    m = pvc.metadata
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{m.uid}", "annotations": {PROVISIONED_BY: PROVISIONER}},
        "spec": {
            "capacity": {"storage": (pvc.spec.resources.requests or {}).get("storage", "1Gi")},
            "accessModes": list(pvc.spec.access_modes or ["ReadWriteOnce"]),
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": CLASS_NAME,
            "volumeMode": pvc.spec.volume_mode or "Filesystem",
            "hostPath": {"path": str(volume_dir(volumes, pvc)), "type": "Directory"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": m.namespace,
                "name": m.name,
                "uid": m.uid,
                "resourceVersion": m.resource_version,
            },
        },
    }


class Provisioner:
    """Provisions and deletes the volumes of class ``nightjar-local`` under ``volumes``."""

    def __init__(self, core: Any, storage: Any, volumes: Path) -> None:
        self.core, self.storage, self.volumes = core, storage, volumes.resolve()

    def ensure_class(self) -> None:
        try:
            self.storage.create_storage_class(storage_class())
            log.info("made StorageClass %s (default, provisioner %s)", CLASS_NAME, PROVISIONER)
        except ApiException as e:
            if e.status != 409:
                raise

    def on_claim(self, pvc: Any) -> None:
        m, spec = pvc.metadata, pvc.spec
        if (
            spec.storage_class_name != CLASS_NAME
            or spec.volume_name
            or m.deletion_timestamp is not None
            or (pvc.status and pvc.status.phase not in (None, "Pending"))
        ):
            return
        if spec.selector is not None or spec.data_source is not None:
            log.warning("claim %s/%s: selector and dataSource are not supported; left", m.namespace, m.name)
            return
        path = volume_dir(self.volumes, pvc)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(VOLUME_MODE)  # mkdir's mode is masked by the umask
        try:
            self.core.create_persistent_volume(persistent_volume(self.volumes, pvc))
        except ApiException as e:
            if e.status != 409:  # made on an earlier event or list: the PV controller binds it
                raise
            return
        log.info("claim %s/%s: made PV pvc-%s on %s", m.namespace, m.name, m.uid, path)

    def on_volume(self, pv: Any) -> None:
        m, spec = pv.metadata, pv.spec
        if (
            (m.annotations or {}).get(PROVISIONED_BY) != PROVISIONER
            or not pv.status
            or pv.status.phase != "Released"
            or spec.persistent_volume_reclaim_policy != "Delete"
            or (m.deletion_timestamp is not None and PV_PROTECTION not in (m.finalizers or []))
        ):
            return  # not ours, in use, kept, or already on its way out
        if m.deletion_timestamp is None:
            if spec.host_path is not None:
                path = Path(spec.host_path.path).resolve()
                if path.parent != self.volumes:
                    log.warning("PV %s: %s is not under %s; directory left", m.name, path, self.volumes)
                else:
                    shutil.rmtree(path, ignore_errors=True)
            try:
                self.core.delete_persistent_volume(m.name)
            except ApiException as e:
                if e.status != 404:
                    raise
                return
            log.info("PV %s released: deleted its directory and the PV", m.name)
        elif PV_PROTECTION in (m.finalizers or []):
            # Released means no claim uses it, which is all the pv-protection controller checks
            # before it takes its finalizer off; the stack may not run that controller.
            # A JSON patch (a dict would be a strategic merge, which only ever adds finalizers).
            at = f"/metadata/finalizers/{m.finalizers.index(PV_PROTECTION)}"
            with contextlib.suppress(ApiException):  # a failed test: the controller was first
                self.core.patch_persistent_volume(
                    m.name, [{"op": "test", "path": at, "value": PV_PROTECTION}, {"op": "remove", "path": at}]
                )

    def watch_claims(self, stop: Callable[[], bool]) -> None:
        watch_forever(self.core.list_persistent_volume_claim_for_all_namespaces, self.on_claim, stop)

    def watch_volumes(self, stop: Callable[[], bool]) -> None:
        watch_forever(self.core.list_persistent_volume, self.on_volume, stop)


def watch_forever(
    lister: Callable[..., Any], handle: Callable[[Any], None], stop: Callable[[], bool]
) -> None:
    """List, handle each object, then watch from the list's resourceVersion and handle each added
    or modified object; reconnect from the last resourceVersion seen. List again after a 410 or a
    failure (with a backoff up to 30 s), never on a timer of its own."""
    from kubernetes import watch

    what = getattr(lister, "__name__", "objects")
    backoff = 1.0
    rv = ""
    while not stop():
        try:
            if not rv:
                listed = lister()
                for obj in listed.items:
                    handle(obj)
                rv = listed.metadata.resource_version
            w = watch.Watch()
            for ev in w.stream(
                lister, resource_version=rv, timeout_seconds=WATCH_SECONDS, allow_watch_bookmarks=True
            ):
                if stop():
                    return
                if ev["type"] in ("ADDED", "MODIFIED"):
                    handle(ev["object"])
                # What the watch saw last, bookmarks included (it raises ERROR events, 410 among them).
                rv = w.resource_version or rv
            backoff = 1.0
        except ApiException as e:
            if e.status == 410:
                log.info("%s: resourceVersion %s too old; listing again", what, rv)
                rv = ""
                continue
            log.warning("%s: %s; listing again in %.0fs", what, e, backoff)
            rv, backoff = "", _pause(backoff, stop)
        except Exception as e:  # the API server restarting, a dropped connection, a bad object
            log.warning("%s: %s: %s; listing again in %.0fs", what, type(e).__name__, e, backoff)
            rv, backoff = "", _pause(backoff, stop)


def _pause(seconds: float, stop: Callable[[], bool]) -> float:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop():
        time.sleep(0.2)
    return min(seconds * 2, 30.0)


def run(kubeconfig: Path, volumes: Path, stop: Callable[[], bool]) -> None:
    """Make the StorageClass, then provision and delete volumes until ``stop()``."""
    from kubernetes import client, config

    api = config.new_client_from_config(str(kubeconfig))
    volumes.mkdir(parents=True, exist_ok=True)
    p = Provisioner(client.CoreV1Api(api), client.StorageV1Api(api), volumes)
    while True:
        try:
            p.ensure_class()
            break
        except Exception as e:  # the API server not ready yet
            log.warning("making StorageClass %s: %s", CLASS_NAME, e)
            _pause(1, stop)
            if stop():
                return
    threads = [
        threading.Thread(target=p.watch_claims, args=(stop,), name="claims", daemon=True),
        threading.Thread(target=p.watch_volumes, args=(stop,), name="volumes", daemon=True),
    ]
    for t in threads:
        t.start()
    log.info("provisioning %s volumes under %s", CLASS_NAME, volumes)
    while not stop() and all(t.is_alive() for t in threads):
        time.sleep(0.5)
