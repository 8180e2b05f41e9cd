"""Shared helpers for the integration and e2e tiers: the local stack's endpoints and polling."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from nightjar.config import OperatorConfig
from nightjar.devstack import realnode
from nightjar.devstack.stack import S3_SERVERS, Stack, parse_env

T = TypeVar("T")
CHART_VALUES = Path(__file__).resolve().parents[1] / "charts" / "nightjar" / "values.yaml"


def stack_env() -> dict[str, str]:
    """The `export` lines of the running stack (``make test`` brings one up in .local/test)."""
    state = Path(os.environ.get("NIGHTJAR_STATE_DIR", ".local"))
    envf = state / "env"
    if not envf.is_file():
        raise RuntimeError(
            f"no local stack at {state} (no {envf}): run the tests with `make test`, or `make up` first"
        )
    return parse_env(envf)


def s3_endpoint(which: str) -> str:
    """The endpoint URL of S3 server ``which`` ("primary" or "replica") in the running stack."""
    return stack_env()[f"{S3_SERVERS[which].env_prefix}ENDPOINT"]


@contextlib.contextmanager
def stopped_s3(which: str) -> Iterator[str]:
    """S3 server ``which`` ("primary" or "replica") is down inside the block: its endpoint (yielded)
    refuses connections. Afterwards it always runs again, on the same endpoint, keys and data."""
    stack = Stack(Path(stack_env()["NIGHTJAR_STATE_DIR"]), out=lambda _line: None)
    endpoint = s3_endpoint(which)
    stack.stop_s3(which)
    try:
        yield endpoint
    finally:
        stack.start_s3(which)


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.25) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except Exception as e:  # the object may not exist yet
            last_exc = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}"
        + (f" (last error: {last_exc})" if last_exc else "")
    )


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def real_node() -> bool:
    """The running stack's Pods are containers under a real kubelet (``up --node real``)."""
    return stack_env().get("NIGHTJAR_NODE") == "real"


def agent_owns(path: Path) -> None:
    """On the real node, ``path`` (and all below it) belongs to the agent's uid, as a volume that
    a provisioner made for the Pod's fsGroup would be writable to it: a hostPath volume gets no
    fsGroup, and the agent runs as 65532, not as the root that wrote the test's files. The process
    node runs every container as this host's user: nothing to do there."""
    if not real_node():
        return
    uid = OperatorConfig.agent_run_as_user
    os.chown(path, uid, uid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


def hostpath_claim(core: Any, namespace: str, claim: str, path: Path) -> str:
    """A hostPath PV pre-bound to a new PVC ``claim``, bound by the real PV controller. The
    directory is made the agent's (see :func:`agent_owns`).

    Returns the PV's name (cluster-scoped: the caller deletes it).
    """
    agent_owns(path)
    pv = f"pv-{namespace}-{claim}"
    core.create_persistent_volume(
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "manual",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(path)},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "manual",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    wait_for(
        "the PV controller to bind the claim",
        lambda: core.read_namespaced_persistent_volume_claim(claim, namespace).status.phase == "Bound",
        60,
    )
    return pv


def read_stream(stream: Any) -> bytes:
    """Everything a verified snapshot stream gives (its checks run at its end)."""
    out = bytearray()
    while data := stream.read(1 << 20):
        out += data
    return bytes(out)


def _seconds(a: dt.datetime, b: dt.datetime) -> float:
    return (b - a).total_seconds()


def assert_runs_in_the_image(pod: Any) -> str:
    """The Pod ran to success as a container of the built image, as the chart runs agents; returns
    a line with its timings."""
    name = f"{pod.metadata.namespace}/{pod.metadata.name}"
    assert pod.status.phase == "Succeeded", (name, pod.status)
    assert pod.spec.node_name == realnode.NODE_NAME
    (status,) = pod.status.container_statuses
    assert status.container_id.startswith("containerd://"), name
    assert status.image_id == realnode.PROJECT_IMAGE_ID.read_text().strip(), name
    (container,) = pod.spec.containers
    assert container.image == realnode.PROJECT_IMAGE
    assert pod.spec.security_context.run_as_user == 65532
    assert pod.spec.security_context.run_as_non_root is True
    assert container.security_context.read_only_root_filesystem is True
    assert container.security_context.allow_privilege_escalation is False
    agent = yaml.safe_load(CHART_VALUES.read_text(encoding="utf-8"))["agent"]["resources"]
    assert container.resources.requests == agent["requests"], name
    assert container.resources.limits == agent["limits"], name
    term = status.state.terminated
    assert term.exit_code == 0, name
    created = pod.metadata.creation_timestamp
    return (
        f"{name}: created -> container started {_seconds(created, term.started_at):.0f}s, "
        f"ran {_seconds(term.started_at, term.finished_at):.0f}s"
    )
