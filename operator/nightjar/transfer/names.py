"""Default names: archive file names as Mendix Cloud gives them, and object names for the
Backups and Restores the command creates. Pure functions of their arguments."""

from __future__ import annotations

import datetime as dt
import re

#: What ``download`` writes: the whole snapshot, the database dump only, or the files only.
FULL, DATABASE_ONLY, FILES_ONLY = "Full", "DatabaseOnly", "FilesOnly"

_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def _stamp(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y%m%d%H%M")


def archive_filename(backup: str, created: dt.datetime, what: str) -> str:
    """Mendix's names: ``<backup>-<yyyymmddhhmm>.tar.gz`` for a full snapshot,
    ``database-<backup>-<yyyymmddhhmm>.backup`` for the dump; files only get
    ``files-<backup>-<yyyymmddhhmm>.tar.gz``. The time is the snapshot's, in UTC."""
    stamp = _stamp(created)
    if what == DATABASE_ONLY:
        return f"database-{backup}-{stamp}.backup"
    if what == FILES_ONLY:
        return f"files-{backup}-{stamp}.tar.gz"
    return f"{backup}-{stamp}.tar.gz"


def object_name(base: str, now: dt.datetime, suffix: str = "") -> str:
    """``<base>-<yyyymmddhhmmss>[-suffix]`` as a valid object name (lowercase, at most 63 chars,
    so Jobs derived from it keep a readable name)."""
    clean = _NOT_DNS.sub("-", base.lower()).strip("-") or "nightjar"
    tail = now.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S") + (f"-{suffix}" if suffix else "")
    return f"{clean[: 62 - len(tail)].rstrip('-')}-{tail}"
