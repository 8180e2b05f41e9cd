"""What a PostgreSQL client error (libpq, psql, pg_dump, pg_restore) says: may a retry get past it?

The agent runs the PostgreSQL client tools, so their errors reach Nightjar only as text: the
agent reads it to decide whether to wait for the server, the operator (:mod:`nightjar.reconcile.errors`)
to decide whether a failed Job's reason is worth another try. This is the one place that reads it.

- ``TRANSIENT``: the server is not there *now* — refused, restarting, in recovery, out of
  connection slots, the connection cut or timed out, a name that does not resolve yet;
  serialization failures and deadlocks.
- ``PERMANENT``: the same request gets the same answer — bad credentials, no pg_hba entry, a role
  or database that does not exist, missing privileges, a version mismatch, a malformed URI.
- ``UNKNOWN``: anything else. Callers decide (the agent does not wait on it; the operator retries
  it until its deadline).

Permanent wins when a message matches both (``connection to server ... failed: FATAL: password
authentication failed`` is a refusal, not an outage).
"""

from __future__ import annotations

import enum
import re


class PgErrorKind(enum.Enum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"


_TRANSIENT = re.compile(
    r"could not connect to server|connection refused|connection timed out|timeout expired|"
    r"server closed the connection unexpectedly|connection to server .* failed: (?!FATAL)|"
    r"the database system is (starting up|shutting down|in recovery mode|not yet accepting connections)|"
    r"terminating connection due to administrator command|"
    r"too many (connections|clients)|remaining connection slots are reserved|"
    r"could not receive data from server|could not send data to server|SSL SYSCALL error|"
    r"no route to host|no such file or directory\s*\n?\s*is the server running|"
    r"temporary failure in name resolution|could not translate host name|"
    r"canceling statement due to conflict with recovery|deadlock detected|"
    r"could not serialize access",
    re.IGNORECASE,
)
_PERMANENT = re.compile(
    r"password authentication failed|no pg_hba\.conf entry|permission denied|"
    r"role .* does not exist|database .* does not exist|must be owner|"
    r"server version mismatch|aborting because of server version mismatch|"
    r"unsupported (frontend )?protocol|invalid (connection option|URI)|"
    r"password must be supplied|fe_sendauth: no password supplied",
    re.IGNORECASE,
)


def classify(message: str) -> PgErrorKind:
    """The kind of a PostgreSQL client's error message (as the tool printed it)."""
    if _PERMANENT.search(message):
        return PgErrorKind.PERMANENT
    if _TRANSIENT.search(message):
        return PgErrorKind.TRANSIENT
    return PgErrorKind.UNKNOWN


def is_transient(message: str) -> bool:
    """Whether waiting for the server may get past ``message``."""
    return classify(message) is PgErrorKind.TRANSIENT
