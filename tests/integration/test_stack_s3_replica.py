"""The stack's two S3 servers (primary and replica): independent endpoints and keys, Object Lock on
both, and one can be stopped and started again while the other keeps serving."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from nightjar.devstack.stack import S3_SERVERS, Stack
from tests.support import stopped_s3

OTHER = {"primary": "replica", "replica": "primary"}


def _client(env: dict[str, str], which: str, keys_of: str | None = None) -> Any:
    """A client of S3 server ``which`` using the keys of ``keys_of`` (default: its own)."""
    prefix, keys = S3_SERVERS[which].env_prefix, S3_SERVERS[keys_of or which].env_prefix
    return boto3.client(
        "s3",
        endpoint_url=env[f"{prefix}ENDPOINT"],
        aws_access_key_id=env[f"{keys}ACCESS_KEY"],
        aws_secret_access_key=env[f"{keys}SECRET_KEY"],
        region_name=env[f"{prefix}REGION"],
        # One attempt: a refused connection fails at once instead of being retried.
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2),
    )


def _bucket(env: dict[str, str], which: str, kind: str) -> str:
    return env[f"{S3_SERVERS[which].env_prefix}BUCKET_{kind}"]


def _refuses(endpoint: str) -> bool:
    url = urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _pid(env: dict[str, str], which: str) -> int:
    st, alive, _dead = Stack(Path(env["NIGHTJAR_STATE_DIR"])).status()
    assert st is not None
    return next(p.pid for p in alive if p.name == S3_SERVERS[which].proc)


def test_env_names_both_servers_with_their_own_endpoint_keys_and_buckets(env: dict[str, str]) -> None:
    assert env["NIGHTJAR_S3_BUCKET_LOCKED"] == "nightjar-locked"
    assert env["NIGHTJAR_S3_BUCKET_PLAIN"] == "nightjar-plain"
    assert env["NIGHTJAR_S3_REPLICA_BUCKET_LOCKED"] == "nightjar-replica-locked"
    assert env["NIGHTJAR_S3_REPLICA_BUCKET_PLAIN"] == "nightjar-replica-plain"
    for name in ("ENDPOINT", "ACCESS_KEY", "SECRET_KEY"):
        assert env[f"NIGHTJAR_S3_{name}"] != env[f"NIGHTJAR_S3_REPLICA_{name}"]


@pytest.mark.parametrize("which", ["primary", "replica"])
def test_each_server_serves_its_buckets_to_its_keys_only(env: dict[str, str], which: str) -> None:
    names = {b["Name"] for b in _client(env, which).list_buckets()["Buckets"]}
    assert names == {_bucket(env, which, "LOCKED"), _bucket(env, which, "PLAIN")}
    with pytest.raises(ClientError) as e:
        _client(env, which, keys_of=OTHER[which]).list_buckets()
    assert e.value.response["Error"]["Code"] == "InvalidAccessKeyId"


@pytest.mark.parametrize("which", ["primary", "replica"])
def test_the_locked_bucket_has_object_lock_and_the_plain_one_has_not(env: dict[str, str], which: str) -> None:
    s3 = _client(env, which)
    cfg = s3.get_object_lock_configuration(Bucket=_bucket(env, which, "LOCKED"))
    assert cfg["ObjectLockConfiguration"]["ObjectLockEnabled"] == "Enabled"
    assert s3.get_bucket_versioning(Bucket=_bucket(env, which, "LOCKED"))["Status"] == "Enabled"
    with pytest.raises(ClientError) as e:
        s3.get_object_lock_configuration(Bucket=_bucket(env, which, "PLAIN"))
    assert e.value.response["Error"]["Code"] == "ObjectLockConfigurationNotFoundError"


@pytest.mark.parametrize("which", ["replica", "primary"])
def test_a_stopped_server_refuses_connections_and_comes_back_with_its_objects(
    env: dict[str, str], which: str
) -> None:
    other = OTHER[which]
    s3, s3_other = _client(env, which), _client(env, other)
    key = f"stack-test/{uuid.uuid4().hex}"
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    locked = s3.put_object(
        Bucket=_bucket(env, which, "LOCKED"),
        Key=key,
        Body=b"locked bytes",
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=until,
    )
    s3.put_object(Bucket=_bucket(env, which, "PLAIN"), Key=key, Body=b"plain bytes")
    s3_other.put_object(Bucket=_bucket(env, other, "PLAIN"), Key=key, Body=b"other bytes")
    other_pid = _pid(env, other)

    with stopped_s3(which) as endpoint:
        assert endpoint == env[f"{S3_SERVERS[which].env_prefix}ENDPOINT"]
        assert _refuses(endpoint)
        with pytest.raises(EndpointConnectionError):
            s3.get_object(Bucket=_bucket(env, which, "PLAIN"), Key=key)
        # The stack is not broken: the server is stopped on purpose.
        st, _alive, dead = Stack(Path(env["NIGHTJAR_STATE_DIR"])).status()
        assert st is not None and dead == [] and S3_SERVERS[which].proc in st.stopped
        # The other server does not notice.
        got = s3_other.get_object(Bucket=_bucket(env, other, "PLAIN"), Key=key)
        assert got["Body"].read() == b"other bytes"
        s3_other.put_object(Bucket=_bucket(env, other, "PLAIN"), Key=key + "-during", Body=b"x")

    # Back on the same endpoint with the same keys: the clients made before the stop work, and
    # every object (the locked version with its retention) is there.
    assert not _refuses(env[f"{S3_SERVERS[which].env_prefix}ENDPOINT"])
    assert s3.get_object(Bucket=_bucket(env, which, "PLAIN"), Key=key)["Body"].read() == b"plain bytes"
    got = s3.get_object(Bucket=_bucket(env, which, "LOCKED"), Key=key, VersionId=locked["VersionId"])
    assert got["Body"].read() == b"locked bytes"
    assert got["ObjectLockMode"] == "GOVERNANCE"
    assert got["ObjectLockRetainUntilDate"] >= until - dt.timedelta(seconds=1)
    with pytest.raises(ClientError):
        s3.delete_object(Bucket=_bucket(env, which, "LOCKED"), Key=key, VersionId=locked["VersionId"])
    assert _pid(env, other) == other_pid
    assert s3_other.head_object(Bucket=_bucket(env, other, "PLAIN"), Key=key + "-during")


def test_the_cli_stops_and_starts_a_server_and_status_calls_the_stack_healthy(env: dict[str, str]) -> None:
    state = env["NIGHTJAR_STATE_DIR"]

    def devstack(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nightjar.devstack", *args, "--state", state],
            capture_output=True,
            text=True,
            check=False,
        )

    s3 = _client(env, "replica")
    key = f"stack-test/{uuid.uuid4().hex}"
    s3.put_object(Bucket=_bucket(env, "replica", "PLAIN"), Key=key, Body=b"via cli")
    try:
        stop = devstack("s3", "stop", "replica")
        assert stop.returncode == 0, stop.stderr
        assert _refuses(env["NIGHTJAR_S3_REPLICA_ENDPOINT"])
        status = devstack("status")
        assert status.returncode == 0, status.stdout
        assert "minio-replica" in status.stdout and "stopped" in status.stdout
        assert "NOT RUNNING" not in status.stdout
        assert "already stopped" in devstack("s3", "stop", "replica").stdout
    finally:
        start = devstack("s3", "start", "replica")
    assert start.returncode == 0, start.stderr
    assert s3.get_object(Bucket=_bucket(env, "replica", "PLAIN"), Key=key)["Body"].read() == b"via cli"
    assert "already running" in devstack("s3", "start", "replica").stdout
    status = devstack("status")
    assert status.returncode == 0 and "stopped" not in status.stdout
