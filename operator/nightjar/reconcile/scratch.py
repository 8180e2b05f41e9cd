"""The ephemeral scratch PostgreSQL server of a restore drill whose Verification names no scratch
Secret: a Secret with a generated password and a Pod of the scratch image of the Backup's server
major, both owned by the Verification.

:meth:`ScratchServers.ready` makes them (once: names are deterministic, so a restarted operator
finds them) and, once the Pod is Ready, returns the Pod's address: the drill's Job reads the
Secret of the same name like any scratch Secret, and gets the address as a plain value (the
operator may create Secrets, never change one). Until then it raises
:class:`Starting` (a :class:`Retry`, with what happens in its message). :meth:`teardown` deletes
both; the Verification calls it before it becomes terminal, so a terminal drill has no server
left (and a crash in between leaves a non-terminal drill that the next follow ends again).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from nightjar import scratchpod
from nightjar.config import OperatorConfig
from nightjar.domain.retention import parse_time
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.ports import Clock, KubeAPI

log = logging.getLogger("nightjar.verification")

#: How often a starting scratch server is looked at again.
POLL_SECONDS = 2.0


class Starting(Retry):
    """The scratch server is not Ready yet; the message says what happens."""


class ScratchFailed(Exception):
    """No scratch server can serve this drill (no image for its major, a Pod that failed or never
    became Ready); the message says why and what to do."""


def ephemeral(verification: dict[str, Any]) -> bool:
    """The drill runs its own scratch server: its spec names no scratch Secret."""
    spec = verification.get("spec") or {}
    return not (((spec.get("scratch") or {}).get("database") or {}).get("secretRef") or {}).get("name")


def _waiting_reason(pod: dict[str, Any]) -> str:
    """Why the Pod's container does not run (ErrImageNeverPull, CrashLoopBackOff, ...), or ""."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        for key in ("waiting", "terminated"):
            if state.get(key) and state[key].get("reason"):
                msg = state[key].get("message") or ""
                return f"{state[key]['reason']}{': ' + msg[-300:] if msg else ''}"
    return ""


def _ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


class ScratchServers:
    def __init__(self, kube: KubeAPI, config: OperatorConfig, clock: Clock) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock

    def ready(self, verification: dict[str, Any], backup: dict[str, Any]) -> str:
        """The address of this drill's Ready scratch server (its Secret is named
        :func:`scratchpod.scratch_name`); raises
        :class:`Starting` while it starts, :class:`ScratchFailed` when it cannot."""
        meta = verification["metadata"]
        ns, name = meta["namespace"], scratchpod.scratch_name(meta["name"])
        version = str(((backup.get("status") or {}).get("database") or {}).get("serverVersion") or "")
        major = scratchpod.server_major(version)
        if not major:
            raise ScratchFailed(
                f"Backup {backup['metadata']['name']} records no server version, so no scratch server "
                "major can be chosen: name a scratch Secret in spec.scratch.database.secretRef"
            )
        pod = self.kube.read_pod(ns, name)
        if pod is None:
            image = scratchpod.image_for(self.config, major)
            if image is None:
                have = " ".join(self.config.scratch_majors) or "none"
                raise ScratchFailed(
                    f"no scratch server image for PostgreSQL {major} (the Backup's server major; "
                    f"images configured for: {have if self.config.scratch_image else 'none'}): set the "
                    f"chart value {scratchpod.CHART_VALUE} (NIGHTJAR_SCRATCH_IMAGE, NIGHTJAR_SCRATCH_MAJORS) "
                    "or name a scratch Secret in spec.scratch.database.secretRef"
                )
            # The Secret first (the Pod reads its password from it); kept if it exists already.
            self.kube.create_if_absent(scratchpod.build_secret(verification, scratchpod.new_password()))
            if self.kube.create_pod(ns, scratchpod.build_pod(verification, image, major, self.config)):
                log.info("verification %s/%s: scratch server %s (%s) created", ns, meta["name"], name, image)
            raise Starting(f"starting a scratch PostgreSQL {major} server (Pod {name})", POLL_SECONDS)
        st = pod.get("status") or {}
        if st.get("phase") in ("Failed", "Succeeded"):
            raise ScratchFailed(
                f"the scratch PostgreSQL {major} server (Pod {name}) stopped"
                f"{': ' + _waiting_reason(pod) if _waiting_reason(pod) else ''}"
            )
        if not _ready(pod) or not st.get("podIP"):
            created = pod["metadata"].get("creationTimestamp")
            waited = (self.clock.now() - parse_time(created)) if created else dt.timedelta(0)
            why = _waiting_reason(pod)
            if waited.total_seconds() > self.config.scratch_start_timeout_seconds:
                raise ScratchFailed(
                    f"the scratch PostgreSQL {major} server (Pod {name}) was not Ready after "
                    f"{self.config.scratch_start_timeout_seconds} s{': ' + why if why else ''}"
                )
            raise Starting(
                f"starting a scratch PostgreSQL {major} server (Pod {name}{', ' + why if why else ''})",
                POLL_SECONDS,
            )
        return str(st["podIP"])

    def address(self, verification: dict[str, Any]) -> str:
        """The address of the drill's scratch server while its Pod runs; "" when it is gone."""
        meta = verification["metadata"]
        pod = self.kube.read_pod(meta["namespace"], scratchpod.scratch_name(meta["name"]))
        st = (pod or {}).get("status") or {}
        return str(st.get("podIP") or "") if st.get("phase") == "Running" else ""

    def teardown(self, verification: dict[str, Any]) -> None:
        """Delete the drill's scratch server (nothing when it is gone). Its Secret (the password of
        a server that no longer exists) goes with the Verification it is owned by: the operator is
        not granted the deletion of Secrets, which would reach every Secret of the namespace."""
        meta = verification["metadata"]
        ns, name = meta["namespace"], scratchpod.scratch_name(meta["name"])
        if self.kube.delete_pod(ns, name):
            log.info("verification %s/%s: scratch server %s deleted", ns, meta["name"], name)
