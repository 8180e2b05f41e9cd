"""Fixtures of the integration tier: the real API server, S3 server and PostgreSQL of the local stack.

Nothing here is mocked. Each test gets a fresh namespace, deleted afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from kubernetes import client

from tests.integration.helpers import SCRATCH_SECRET, psql
from tests.support import hostpath_claim, wait_for


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture
def namespace(core: client.CoreV1Api) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"nightjar.dev/test": "true"}}})
    # As on a real cluster, Pods need the namespace's "default" ServiceAccount, which the
    # serviceaccount controller makes a moment after the namespace: wait for it, so a test's
    # first Pod does not race it.
    wait_for("the default ServiceAccount", lambda: _has_default_sa(core, name), 30)
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException as e:
        if e.status != 404:  # a test that deleted its namespace itself
            raise


def _has_default_sa(core: client.CoreV1Api, ns: str) -> bool:
    return any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(ns).items)


@pytest.fixture(scope="session")
def s3(env: dict[str, str]) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=env["NIGHTJAR_S3_ENDPOINT"],
        aws_access_key_id=env["NIGHTJAR_S3_ACCESS_KEY"],
        aws_secret_access_key=env["NIGHTJAR_S3_SECRET_KEY"],
        region_name=env["NIGHTJAR_S3_REGION"],
        config=Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture
def app_db(env: dict[str, str], namespace: str, core: client.CoreV1Api) -> Iterator[str]:
    """A database with known rows and a role whose password is in the Secret "db"."""
    db = f"app_{namespace.replace('-', '_')}"
    password = uuid.uuid4().hex
    psql(env, "postgres", f"create role {db} login password '{password}'")
    psql(env, "postgres", f"create database {db} owner {db}")
    psql(
        env,
        db,
        f"""
        set role {db};
        create table customers (id int primary key, name text, note text);
        create table orders (id bigserial primary key, customer int references customers, total numeric(10,2),
                             placed timestamptz, tags text[]);
        insert into customers
          select g, 'customer ' || g, case when g % 7 = 0 then null else repeat('x', g % 50) end
          from generate_series(1, 500) g;
        insert into orders (customer, total, placed, tags)
          select 1 + g % 500, (g * 1.37)::numeric(10,2), '2026-01-01'::timestamptz + g * interval '1 hour',
                 array['a' || g % 3, 'b'] from generate_series(1, 5000) g;
    """,
    )
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "db"},
            "stringData": {
                "host": env["NIGHTJAR_PG_HOST"],
                "port": env["NIGHTJAR_PG_PORT"],
                "dbname": db,
                "user": db,
                "password": password,
            },
        },
    )
    yield db
    subprocess.run(
        [
            os.path.join(env["NIGHTJAR_PG_BINDIR"], "psql"),
            env["NIGHTJAR_PG_DSN"],
            "-qc",
            f"drop database if exists {db} with (force)",
        ],
        capture_output=True,
        check=False,
    )


@pytest.fixture
def files_pvc(core: client.CoreV1Api, namespace: str, tmp_path: Path) -> Iterator[Path]:
    """A PVC (hostPath PV) holding a few hundred files, nested dirs and odd names."""
    root = tmp_path / "pv"
    docs = root / "docs"
    for i in range(300):
        d = docs / f"{i % 10:02d}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file-{i}.bin").write_bytes(hashlib.sha256(str(i).encode()).digest() * (i % 40 + 1))
    odd = docs / "odd names"
    odd.mkdir()
    for name in [
        "with space.txt",
        "quote'and\"double.txt",
        "ünïcødé-файл.txt",
        "semi;colon $(x) `y`.txt",
        "-leading-dash",
        ".hidden",
    ]:
        (odd / name).write_text(f"content of {name}\n")
    (docs / "empty-dir").mkdir()
    (docs / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    (docs / "link").symlink_to("odd names/with space.txt")
    pv = hostpath_claim(core, namespace, "files", root)
    yield docs
    core.delete_persistent_volume(pv)


class Env:
    """A second environment: namespace, empty database with its Secret "db", files PVC "files"."""

    def __init__(self, ns: str, db: str, files: Path) -> None:
        self.ns, self.db, self.files = ns, db, files


@pytest.fixture
def acceptance(core: client.CoreV1Api, env: dict[str, str], tmp_path: Path) -> Iterator[Env]:
    ns = f"acc-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns, "labels": {"nightjar.dev/test": "true"}}})
    wait_for("the default ServiceAccount", lambda: _has_default_sa(core, ns), 30)
    db = f"acc_{ns.replace('-', '_')}"
    password = uuid.uuid4().hex
    psql(env, "postgres", f"create role {db} login password '{password}'")
    psql(env, "postgres", f"create database {db} owner {db}")
    # What acceptance held before: an older customers table with other rows.
    psql(
        env,
        db,
        f"set role {db}; create table customers (id int primary key, name text, note text);"
        " insert into customers values (1, 'stale', 'old');",
    )
    core.create_namespaced_secret(
        ns,
        {
            "metadata": {"name": "db"},
            "stringData": {
                "host": env["NIGHTJAR_PG_HOST"],
                "port": env["NIGHTJAR_PG_PORT"],
                "dbname": db,
                "user": db,
                "password": password,
            },
        },
    )
    root = tmp_path / "acc-pv"
    docs = root / "docs"
    (docs / "00").mkdir(parents=True)
    (docs / "00" / "stale.bin").write_bytes(b"stale")
    (docs / "only-in-acceptance").mkdir()
    (docs / "only-in-acceptance" / "x.txt").write_text("x")
    pv = hostpath_claim(core, ns, "files", root)
    yield Env(ns, db, docs)
    core.delete_persistent_volume(pv)
    core.delete_namespace(ns)
    psql(env, "postgres", f"drop database if exists {db} with (force)")


@pytest.fixture
def scratch(env: dict[str, str], namespace: str, core: client.CoreV1Api) -> Iterator[str]:
    """A role on the stack's PostgreSQL that may create databases, in the Secret "scratch-pg"
    (no dbname: the drill connects to postgres first)."""
    role = f"drill_{namespace.replace('-', '_')}"
    password = uuid.uuid4().hex
    psql(env, "postgres", f"create role {role} login createdb password '{password}'")
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": SCRATCH_SECRET},
            "stringData": {
                "host": env["NIGHTJAR_PG_HOST"],
                "port": env["NIGHTJAR_PG_PORT"],
                "user": role,
                "password": password,
            },
        },
    )
    yield role
    owned = psql(
        env,
        "postgres",
        f"select datname from pg_database where pg_get_userbyid(datdba) = '{role}'",
    )
    for db in owned.splitlines():
        psql(env, "postgres", f'drop database if exists "{db}" with (force)')
    psql(env, "postgres", f"drop role if exists {role}")
