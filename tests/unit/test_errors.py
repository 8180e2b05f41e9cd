"""The error taxonomy (nightjar.reconcile.errors): which failures a retry may get past, as a table.

Each row is a real exception of the library that raises it (botocore, the Kubernetes client,
urllib3, the OS, the storage seam, the reconcilers) or a message the agent reports from libpq.
"""

from __future__ import annotations

import pytest
import urllib3.exceptions
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from kubernetes.client.rest import ApiException

from nightjar.kube import SecretMissing
from nightjar.reconcile import errors, preflight
from nightjar.reconcile.adoption import UploadRefused
from nightjar.reconcile.backup_plan import PreflightFailed
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.restore_plan import Refused
from nightjar.reconcile.storage import StorageUnavailable
from nightjar.storage.crypto import KeyProblem
from nightjar.storage.errors import IntegrityError
from nightjar.storage.objects import AccessDenied, ObjectLocked, ObjectMissing, StorageError


def s3_error(code: str, status: int, message: str = "") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


T, P = errors.Transient, errors.Permanent

TABLE: list[tuple[str, BaseException, type, str]] = [
    # S3 (botocore), translated by the storage seam
    (
        "S3 503 SlowDown",
        s3_error("SlowDown", 503, "Please reduce your request rate."),
        T,
        "StorageUnavailable",
    ),
    ("S3 503 ServiceUnavailable", s3_error("ServiceUnavailable", 503), T, "StorageUnavailable"),
    ("S3 500 InternalError", s3_error("InternalError", 500), T, "StorageUnavailable"),
    ("S3 429", s3_error("TooManyRequests", 429), T, "StorageUnavailable"),
    ("S3 400 Throttling", s3_error("Throttling", 400), T, "StorageUnavailable"),
    ("S3 400 RequestTimeout", s3_error("RequestTimeout", 400), T, "StorageUnavailable"),
    (
        "S3 connection refused",
        EndpointConnectionError(endpoint_url="http://s3:9000"),
        T,
        "StorageUnavailable",
    ),
    ("S3 connect timeout", ConnectTimeoutError(endpoint_url="http://s3:9000"), T, "StorageUnavailable"),
    ("S3 read timeout", ReadTimeoutError(endpoint_url="http://s3:9000"), T, "StorageUnavailable"),
    ("S3 403 InvalidAccessKeyId", s3_error("InvalidAccessKeyId", 403), P, "AccessDenied"),
    ("S3 403 SignatureDoesNotMatch", s3_error("SignatureDoesNotMatch", 403), P, "AccessDenied"),
    ("S3 403 AccessDenied (policy)", s3_error("AccessDenied", 403, "Access Denied."), P, "AccessDenied"),
    ("S3 404 NoSuchKey (the manifest)", s3_error("NoSuchKey", 404), P, "ObjectMissing"),
    ("S3 404 NoSuchBucket", s3_error("NoSuchBucket", 404), P, "ObjectMissing"),
    ("S3 ObjectLocked", s3_error("ObjectLocked", 400), P, "ObjectLocked"),
    ("S3 400 InvalidArgument", s3_error("InvalidArgument", 400), P, "Refused"),
    # the storage seam's own errors
    ("StorageError (unreachable)", StorageError("reading k: cannot connect"), T, "StorageUnavailable"),
    ("ObjectMissing", ObjectMissing("reading k: NoSuchKey"), P, "ObjectMissing"),
    ("AccessDenied", AccessDenied("reading k: access denied"), P, "AccessDenied"),
    ("ObjectLocked", ObjectLocked("deleting k: locked"), P, "ObjectLocked"),
    ("IntegrityError (digest mismatch)", IntegrityError("manifest k does not match"), P, "IntegrityFailed"),
    ("KeyProblem", KeyProblem("key 3 is wrong"), P, "IntegrityFailed"),
    # the Kubernetes API
    ("Kubernetes 409 conflict", ApiException(status=409, reason="Conflict"), T, "Conflict"),
    ("Kubernetes 500", ApiException(status=500, reason="Internal Server Error"), T, "KubernetesUnavailable"),
    ("Kubernetes 503", ApiException(status=503, reason="Service Unavailable"), T, "KubernetesUnavailable"),
    ("Kubernetes 429", ApiException(status=429, reason="Too Many Requests"), T, "KubernetesUnavailable"),
    ("Kubernetes 404 (not there yet)", ApiException(status=404, reason="Not Found"), T, "NotThereYet"),
    ("Kubernetes 403 (RBAC)", ApiException(status=403, reason="Forbidden"), P, "Refused"),
    ("Kubernetes 422", ApiException(status=422, reason="Unprocessable Entity"), P, "Refused"),
    # the network below the Kubernetes client, and the OS
    (
        "urllib3 MaxRetryError",
        urllib3.exceptions.MaxRetryError(None, "/apis", "connection refused"),  # type: ignore[arg-type]
        T,
        "NetworkError",
    ),
    ("urllib3 ProtocolError", urllib3.exceptions.ProtocolError("reset"), T, "NetworkError"),
    ("connection refused", ConnectionRefusedError(111, "Connection refused"), T, "NetworkError"),
    ("timeout", TimeoutError("timed out"), T, "NetworkError"),
    # what is not there yet
    ("Secret missing", SecretMissing('Secret "s3" not found in namespace a'), T, "NotThereYet"),
    ("database Secret missing", preflight.Missing('Secret "db" not found'), T, "NotThereYet"),
    (
        "BackupStorage missing",
        StorageUnavailable('BackupStorage "s3" is not in namespace a'),
        T,
        "StorageUnavailable",
    ),
    # the reconcilers' own exceptions classify themselves
    ("Retry", Retry("waiting for the app to stop", 3), T, "NotThereYet"),
    ("PreflightFailed", PreflightFailed('BackupStorage "s3" not found'), T, "NotThereYet"),
    ("UploadRefused", UploadRefused("not this namespace's", "NotAllowed"), P, "Refused"),
    ("restore Refused (policy)", Refused("namespace b does not grant it"), P, "Refused"),
    # a surprise is retried until the caller's deadline, never failed at once
    ("anything else", RuntimeError("surprise"), T, "UnexpectedError"),
]


