"""Helpers for the side-by-side benchmarks: run a command and measure it, size an S3 prefix.

A command's peak RSS is the ``ru_maxrss`` that ``wait4`` reports for it, taken by a small
``python -S`` wrapper rather than by the bench itself: Linux carries ``ru_maxrss`` over from the
parent through ``exec``, so a child of the bench would report at least the bench's own peak. The
wrapper's own few MiB are the floor of every figure. ``ru_maxrss`` of a process counts the largest
of it and the children it waited for (the agent's ``pg_dump``), never their sum.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Runs argv, waits for it with wait4 and writes {"seconds", "maxrssKiB"} to the file argv[1].
_WRAPPER = (
    "import json, os, sys, time\n"
    "out, argv = sys.argv[1], sys.argv[2:]\n"
    "t0 = time.monotonic()\n"
    "pid = os.posix_spawnp(argv[0], argv, os.environ)\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "seconds = time.monotonic() - t0\n"
    "with open(out, 'w') as f:\n"
    "    json.dump({'seconds': seconds, 'maxrssKiB': ru.ru_maxrss}, f)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


class CommandFailed(RuntimeError):
    """A measured command exited non-zero: the benchmark is broken, not slow."""


@dataclass
class Measured:
    seconds: float
    rss_bytes: int
    stdout: str


@contextlib.contextmanager
def _killed_on_error(proc: subprocess.Popen[Any]) -> Iterator[None]:
    """Interrupted (Ctrl-C, SIGTERM, an error) while ``proc`` runs: kill its whole process group,
    the measured command and its children included, not only the wrapper."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _tail(f: IO[str], n: int = 15) -> str:
    f.seek(0)
    return "\n".join(f.read().splitlines()[-n:])


def run_measured(
    argv: Sequence[str],
    env: Mapping[str, str],
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout_to_null: bool = False,
) -> Measured:
    """Run ``argv`` (no shell) under the wrapper; wall time and peak RSS of the command itself."""
    with (
        tempfile.NamedTemporaryFile("w+", suffix=".json") as rep,
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
    ):
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _WRAPPER, rep.name, *argv],
            env=dict(env),
            stdin=stdin,
            stdout=subprocess.DEVNULL if stdout_to_null else out,
            stderr=err,
            start_new_session=True,
        )
        with _killed_on_error(proc):
            code = proc.wait()
        if code != 0:
            raise CommandFailed(f"{argv[0]} exited with {code}:\n{_tail(err)}")
        got = json.loads(Path(rep.name).read_text())
        out.seek(0)
        return Measured(got["seconds"], int(got["maxrssKiB"]) * 1024, out.read())


def run_pipeline(
    producer: Sequence[str], producer_env: Mapping[str, str], consumer: Sequence[str], env: Mapping[str, str]
) -> Measured:
    """``producer | consumer``: wall time of the whole pipe, peak RSS of the consumer."""
    with (
        tempfile.NamedTemporaryFile("w+", suffix=".json") as rep,
        tempfile.TemporaryFile("w+") as perr,
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
    ):
        t0 = time.monotonic()
        prod = subprocess.Popen(
            list(producer),
            env=dict(producer_env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=perr,
            start_new_session=True,
        )
        assert prod.stdout is not None  # noqa: S101 - stdout=PIPE
        cons = subprocess.Popen(
            [sys.executable, "-S", "-c", _WRAPPER, rep.name, *consumer],
            env=dict(env),
            stdin=prod.stdout,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        prod.stdout.close()  # the consumer holds the read end now
        with _killed_on_error(prod), _killed_on_error(cons):
            ccode = cons.wait()
            pcode = prod.wait()
        seconds = time.monotonic() - t0
        if pcode != 0:
            raise CommandFailed(f"{producer[0]} exited with {pcode}:\n{_tail(perr)}")
        if ccode != 0:
            raise CommandFailed(f"{consumer[0]} exited with {ccode}:\n{_tail(err)}")
        got = json.loads(Path(rep.name).read_text())
        out.seek(0)
        return Measured(seconds, int(got["maxrssKiB"]) * 1024, out.read())


def stored_bytes(s3: Any, bucket: str, prefix: str) -> int:
    """Sum of the sizes of every object under ``prefix`` (which should end with "/")."""
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        total += sum(int(o["Size"]) for o in page.get("Contents", []))
    return total


def delete_prefix(s3: Any, bucket: str, prefix: str) -> None:
    """Delete every object under ``prefix`` (a plain bucket: no versions, no Object Lock)."""
    batch: list[dict[str, str]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        batch.extend({"Key": o["Key"]} for o in page.get("Contents", []))
        while len(batch) >= 1000:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": batch[:1000], "Quiet": True})
            del batch[:1000]
    if batch:
        s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def summary(values: Iterable[float]) -> dict[str, float] | None:
    """min and median of the samples (None when there are none)."""
    v = list(values)
    if not v:
        return None
    return {"min": min(v), "median": statistics.median(v)}


def count_files(root: Path) -> int:
    return sum(len(files) for _dirs, _subdirs, files in os.walk(root))
