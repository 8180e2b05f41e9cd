"""The one way the reconcilers write status: phases, conditions, and a conflict-safe writer.

- :class:`Phase`: the phases as an enum; :data:`TERMINAL` never change.
- :func:`conditions`: merges new conditions into the old list by type, keeping a condition's
  ``lastTransitionTime`` while its status does not change (Kubernetes' convention), dropping
  the types that no longer apply.
- :class:`Update`, made by :func:`completed`, :func:`failed`, :func:`retrying`, :func:`update`:
  the status change of each outcome, the same for every kind (SetAsCompleted / SetAsFailed in
  CloudNativePG's words), made into a patch against the status the writer reads.
- :class:`StatusWriter`: read the object, let the caller decide the patch from what it read,
  write it conditional on that resourceVersion; on a conflict (409) read and decide again; an
  object gone (404) is None; a write that keeps conflicting raises :class:`StatusConflict`, a
  transient error: nothing is ever silently lost.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar.domain.retention import format_time
from nightjar.reconcile.ports import Clock, KubeAPI, SystemClock


class Phase(StrEnum):
    """The phases of a Backup and of a Restore."""

    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"


TERMINAL = frozenset({Phase.COMPLETED.value, Phase.FAILED.value})

#: The condition an object carries while a transient error is retried.
RETRYING = "Retrying"
COMPLETED = "Completed"
FAILED = "Failed"


def phase_of(obj: dict[str, Any]) -> str:
    return str((obj.get("status") or {}).get("phase") or "")


def is_terminal(obj: dict[str, Any]) -> bool:
    return phase_of(obj) in TERMINAL


def condition(ctype: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    """A condition without its time (:func:`conditions` stamps it)."""
    return {"type": ctype, "status": "True" if ok else "False", "reason": reason, "message": message[:1024]}


def conditions(
    old: dict[str, Any], new: Iterable[dict[str, Any]], now: dt.datetime, drop: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """``old`` status's conditions with ``new`` merged in by type and ``drop``'s types removed.

    A condition whose status is what it was keeps its ``lastTransitionTime``; one that changed
    (or is new) gets ``now``. A merge patch replaces a list whole: this is the whole list.
    """
    dropped = set(drop)
    merged: dict[str, dict[str, Any]] = {
        c["type"]: c for c in old.get("conditions") or [] if c.get("type") not in dropped
    }
    for c in new:
        prev = merged.get(c["type"])
        since = (
            prev.get("lastTransitionTime")
            if prev is not None and prev.get("status") == c["status"] and prev.get("lastTransitionTime")
            else format_time(now)
        )
        merged[c["type"]] = {**c, "lastTransitionTime": since}
    return list(merged.values())


def find_condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    """The object's condition ``ctype`` when it is True, else None."""
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == ctype and c.get("status") == "True"), None)


