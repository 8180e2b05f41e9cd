"""Waiting for something the agent needs that is not there *now*: a database restarting or
failing over, an S3 endpoint that blinked. A Job's attempts are few and Kubernetes' Pod backoff
short (10 s, 20 s ...), so an outage of a minute would otherwise burn them all and fail a backup
that a little patience would have taken; a restore, whose Job does not retry, would fail at once.

:func:`wait_for` probes with doubling waits (2 s up to 30 s), logs each wait with the reason, and
gives up after a stated patience. Only what the probe calls transient is waited on: a refusal
(bad credentials, no such database or bucket) is reported at once by the step that follows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nightjar.agent.pgtools import say
from nightjar.storage.objects import StorageError

#: The first wait (s), doubling up to the cap.
FIRST, CAP = 2.0, 30.0


class StillUnreachable(Exception):
    """Patience ran out; the message is the last error and how long was waited."""


def storage_probe(check: Callable[[], None]) -> Callable[[], str]:
    """A probe of the bucket through ``check`` (an ObjectStore's ``check``, or a presigned URL's
    for a restore into another namespace): its error when a retry may get past it (network, 5xx,
    throttling); "" when it answers or refuses (the next step reports a refusal)."""

    def probe() -> str:
        try:
            check()
        except StorageError as e:
            return str(e) if e.retryable else ""
        return ""

    return probe


def wait_for(
    what: str,
    probe: Callable[[], str],
    patience: float,
    *,
    log: Callable[[str], None] = say,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Call ``probe`` until it returns "" (it answers, or failed in a way no wait gets past: the
    next step reports that); it returns a transient error's message otherwise. Returns the number
    of waits; raises :class:`StillUnreachable` once another wait would pass ``patience`` seconds."""
    started = clock()
    delay, waits = FIRST, 0
    while True:
        problem = probe()
        if not problem:
            if waits:
                log(f"{what} answers again after {clock() - started:.0f}s")
            return waits
        waited = clock() - started
        if waited + delay > patience:
            raise StillUnreachable(f"{problem} (still not reachable after waiting {waited:.0f}s)")
        log(f"{what} is not reachable ({problem}); retrying in {delay:.0f}s")
        sleep(delay)
        waits += 1
        delay = min(CAP, delay * 2)
