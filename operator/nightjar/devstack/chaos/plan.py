"""The fault-injection run's pure parts: the seeded fault schedule and the report table.

Everything random in a run comes from one seed (printed first and last), so a run that found
something is replayed with ``CHAOS_SEED``: the same faults in the same order with the same waits,
and the same choice of operations in each lane. (The stack's own timing still differs between two
runs: replaying reproduces the schedule, not every interleaving.)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum


class FaultKind(Enum):
    """What the driver breaks, and how it brings it back."""

    OPERATOR_KILL = "operator SIGKILL"  # restarted by `up` after the hold
    S3_PRIMARY = "primary S3 stop/start"
    S3_REPLICA = "replica S3 stop/start"
    APISERVER = "kube-apiserver stop/start"
    POSTGRES = "PostgreSQL restart"
    AGENT_POD = "agent Pod killed"  # a running backup/restore/replicate Pod deleted at once


@dataclass(frozen=True)
class Fault:
    """One fault: wait ``wait`` seconds after the previous one recovered, inject, hold it for
    ``hold`` seconds, recover. ``pick`` chooses among candidates (which agent Pod) the same way
    on a replay."""

    index: int
    kind: FaultKind
    wait: float
    hold: float
    pick: int


@dataclass(frozen=True)
class Pace:
    """How long faults wait and hold (seconds)."""

    wait: tuple[float, float] = (0.5, 4.0)
    hold: tuple[float, float] = (1.0, 6.0)


def plan_faults(
    seed: int, count: int, pace: Pace = Pace(), kinds: Sequence[FaultKind] = tuple(FaultKind)
) -> list[Fault]:
    """``count`` faults from ``seed``: every kind about equally often (each kind at least once when
    ``count`` allows), in a shuffled order, with random waits and holds. Pure: the same arguments
    give the same list."""
    if count < 0:
        raise ValueError("count must be >= 0")
    if not kinds:
        raise ValueError("no fault kinds")
    rng = random.Random(f"faults:{seed}")  # noqa: S311 - a replayable schedule, not a secret
    per, extra = divmod(count, len(kinds))
    chosen = [k for k in kinds for _ in range(per)] + rng.sample(list(kinds), extra)
    rng.shuffle(chosen)
    return [
        Fault(
            index=i,
            kind=kind,
            wait=round(rng.uniform(*pace.wait), 2),
            hold=round(rng.uniform(*pace.hold), 2),
            pick=rng.randrange(1 << 30),
        )
        for i, kind in enumerate(chosen)
    ]


def lane_rng(seed: int, lane: int) -> random.Random:
    """The operation choices of one workload lane (independent of the fault schedule)."""
    return random.Random(f"lane:{seed}:{lane}")  # noqa: S311 - replayable, not a secret


@dataclass
class Tally:
    """What a run did: operations by kind, faults by kind (injected; tries that found nothing to
    hit, such as no agent Pod running), durations."""

    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[FaultKind] = field(default_factory=Counter)
    skipped: Counter[FaultKind] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Violation:
    """An invariant that did not hold, with the resource and what was seen."""

    invariant: str
    resource: str
    detail: str

    def line(self) -> str:
        return f"{self.invariant}: {self.resource}: {self.detail}"


#: The invariants a run checks, in report order (each row of the table counts one).
INVARIANTS = (
    "backup-terminal",  # every Backup ends Completed or Failed, none stuck past its deadline
    "failed-has-reason",  # a Failed Backup says why
    "one-job-per-backup",  # never two Jobs for one Backup
    "completed-verifies",  # a Completed Backup's snapshot verifies (manifest, every object's sha256)
    "failed-not-verifiable",  # a Failed Backup never has a complete, verifiable snapshot
    "replica-verifies",  # a Completed Backup ends Replicated, and the replica's copy verifies
    "expired-collected",  # an expired Backup is deleted by GC
    "no-orphans",  # every object in the bucket belongs to a Backup (after GC / the sweep)
    "empty-after-deletion",  # deleting every Backup leaves nothing of them in either bucket
    "restore-truthful",  # identical after Completed; Unchanged / PartiallyRestored true when Failed
)


def table(seed: int, tally: Tally, violations: Iterable[Violation], faults_wanted: int) -> str:
    """The report: operations, faults of each kind, violations per invariant, the seed."""
    found = Counter(v.invariant for v in violations)
    w = 44
    rows = ["", f"{'Nightjar fault-injection run, seed ' + str(seed):<{w}}", "-" * (w + 10)]
    rows.append("operations")
    for op in sorted(tally.ops):
        rows.append(f"  {op:<{w}}{tally.ops[op]:>8}")
    rows.append(f"faults injected ({sum(tally.faults.values())} of {faults_wanted} planned)")
    for kind in FaultKind:
        skipped = f"  ({tally.skipped[kind]} tries found nothing to hit)" if tally.skipped[kind] else ""
        rows.append(f"  {kind.value:<{w}}{tally.faults[kind]:>8}{skipped}")
    rows.append(f"invariant violations (must be 0): {sum(found.values())}")
    for inv in INVARIANTS:
        rows.append(f"  {inv:<{w}}{found[inv]:>8}")
    for inv in sorted(set(found) - set(INVARIANTS)):
        rows.append(f"  {inv:<{w}}{found[inv]:>8}")
    if tally.seconds:
        rows.append("durations (s)")
        for what, secs in tally.seconds.items():
            rows.append(f"  {what:<{w}}{secs:>8.0f}")
    rows.append("-" * (w + 10))
    rows.append(f"replay: make chaos CHAOS_SEED={seed} CHAOS_FAULTS={faults_wanted}")
    return "\n".join(rows)
