"""Where a snapshot is: its locations (the primary and each replica of its storage), the
residency check of the replicas, and the Replicated condition. Pure, but for the lookup of
the replica BackupStorages; :mod:`nightjar.reconcile.replication` acts on it."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

from nightjar.constants import ANNOTATION_EXPIRES_AT, STORAGES
from nightjar.domain.residency import Policy, Verdict
from nightjar.domain.retention import format_time, parse_time
from nightjar.jobs import ReplicatePlan, StorageRef
from nightjar.reconcile import status
from nightjar.reconcile.jobstate import failure_reason
from nightjar.reconcile.ports import KubeAPI
from nightjar.storage import layout

REPLICATED, PENDING, FAILED = "Replicated", "Pending", "Failed"
REPLICATED_CONDITION = "Replicated"


@dataclass(frozen=True)
class ReplicaCheck:
    """One replica of a storage, as the policy and the API see it now."""

    name: str
    storage: dict[str, Any] | None
    jurisdiction: str
    verdict: Verdict | None

    @property
    def refused(self) -> bool:
        return self.verdict is not None and not self.verdict.allowed


def replica_names(storage: dict[str, Any]) -> list[str]:
    return [r["name"] for r in (storage.get("spec") or {}).get("replicas") or []]


def check_replicas(
    kube: KubeAPI, policy: Policy, namespace: str, storage: dict[str, Any]
) -> list[ReplicaCheck]:
    """Each replica of ``storage``: does it exist, and may the primary's data go there?"""
    primary_j = storage["spec"].get("jurisdiction") or ""
    out = []
    for name in replica_names(storage):
        replica = kube.get(STORAGES, namespace, name)
        if replica is None:
            out.append(ReplicaCheck(name, None, "", None))
            continue
        j = replica["spec"].get("jurisdiction") or ""
        out.append(ReplicaCheck(name, replica, j, policy.check(primary_j, j)))
    return out


def residency_refusal(checks: list[ReplicaCheck], storage_name: str) -> str:
    """The message when a replica breaks the policy ("" when none does)."""
    bad = [c for c in checks if c.refused]
    if not bad:
        return ""
    return (
        "; ".join(
            f"replica {c.name} ({c.jurisdiction}) refused: {c.verdict.message}" for c in bad if c.verdict
        )
        + f" — no data is written to {storage_name} until spec.replicas keeps the rule"
    )


def summary(locations: list[dict[str, Any]]) -> str:
    done = sum(1 for loc in locations if loc.get("state") == REPLICATED)
    return f"{done}/{len(locations)}"


def condition(locations: list[dict[str, Any]]) -> dict[str, Any]:
    """The Backup's Replicated condition: True when every location holds the snapshot."""
    missing = [loc for loc in locations if loc.get("state") != REPLICATED]
    if not missing:
        reason, message = "AllLocations", f"the snapshot is in all {len(locations)} locations"
    else:
        failed = [loc for loc in missing if loc.get("state") == FAILED]
        reason = "ReplicationFailed" if failed else "ReplicationPending"
        message = "; ".join(
            f"{loc['storage']}: {loc.get('state')} {loc.get('message', '')}".strip() for loc in missing
        )
    return status.condition(REPLICATED_CONDITION, not missing, reason, message)


def initial_locations(
    storage: dict[str, Any], checks: list[ReplicaCheck], now: dt.datetime
) -> list[dict[str, Any]]:
    """The primary (the snapshot is verified there) and each replica (Pending)."""
    locs = [
        {
            "storage": storage["metadata"]["name"],
            "role": "Primary",
            "jurisdiction": storage["spec"].get("jurisdiction") or "",
            "state": REPLICATED,
            "replicatedAt": format_time(now),
            "message": "snapshot written and verified",
        }
    ]
    for c in checks:
        loc: dict[str, Any] = {
            "storage": c.name,
            "role": "Replica",
            "jurisdiction": c.jurisdiction,
            "state": PENDING,
            "attempts": 0,
            "message": "waiting for the copy",
        }
        if c.refused and c.verdict is not None:  # never copied there: said, not dropped
            loc.update(state=FAILED, final=True, message=f"not copied: {c.verdict.message}")
        locs.append(loc)
    return locs


