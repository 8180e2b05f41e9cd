"""Fixtures every stack-backed tier shares: the running local stack's endpoints and API clients.

Lazy: the unit tier never asks for them, so it needs no stack.
"""

from __future__ import annotations

import pytest
from kubernetes import client, config

from tests.support import stack_env


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
def apps(api_client: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api_client)


@pytest.fixture(scope="session")
def apiext(api_client: client.ApiClient) -> client.ApiextensionsV1Api:
    return client.ApiextensionsV1Api(api_client)


@pytest.fixture(scope="session")
def custom(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)
