"""Fixtures of the integration tier: the real API server, S3 server and PostgreSQL of the local stack.

Nothing here is mocked. Each test gets a fresh namespace, deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from kubernetes import client, config

from tests.support import stack_env


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def env() -> dict[str, str]:
    return stack_env()


@pytest.fixture(scope="session")
def api_client(env: dict[str, str]) -> client.ApiClient:
    return config.new_client_from_config(env["KUBECONFIG"])


@pytest.fixture(scope="session")
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture(scope="session")
def batch(api_client: client.ApiClient) -> client.BatchV1Api:
    return client.BatchV1Api(api_client)


@pytest.fixture(scope="session")
def apiext(api_client: client.ApiClient) -> client.ApiextensionsV1Api:
    return client.ApiextensionsV1Api(api_client)


@pytest.fixture(scope="session")
def custom(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def namespace(core: client.CoreV1Api) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"nightjar.dev/test": "true"}}})
    yield name
    core.delete_namespace(name)


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