def location_fields(locations: list[dict[str, Any]]) -> dict[str, Any]:
    """The status fields of ``locations``: the list and its n/m summary."""
    return {"locations": locations, "replication": summary(locations)}


def location_update(locations: list[dict[str, Any]]) -> status.Update:
    """The status change that records ``locations``, with the Replicated condition."""
    return status.Update(location_fields(locations), (condition(locations),))


def due(loc: dict[str, Any], now: dt.datetime, base: int) -> bool:
    """A failed copy is retried after base * 2^(attempts-1) seconds, at most 6 hours apart."""
    last = loc.get("lastAttemptAt")
    if not last:
        return True
    wait: int = min(base * 2 ** max(int(loc.get("attempts") or 1) - 1, 0), 6 * 3600)
    return (now - parse_time(str(last))).total_seconds() >= wait


def expired(backup: dict[str, Any], now: dt.datetime) -> bool:
    raw = (backup["metadata"].get("annotations") or {}).get(ANNOTATION_EXPIRES_AT)
    try:
        return bool(raw) and parse_time(str(raw)) <= now
    except ValueError:
        return False


def primary_prefix(status: dict[str, Any]) -> str:
    """The prefix the snapshot's keys carry, read from its manifest key (everything before the
    layout's root): right even when the storage's prefix changed since."""
    key = (status.get("storage") or {}).get("manifestKey") or ""
    at = key.find(layout.ROOT + "/")
    return key[:at] if at >= 0 else (status.get("storage") or {}).get("prefix") or ""


def copy_outcome(
    job: dict[str, Any], result: dict[str, Any], replica: str, now: dt.datetime
) -> tuple[dict[str, Any], tuple[str, str, str]]:
    """What a finished replication Job makes of its location (the fields it takes) and the Event
    that says so. Copied only when the Job succeeded and reported the manifest it verified."""
    copied, skipped = result.get("copiedObjects", 0), result.get("skippedObjects", 0)
    if (job.get("status") or {}).get("succeeded") and "manifestKey" in result:
        fields = {
            "state": REPLICATED,
            "replicatedAt": format_time(now),
            "copiedObjects": int(copied or 0),
            "skippedObjects": int(skipped or 0),
            "copiedBytes": int(result.get("copiedBytes") or 0),
            "message": f"verified: {copied} objects copied, {skipped} already there",
        }
        mb = int(result.get("copiedBytes") or 0) / 1e6
        text = (
            f"snapshot verified in {replica}: {copied} objects ({mb:.2f} MB) copied, {skipped} already there"
        )
        return fields, ("Normal", "Replicated", text)
    why = result.get("error") or f"the replication Job failed ({failure_reason(job)})"
    fields = {"state": FAILED, "message": f"{str(why)[:900]}; retried with backoff"}
    event_why = result.get("error") or failure_reason(job)
    return fields, ("Warning", "ReplicationFailed", f"copy to {replica} failed: {event_why}; it is retried")


def replicate_plan(
    backup: dict[str, Any], primary: dict[str, Any], replica: dict[str, Any], attempt: int
) -> ReplicatePlan:
    """What the copy Job of ``backup`` into ``replica`` needs (attempt ``attempt``)."""
    meta, st = backup["metadata"], backup["status"]
    expires = (meta.get("annotations") or {}).get(ANNOTATION_EXPIRES_AT) or st.get("expiresOn") or ""
    primary_ref = StorageRef.from_spec(primary["spec"])
    replica_ref = StorageRef.from_spec(replica["spec"])
    if replica_ref.lock_mode == "None" and primary_ref.lock_mode != "None":
        # Retention as in the primary: the replica's bucket must be able to hold it.
        replica_ref = dataclasses.replace(replica_ref, lock_mode=primary_ref.lock_mode)
    return ReplicatePlan(
        backup_name=meta["name"],
        backup_uid=meta["uid"],
        namespace=meta["namespace"],
        replica_name=replica["metadata"]["name"],
        attempt=attempt,
        primary=primary_ref,
        replica=replica_ref,
        primary_prefix=primary_prefix(st),
        manifest_key=st["storage"]["manifestKey"],
        manifest_sha256=st["storage"].get("manifestSha256", ""),
        retain_until=expires,
    )
