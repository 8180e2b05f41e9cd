"""The invariants a fault-injection run checks, over what the driver saw (pure), and the
independent snapshot check they rest on (through the storage seam, never the operator's code).

The driver gathers one ``BackupSeen`` per Backup and one ``RestoreSeen`` per Restore once every
component runs again and the stack has settled; the functions here turn them into violations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nightjar.devstack.chaos.plan import Violation
from nightjar.storage import layout
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import PublicManifest
from nightjar.storage.objects import ObjectMissing, ObjectStore

COMPLETED, FAILED = "Completed", "Failed"
UNCHANGED, PARTIAL = "Unchanged", "PartiallyRestored"


def verify_snapshot(
    store: ObjectStore, manifest_key: str, manifest_sha256: str = "", where: Callable[[str], str] = str
) -> str:
    """Check a snapshot as a reader would, without the operator: its manifest is there (with the
    digest the Backup recorded, when given), parses, and every object it lists is there with its
    size and sha256. ``where`` maps a key the manifest names to its key in ``store`` (a replica
    keeps the primary's keys under its own prefix). Returns "" when it verifies, else what is
    wrong. A store that cannot be reached raises StorageError: that is no verdict."""
    key = where(manifest_key)
    try:
        raw = store.read(key)
    except ObjectMissing:
        return f"manifest {key} is missing"
    if manifest_sha256 and hashlib.sha256(raw).hexdigest() != manifest_sha256:
        return f"manifest {key} differs from the digest the Backup recorded"
    try:
        manifest = PublicManifest.parse(raw, f"manifest {key}")
    except (IntegrityError, ValueError, KeyError) as e:
        return f"manifest {key} does not parse: {e}"
    if not manifest.objects:
        return f"manifest {key} lists no objects"
    for o in manifest.objects:
        okey = where(o.key)
        try:
            body = store.read(okey)
        except ObjectMissing:
            return f"{okey} (listed by {key}) is missing"
        if len(body) != o.bytes:
            return f"{okey} has {len(body)} bytes, the manifest says {o.bytes}"
        if hashlib.sha256(body).hexdigest() != o.sha256:
            return f"{okey} does not match its sha256 in the manifest"
    return ""


def verifiable_attempt(store: ObjectStore, backup_prefix: str, prefix: str) -> str:
    """A manifest under one Backup's keys whose snapshot verifies completely ("" when none): a
    Failed Backup must not have one."""
    for info in store.list(backup_prefix):
        where = layout.parse_key(info.key, prefix)
        if where is not None and where.is_manifest and not verify_snapshot(store, info.key):
            return info.key
    return ""


def rebase(old: str, new: str) -> Callable[[str], str]:
    """Key in a storage with prefix ``old`` -> the same key under prefix ``new`` (a replica)."""
    old, new = layout.normalize_prefix(old), layout.normalize_prefix(new)

    def where(key: str) -> str:
        return new + key[len(old) :] if key.startswith(old) else key

    return where


@dataclass(frozen=True)
class BackupSeen:
    """One Backup after the run settled (``phase`` "" when it never got one)."""

    ref: str  # namespace/name
    phase: str
    message: str = ""
    exists: bool = True
    expired: bool = False  # the driver moved its expiry into the past: GC must delete it
    jobs: int = 0  # distinct backup Jobs seen for it over the whole run
    max_jobs_at_once: int = 0
    verify: str | None = None  # Completed: "" verifies, else the problem; None: not checked
    replica: str | None = None  # the same for its copy in the replica (or "not replicated: ...")
    verifiable: str = ""  # Failed: a manifest under its keys that verifies ("" none)


def check_backups(seen: Iterable[BackupSeen]) -> list[Violation]:
    out: list[Violation] = []
    for b in seen:
        if b.jobs > 1 or b.max_jobs_at_once > 1:
            out.append(
                Violation(
                    "one-job-per-backup",
                    b.ref,
                    f"{b.jobs} distinct Jobs seen, {b.max_jobs_at_once} at the same time",
                )
            )
        if b.expired:
            if b.exists:
                out.append(Violation("expired-collected", b.ref, f"still there (phase {b.phase or '-'})"))
            continue
        if not b.exists:
            out.append(Violation("backup-terminal", b.ref, "disappeared although nobody deleted it"))
            continue
        if b.phase not in (COMPLETED, FAILED):
            out.append(
                Violation("backup-terminal", b.ref, f"still {b.phase or 'without a phase'}: {b.message}")
            )
        elif b.phase == FAILED:
            if not b.message.strip():
                out.append(Violation("failed-has-reason", b.ref, "Failed without a message"))
            if b.verifiable:
                out.append(
                    Violation(
                        "failed-not-verifiable",
                        b.ref,
                        f"Failed ({b.message}) although {b.verifiable} verifies completely",
                    )
                )
        else:
            if b.verify:
                out.append(Violation("completed-verifies", b.ref, b.verify))
            if b.verify is None:
                out.append(Violation("completed-verifies", b.ref, "could not be checked"))
            if b.replica:
                out.append(Violation("replica-verifies", b.ref, b.replica))
    return out


def find_orphans(keys: Iterable[str], prefix: str, live_uids: set[str], owned: set[str]) -> list[str]:
    """Keys that no Backup owns: not under a live Backup's own keys (its uid) and not listed by
    a live Backup's manifest (content shared with an older snapshot)."""
    out = []
    for key in keys:
        where = layout.parse_key(key, prefix)
        if key in owned or (where is not None and where.backup_uid in live_uids):
            continue
        out.append(key)
    return out


@dataclass(frozen=True)
class Content:
    """What a database and a files directory hold (digests)."""

    db: str
    files: str


@dataclass(frozen=True)
class RestoreSeen:
    """One Restore after the run settled, with the target before and after, and what the Backup
    held when it was taken."""

    ref: str
    backup: str
    phase: str
    target_state: str
    message: str
    expected: Content
    before: Content
    after: Content


def check_restores(seen: Iterable[RestoreSeen]) -> list[Violation]:
    out: list[Violation] = []
    for r in seen:
        what = f"of {r.backup}, {r.phase or 'no phase'}"
        if r.phase == COMPLETED:
            if r.after != r.expected:
                out.append(Violation("restore-truthful", r.ref, f"{what}, but {_diff(r.expected, r.after)}"))
        elif r.phase == FAILED:
            if r.target_state == UNCHANGED and r.after != r.before:
                out.append(
                    Violation(
                        "restore-truthful",
                        r.ref,
                        f"{what}, reported Unchanged, but the target changed: {_diff(r.before, r.after)}",
                    )
                )
            elif r.target_state == PARTIAL and r.after.db != r.expected.db:
                out.append(
                    Violation(
                        "restore-truthful",
                        r.ref,
                        f"{what}, reported PartiallyRestored, but the database is not the Backup's",
                    )
                )
            elif r.target_state not in (UNCHANGED, PARTIAL):
                out.append(
                    Violation(
                        "restore-truthful",
                        r.ref,
                        f"{what}, target state {r.target_state or '(none)'} is neither Unchanged nor "
                        f"PartiallyRestored ({r.message}); in fact {_state(r)}",
                    )
                )
        else:
            out.append(Violation("restore-truthful", r.ref, f"{what}: never finished ({r.message})"))
    return out


def _diff(want: Content, got: Content) -> str:
    parts = [f"the {name} differs" for name in ("db", "files") if getattr(want, name) != getattr(got, name)]
    return " and ".join(parts).replace("db", "database") or "nothing differs"


def _state(r: RestoreSeen) -> str:
    """What the target really holds after a restore, part by part."""

    def part(name: str) -> str:
        got = getattr(r.after, name)
        if got == getattr(r.expected, name):
            return "the Backup's"
        if got == getattr(r.before, name):
            return "as before"
        return "neither as before nor the Backup's"

    return f"database {part('db')}, files {part('files')}"
