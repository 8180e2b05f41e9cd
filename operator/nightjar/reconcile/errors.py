"""The error taxonomy of the reconcilers: may a retry succeed, or will it not?

Every reconciler asks :func:`classify` before it turns an exception into a terminal phase:

- :class:`Transient`: the world may change without anyone touching the object. The network, a
  timeout, S3/HTTP 5xx (503 SlowDown), throttling (429), a Kubernetes conflict (409) or 5xx, a
  Secret, BackupStorage or object that is not there *yet*. Retried with capped backoff and an
  honest status message; failed only after a stated deadline.
- :class:`Permanent`: retrying changes nothing. Refused by policy, credentials the server
  confirmed bad (403 InvalidAccessKeyId / SignatureDoesNotMatch / AccessDenied), Object Lock, an
  integrity failure (a digest mismatch, a damaged snapshot), the manifest the agent reported
  missing (404), a request the server calls malformed (4xx). Failed at once, with the reason.

The client libraries' errors are classified here and nowhere else: botocore's through the
storage seam (:func:`nightjar.storage.objects.translate`, so this module never imports it),
the Kubernetes client's by HTTP status, urllib3's and the OS's network errors as transient,
and libpq's by the text the agent reports (psycopg is not used: see :func:`classify_text`).
An exception of the project may classify itself with a boolean ``retryable`` class attribute
(as :class:`~nightjar.storage.objects.StorageError` does). Anything unknown is transient: it is
retried until the caller's deadline, so a surprise never fails a good backup at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import urllib3.exceptions
from kubernetes.client.rest import ApiException

from nightjar.domain import pgerrors
from nightjar.kube import SecretMissing
from nightjar.reconcile import preflight
from nightjar.reconcile import storage as storage_rec
from nightjar.storage.errors import IntegrityError
from nightjar.storage.objects import (
    AccessDenied,
    ObjectLocked,
    ObjectMissing,
    StorageError,
    describe_error,
    is_backend_error,
    translate,
)


class Retry(Exception):
    """A precondition does not hold yet, or a transient error is being waited out: the caller
    is run again after ``delay`` seconds (kopf's TemporaryError, or a sweep)."""

    retryable = True

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


@dataclass(frozen=True)
class Transient:
    """A retry may succeed. ``reason`` is a condition reason (CamelCase); ``message`` one line,
    without secrets."""

    reason: str
    message: str
    retryable: ClassVar[bool] = True


@dataclass(frozen=True)
class Permanent:
    """Retrying changes nothing: fail now, with ``reason`` and ``message``."""

    reason: str
    message: str
    retryable: ClassVar[bool] = False


Verdict = Transient | Permanent

#: Transient reasons.
STORAGE_UNAVAILABLE = "StorageUnavailable"
KUBERNETES_UNAVAILABLE = "KubernetesUnavailable"
CONFLICT = "Conflict"
NOT_THERE_YET = "NotThereYet"
NETWORK = "NetworkError"
UNKNOWN = "UnexpectedError"
#: Permanent reasons.
ACCESS_DENIED = "AccessDenied"
OBJECT_LOCKED = "ObjectLocked"
MISSING = "ObjectMissing"
INTEGRITY = "IntegrityFailed"
REFUSED = "Refused"

_NETWORK = (
    ConnectionError,  # ConnectionRefusedError, ConnectionResetError, BrokenPipeError
    TimeoutError,
    urllib3.exceptions.HTTPError,  # MaxRetryError, ProtocolError, NewConnectionError, timeouts
)


def classify(exc: BaseException) -> Verdict:
    """Transient or Permanent, with a reason and a secret-free one-line message."""
    if isinstance(exc, IntegrityError):  # a digest mismatch, a damaged or unreadable snapshot
        return Permanent(INTEGRITY, str(exc))
    if is_backend_error(exc):  # botocore's own error: the seam knows what it means
        exc = translate(exc, "storage")
    if isinstance(exc, StorageError):
        return _storage(exc)
    if isinstance(exc, ApiException):
        return _kubernetes(exc)
    if isinstance(exc, (SecretMissing, preflight.Missing)):
        return Transient(NOT_THERE_YET, str(exc))
    if isinstance(exc, storage_rec.StorageUnavailable):
        return Transient(STORAGE_UNAVAILABLE, str(exc))
    if isinstance(exc, _NETWORK):
        return Transient(NETWORK, f"{type(exc).__name__}: {exc}")
    own = getattr(type(exc), "retryable", None)
    if isinstance(own, bool):
        return Transient(NOT_THERE_YET, str(exc)) if own else Permanent(REFUSED, str(exc))
    return Transient(UNKNOWN, describe_error(exc, type(exc).__name__))


def _storage(err: StorageError) -> Verdict:
    if isinstance(err, ObjectMissing):
        return Permanent(MISSING, str(err))
    if isinstance(err, ObjectLocked):
        return Permanent(OBJECT_LOCKED, str(err))
    if isinstance(err, AccessDenied):
        return Permanent(ACCESS_DENIED, str(err))
    if not err.retryable:  # another 4xx the server will answer the same way
        return Permanent(REFUSED, str(err))
    return Transient(STORAGE_UNAVAILABLE, str(err))


def _kubernetes(err: ApiException) -> Verdict:
    status = int(err.status or 0)
    message = f"Kubernetes API: {status or 'no answer'} {err.reason or ''}".strip()
    if status == 409:
        return Transient(CONFLICT, message)
    if status == 404:  # an object not there yet (or gone: the caller's deadline decides)
        return Transient(NOT_THERE_YET, message)
    if status in (0, 401, 408, 429) or status >= 500:  # 401: a token being rotated
        return Transient(KUBERNETES_UNAVAILABLE, message)
    return Permanent(REFUSED, message)  # 400, 403 (RBAC), 410, 422: the same request, the same answer


def classify_text(message: str) -> Verdict:
    """Classify an error the agent reported as text (its libpq, pg_dump and S3 failures reach the
    operator only as the message in its termination record). Permanent wins when both match."""
    kind = pgerrors.classify(message)
    if kind is pgerrors.PgErrorKind.PERMANENT:
        return Permanent(REFUSED, message)
    if kind is pgerrors.PgErrorKind.TRANSIENT:
        return Transient(NETWORK, message)
    low = message.lower()
    if "sha256" in low and ("mismatch" in low or "does not match" in low):
        return Permanent(INTEGRITY, message)
    if any(w in low for w in ("invalidaccesskeyid", "signaturedoesnotmatch", "access denied")):
        return Permanent(ACCESS_DENIED, message)
    if any(w in low for w in ("slowdown", "503", "cannot connect to the s3 endpoint", "timed out")):
        return Transient(STORAGE_UNAVAILABLE, message)
    return Transient(UNKNOWN, message)


def backoff(elapsed: float, base: float = 10.0, cap: float = 60.0) -> float:
    """The wait before the next try, from the time already spent failing: as long again (so the
    waits double: 10, 10, 20, 40 s ...), at least ``base``, at most ``cap``. Stateless: the same
    answer after an operator restart."""
    return max(base, min(cap, elapsed))


#: How a retry's message names the kind of transient error.
WHAT = {
    STORAGE_UNAVAILABLE: "storage unreachable",
    NETWORK: "storage unreachable",
    NOT_THERE_YET: "something it needs is not there (yet)",
    CONFLICT: "the Kubernetes API failed",
    KUBERNETES_UNAVAILABLE: "the Kubernetes API failed",
}
