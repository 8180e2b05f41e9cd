"""The real node (``up --node real``): a kubelet with containerd runs the stack's Pods as containers
of the Nightjar image, ``kubectl logs``/``exec`` reach them through the API server, and ``down``
leaves nothing of the node on the host.

These tests bring up their own stack (no operator) in a temp directory, beside whatever stack
``make test`` runs. Root only (the node makes interfaces, cgroups and mounts). Cost: about 35 s for
the stack (of which ~15 s import the image into containerd), a few seconds per Pod, ~7 s for
``down``. The image is ``make image``'s ``.local/image/image.tar``; when it is missing the module
first runs ``make image``: about 4 minutes cold (base images made from Debian's packages), about
1 minute once they are cached.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from nightjar.devstack import realnode
from nightjar.devstack.stack import REPO_ROOT, Stack, State, binary
from tests.support import running, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the real node needs root")

IMAGE = realnode.PROJECT_IMAGE
IMAGE_TAR = realnode.PROJECT_IMAGE_TAR


@dataclass
class RealStack:
    stack: Stack
    state: State
    core: client.CoreV1Api
    kubeconfig: Path


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealStack]:
    if not IMAGE_TAR.is_file():
        subprocess.run(["make", "image"], cwd=REPO_ROOT, check=True)
    state_dir = tmp_path_factory.mktemp("real-node") / "stack"
    lines: list[str] = []
    stack = Stack(state_dir, out=lines.append)
    try:
        st = stack.up(with_operator=False, node="real")
        kubeconfig = state_dir / "kubeconfig"
        core = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))
        yield RealStack(stack, st, core, kubeconfig)
    finally:
        stack.down(quiet=True)


@pytest.fixture
def namespace(real: RealStack) -> Iterator[str]:
    name = f"rn-{uuid.uuid4().hex[:8]}"
    real.core.create_namespace({"metadata": {"name": name}})
    # The ServiceAccount admission plugin refuses Pods until the controller made "default".
    wait_for(
        "the default ServiceAccount",
        lambda: real.core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
        30,
    )
    yield name
    real.core.delete_namespace(name)


def _kubectl(real: RealStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary("kubernetes", "kubectl")), f"--kubeconfig={real.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _pod(name: str, command: list[str]) -> dict[str, Any]:
    """A Pod of the Nightjar image as the chart runs it: uid 65532, read-only root, no
    capabilities, limits; no nodeName (the stack's binder puts it on the node)."""
    return {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "runAsNonRoot": True,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "nightjar",
                    "image": IMAGE,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "securityContext": {
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}},
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def test_node_is_ready_with_containerd(real: RealStack) -> None:
    node = real.core.read_node(realnode.NODE_NAME)
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    assert node.status.node_info.container_runtime_version.startswith("containerd://1.6")
    assert [a.address for a in node.status.addresses if a.type == "InternalIP"] == [
        real.state.real_node["node_ip"]
    ]
    # The node lifecycle controller lifts the not-ready taint once the kubelet is Ready.
    wait_for("the not-ready taint to go", lambda: not real.core.read_node(realnode.NODE_NAME).spec.taints, 60)


def test_a_pod_of_the_image_runs_as_a_container_and_its_logs_are_read(
    real: RealStack, namespace: str
) -> None:
    started = time.monotonic()
    real.core.create_namespaced_pod(namespace, _pod("help", ["nightjar", "--help"]))
    pod = wait_for(
        "the Pod to finish",
        lambda: (
            (p := real.core.read_namespaced_pod("help", namespace)).status.phase in ("Succeeded", "Failed")
            and p
        ),
        90,
    )
    print(f"nightjar image Pod: created -> {pod.status.phase} in {time.monotonic() - started:.1f}s")
    assert pod.status.phase == "Succeeded", pod.status
    assert pod.spec.node_name == realnode.NODE_NAME
    (status,) = pod.status.container_statuses
    assert status.container_id.startswith("containerd://")
    assert status.state.terminated.exit_code == 0
    assert status.image_id == realnode.PROJECT_IMAGE_ID.read_text().strip()
    # The kubelet mounted the ServiceAccount token it projected for the Pod.
    assert any(v.projected for v in pod.spec.volumes)

    logs = _kubectl(real, "-n", namespace, "logs", "help")
    assert logs.returncode == 0, logs.stderr
    assert "Usage: nightjar" in logs.stdout


def test_exec_reaches_a_running_container(real: RealStack, namespace: str) -> None:
    real.core.create_namespaced_pod(namespace, _pod("sleeper", ["sleep", "600"]))
    wait_for(
        "the Pod to run",
        lambda: real.core.read_namespaced_pod("sleeper", namespace).status.phase == "Running",
        60,
    )
    got = _kubectl(real, "-n", namespace, "exec", "sleeper", "--", "sh", "-c", "id -u; touch /x 2>&1 || true")
    assert got.returncode == 0, got.stderr
    uid, touch = got.stdout.splitlines()[:2]
    assert uid == "65532"
    assert "Read-only file system" in touch


def test_down_leaves_no_process_mount_interface_or_cgroup(real: RealStack) -> None:
    net = realnode.NodeNet.from_dict(real.state.real_node)
    procs = State.load(real.stack.dir)
    assert procs is not None
    pids = {p.name: p.pid for p in procs.procs}
    assert {"containerd", "kubelet", "pod-binder"} <= set(pids)
    # A Pod still running when the stack goes down: the kubelet must stop it first.
    wait_for(
        "the default ServiceAccount",
        lambda: (
            real.core.list_namespaced_service_account("default", field_selector="metadata.name=default").items
        ),
        30,
    )
    real.core.create_namespaced_pod("default", _pod("left-running", ["sleep", "600"]))
    wait_for(
        "the Pod to run",
        lambda: real.core.read_namespaced_pod("left-running", "default").status.phase == "Running",
        60,
    )

    real.stack.down(quiet=True)

    assert [name for name, pid in pids.items() if running(pid)] == []
    assert realnode.leftovers(real.stack.dir, net) == []
    assert State.load(real.stack.dir) is None
