"""The e2e tier: the Helm chart installed for real into the local stack.

`make test` brings up a second stack for this tier *without* the developer operator
(`devstack up --no-operator`): the only operator is the chart's Deployment. On the real node (the
default) its Pod is a container of the image `make image` built, run by the kubelet as uid 65532
with a read-only root filesystem, the chart's resources and the ServiceAccount token the kubelet
projects; its Jobs are containers of the same image. On the process node (`E2E_NODE=process`) the
Pod is a local process with the chart's ServiceAccount token. Either way nothing has admin
credentials: whatever works here works because the chart's RBAC allows it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar.devstack import realnode
from nightjar.devstack.stack import binary, free_port, postgres_bindir
from tests.support import real_node, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "nightjar"
RELEASE, SYSTEM_NS = "nightjar", "nightjar-system"
#: Watched by the release; OUTSIDER is not.
WATCHED = ("shop", "shop-acceptance")
OUTSIDER = "outsider"
IMAGE = "ghcr.io/nightjar-dev/nightjar"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)


class Helm:
    """The pinned helm binary against the stack (its caches in a temp dir, not in $HOME)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.exe = str(binary("helm", "helm"))
        home = tempfile.mkdtemp(prefix="nightjar-helm-")
        self.env = {
            **os.environ,
            "KUBECONFIG": env["KUBECONFIG"],
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [self.exe, *args], env=self.env, capture_output=True, text=True, timeout=300, check=False
        )
        if check and out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out


@pytest.fixture(scope="session")
def helm(env: dict[str, str]) -> Helm:
    return Helm(env)


def kubectl(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [env["NIGHTJAR_KUBECTL"], "--kubeconfig", env["KUBECONFIG"], *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def install_values(metrics_port: int) -> list[str]:
    """The release's settings: only what differs on the local stack from a real cluster."""
    common = [
        f"--set=watchNamespaces={{{','.join(WATCHED)}}}",
        # Quick sweeps, so schedules and GC act within a test's patience.
        "--set=operator.schedulerIntervalSeconds=3",
        "--set=operator.gcIntervalSeconds=5",
    ]
    if real_node():
        # The image `make image` built, which the node imported: there is no registry to pull from.
        repository, tag = realnode.PROJECT_IMAGE.split(":")
        return [
            *common,
            f"--set=image.repository={repository}",
            f"--set=image.tag={tag}",
            "--set=image.pullPolicy=Never",
            "--set=agent.pullPolicy=Never",
        ]
    return [
        *common,
        f"--set=image.repository={IMAGE}",
        # Every process of the process node shares this host's ports.
        f"--set=metrics.port={metrics_port}",
        "--set=metrics.service.port=8080",
        # The process node runs agents on this host: where its PostgreSQL client tools are.
        f"--set=agent.env.NIGHTJAR_PG_BINDIR={postgres_bindir()}",
    ]


class Release:
    def __init__(self, metrics_port: int) -> None:
        self.metrics_port = metrics_port
        self.metrics_host = "127.0.0.1"
        self.service_account = RELEASE  # fullname: release "nightjar" of chart "nightjar"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_host}:{self.metrics_port}/metrics"


def operator_pods(core: client.CoreV1Api) -> list[Any]:
    pods = core.list_namespaced_pod(
        SYSTEM_NS, label_selector="app.kubernetes.io/name=nightjar,app.kubernetes.io/component=operator"
    ).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def lease_holder(api_client: client.ApiClient) -> str:
    lease = client.CoordinationV1Api(api_client).read_namespaced_lease(RELEASE, SYSTEM_NS)
    return str(lease.spec.holder_identity or "")


@pytest.fixture(scope="session")
def release(
    env: dict[str, str], helm: Helm, core: client.CoreV1Api, api_client: client.ApiClient
) -> Iterator[Release]:
    """The chart installed once for the session, into PodSecurity-restricted namespaces."""
    restricted = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    for ns in (SYSTEM_NS, *WATCHED, OUTSIDER):
        try:
            core.create_namespace({"metadata": {"name": ns, "labels": restricted}})
        except ApiException as e:
            if e.status != 409:
                raise
    # On the real node the operator serves metrics on the chart's port in its own network
    # namespace, reached from this host at the Pod's IP (the stack runs no kube-proxy).
    rel = Release(8080 if real_node() else free_port())
    helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        SYSTEM_NS,
        "--wait",
        "--timeout=3m",
        *install_values(rel.metrics_port),
    )
    # A Lease left by an earlier release expires within its 15 s before the new Pod takes it.
    wait_for(
        "the operator Pod to lead",
        lambda: (pods := operator_pods(core)) and lease_holder(api_client) == pods[0].metadata.name,
        60,
    )
    if real_node():
        rel.metrics_host = operator_pods(core)[0].status.pod_ip
    yield rel
    helm("uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", "--timeout=2m", check=False)