@pytest.mark.parametrize(("exc", "kind", "reason"), [r[1:] for r in TABLE], ids=[r[0] for r in TABLE])
def test_classify(exc: BaseException, kind: type, reason: str) -> None:
    verdict = errors.classify(exc)
    assert isinstance(verdict, kind), verdict
    assert verdict.reason == reason
    assert verdict.retryable is (kind is T)
    assert verdict.message


def test_messages_name_the_problem_and_never_a_secret() -> None:
    v = errors.classify(s3_error("InvalidAccessKeyId", 403, "The Access Key Id you provided does not exist"))
    assert "access denied (InvalidAccessKeyId)" in v.message and "credentials Secret" in v.message
    v = errors.classify(EndpointConnectionError(endpoint_url="http://s3:9000"))
    assert "cannot connect to the S3 endpoint" in v.message
    v = errors.classify(ApiException(status=503, reason="Service Unavailable"))
    assert v.message == "Kubernetes API: 503 Service Unavailable"


PG: list[tuple[str, type, str]] = [
    (
        'pg_dump: error: connection to server at "db" (10.0.0.5), port 5432 failed: Connection refused',
        T,
        "NetworkError",
    ),
    (
        "pg_dump: error: connection to server on socket failed: FATAL:  the database system is starting up",
        T,
        "NetworkError",
    ),
    ("FATAL:  sorry, too many clients already", T, "NetworkError"),
    ("server closed the connection unexpectedly", T, "NetworkError"),
    ('FATAL:  password authentication failed for user "app"', P, "Refused"),
    ('FATAL:  database "shop" does not exist', P, "Refused"),
    ("ERROR:  permission denied for table orders", P, "Refused"),
    ("pg_dump: error: aborting because of server version mismatch", P, "Refused"),
    ("writing k: access denied (InvalidAccessKeyId); check the credentials Secret", P, "AccessDenied"),
    ("part 3: sha256 mismatch", P, "IntegrityFailed"),
    ("writing k: SlowDown Please reduce your request rate.", T, "StorageUnavailable"),
    ("something new", T, "UnexpectedError"),
]


@pytest.mark.parametrize(("text", "kind", "reason"), PG, ids=[t[:40] for t, _, _ in PG])
def test_classify_text_of_what_the_agent_reports(text: str, kind: type, reason: str) -> None:
    verdict = errors.classify_text(text)
    assert isinstance(verdict, kind) and verdict.reason == reason, verdict


def test_backoff_doubles_from_10_s_and_is_capped_at_60_s() -> None:
    waits, t = [], 0.0
    for _ in range(7):
        w = errors.backoff(t)
        waits.append(w)
        t += w
    assert waits == [10, 10, 20, 40, 60, 60, 60]
