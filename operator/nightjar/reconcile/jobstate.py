"""Reading a finished Job's status: when it ended and why it failed. Pure."""

from __future__ import annotations

import datetime as dt
from typing import Any

from nightjar.domain.retention import parse_time


def finished_at(job: dict[str, Any]) -> dt.datetime | None:
    """When the Job succeeded or failed for good (its completionTime, else the time of its
    Complete/Failed condition); None while it has not ended."""
    js = job.get("status") or {}
    for c in js.get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            when = js.get("completionTime") or c.get("lastTransitionTime")
            return parse_time(when) if when else None
    return None


def failure_reason(job: dict[str, Any]) -> str:
    """The reason and message of the Job's Failed condition ("no result" without one)."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ") or "no result"
    return "no result"