@dataclass(frozen=True)
class Update:
    """A status change: fields to set, conditions to merge in, condition types to drop. Made
    into a patch against the status the writer reads (:meth:`patch`), so the conditions merge
    with what is there, not with what a stale body said."""

    fields: dict[str, Any]
    add: tuple[dict[str, Any], ...] = ()
    drop: tuple[str, ...] = ()

    @property
    def phase(self) -> str:
        return str(self.fields.get("phase") or "")

    def patch(self, old: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
        out = dict(self.fields)
        if self.add or self.drop:
            out["conditions"] = conditions(old, self.add, now, self.drop)
        if RETRYING in self.drop and "nextRetryAt" in old:
            out["nextRetryAt"] = None  # the retrying is over (a merge patch's null deletes)
        return out


def update(**fields: Any) -> Update:
    return Update(fields)


def completed(reason: str, message: str, **fields: Any) -> Update:
    """Complete an object: phase, message, the Completed condition (a Retrying one is over)."""
    return Update(
        {**fields, "phase": Phase.COMPLETED.value, "message": message},
        (condition(COMPLETED, True, reason, message),),
        (RETRYING, FAILED),
    )


def failed(reason: str, message: str, **fields: Any) -> Update:
    """Fail an object for good: phase, message (naming what is wrong), the Failed condition."""
    return Update(
        {**fields, "phase": Phase.FAILED.value, "message": message},
        (condition(FAILED, True, reason, message),),
        (RETRYING,),
    )


def retrying(reason: str, message: str, next_try: dt.datetime, **fields: Any) -> Update:
    """An object that waits out a transient error: the message says what and when the next try
    is (also in ``nextRetryAt``); the Retrying condition's time is when the retrying began."""
    return Update(
        {**fields, "message": message, "nextRetryAt": format_time(next_try)},
        (condition(RETRYING, True, reason, message),),
    )


class StatusConflict(Exception):
    """The object's status kept changing under the writer (409 after 409): a transient error,
    the caller runs again (kopf's retry, or a sweep)."""

    retryable = True

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


@dataclass(frozen=True)
class Written:
    """A write that happened: the object as read just before it, its status then, the patch."""

    before: dict[str, Any]
    patch: dict[str, Any]

    @property
    def old(self) -> dict[str, Any]:
        out: dict[str, Any] = self.before.get("status") or {}
        return out

    @property
    def old_phase(self) -> str:
        return str(self.old.get("phase") or "")

    @property
    def new_phase(self) -> str:
        """The phase the write set, or "" when it set none."""
        return str(self.patch.get("phase") or "")

    @property
    def transition(self) -> bool:
        return bool(self.new_phase) and self.new_phase != self.old_phase


Decide = Callable[[dict[str, Any]], dict[str, Any] | None]


class StatusWriter:
    """The one conflict-safe status writer of one kind (``plural``)."""

    def __init__(self, kube: KubeAPI, plural: str, clock: Clock | None = None, tries: int = 5) -> None:
        self.kube = kube
        self.plural = plural
        self.clock = clock or SystemClock()
        self.tries = tries

    def write(self, obj: dict[str, Any], decide: Decide) -> Written | None:
        """Read ``obj`` afresh, ask ``decide(fresh)`` for the patch (None: nothing to write) and
        write it conditional on the resourceVersion read. Returns what was written, or None when
        nothing was (decided so, the object is gone, or another object of that name replaced
        it). Raises :class:`StatusConflict` when every try conflicted."""
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        for _ in range(self.tries):
            fresh = self.kube.get(self.plural, ns, name)
            if fresh is None or (meta.get("uid") and fresh["metadata"].get("uid") != meta.get("uid")):
                return None
            patch = decide(fresh)
            if patch is None:
                return None
            try:
                self.kube.patch_status(
                    self.plural, ns, name, patch, resource_version=fresh["metadata"]["resourceVersion"]
                )
            except ApiException as e:
                if e.status == 409:
                    continue
                if e.status == 404:
                    return None
                raise
            obj["status"] = {**(fresh.get("status") or {}), **patch}
            return Written(fresh, patch)
        raise StatusConflict(
            f"the status of {self.plural} {ns}/{name} kept changing (409 {self.tries} times)"
        )

    def apply(
        self, obj: dict[str, Any], change: Update, allow_on_terminal: Iterable[str] = ()
    ) -> Written | None:
        """Write ``change`` under the common rule: a terminal phase never changes (only the keys
        ``allow_on_terminal`` may still be written then); ``Queued`` is only ever the first
        phase (a stale body never moves an object back)."""
        allowed = set(allow_on_terminal)

        def decide(fresh: dict[str, Any]) -> dict[str, Any] | None:
            cur = phase_of(fresh)
            if cur in TERMINAL and (not allowed or change.add or set(change.fields) - allowed):
                return None
            if change.phase == Phase.QUEUED and cur:
                return None
            return change.patch(fresh.get("status") or {}, self.clock.now())

        return self.write(obj, decide)
