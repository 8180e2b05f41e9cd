"""The local stack's storage and demo: a newcomer's path from `make up` to a backup and a restore.

* A PVC without a storageClassName gets the default StorageClass ``nightjar-local``, and the
  stack's provisioner binds it to a hostPath PV under ``<state>/volumes``; a Pod running as the
  agent's uid writes into it; deleting the PVC deletes the PV and its directory.
* ``python -m nightjar.devstack demo`` (what ``make demo`` runs) makes the demo app, twice without
  harm; then the copy-paste steps it prints (kubectl apply of examples/demo/) give a Completed
  Backup, and after an "accident" a Completed Restore that brings the rows and files back.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar.devstack import provisioner, realnode
from nightjar.devstack.stack import CONTROLLERS, REPO_ROOT
from tests.integration.helpers import G, V, psql
from tests.support import real_node, wait_for

AGENT_UID = 65532


@pytest.fixture(scope="module")
def storage(api_client: client.ApiClient) -> client.StorageV1Api:
    return client.StorageV1Api(api_client)


def _image() -> dict[str, str]:
    if real_node():
        return {"image": realnode.PROJECT_IMAGE, "imagePullPolicy": "Never"}
    return {"image": "busybox"}


def _delete_claim(core: client.CoreV1Api, ns: str, name: str) -> None:
    core.delete_namespaced_persistent_volume_claim(name, ns)
    if "persistentvolumeclaim-protection-controller" not in CONTROLLERS:
        # Without that controller nothing takes the admission's kubernetes.io/pvc-protection
        # finalizer off an unused claim (no Pod uses this one any more).
        try:
            core.patch_namespaced_persistent_volume_claim(name, ns, {"metadata": {"finalizers": None}})
        except ApiException as e:
            if e.status != 404:
                raise


def _gone(read: Any, *args: str) -> bool:
    try:
        read(*args)
    except ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


def test_a_claim_without_a_class_gets_a_local_volume_that_goes_with_it(
    core: client.CoreV1Api, storage: client.StorageV1Api, env: dict[str, str], namespace: str
) -> None:
    sc = storage.read_storage_class(provisioner.CLASS_NAME)
    assert sc.metadata.annotations[provisioner.DEFAULT_CLASS_ANNOTATION] == "true"
    assert (sc.provisioner, sc.reclaim_policy, sc.volume_binding_mode) == (
        provisioner.PROVISIONER,
        "Delete",
        "Immediate",
    )

    t = time.monotonic()
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}},
        },
    )
    pvc = wait_for(
        "the claim bound",
        lambda: (
            (c := core.read_namespaced_persistent_volume_claim("data", namespace)).status.phase == "Bound"
            and c
        ),
        30,
        0.05,
    )
    bound = time.monotonic() - t
    print(f"PVC bound {bound:.2f}s after it was created")
    assert pvc.spec.storage_class_name == provisioner.CLASS_NAME  # the DefaultStorageClass admission
    pv = core.read_persistent_volume(pvc.spec.volume_name)
    volumes = Path(env["NIGHTJAR_STATE_DIR"]).resolve() / "volumes"
    path = volumes / f"{namespace}-data-{pvc.metadata.uid}"
    assert pv.metadata.name == f"pvc-{pvc.metadata.uid}"
    assert pv.metadata.annotations[provisioner.PROVISIONED_BY] == provisioner.PROVISIONER
    assert pv.spec.host_path.path == str(path)
    assert pv.spec.capacity == {"storage": "2Gi"} and pv.spec.access_modes == ["ReadWriteOnce"]
    assert pv.spec.storage_class_name == provisioner.CLASS_NAME
    assert pv.spec.persistent_volume_reclaim_policy == "Delete"
    assert (pv.spec.claim_ref.namespace, pv.spec.claim_ref.name, pv.spec.claim_ref.uid) == (
        namespace,
        "data",
        pvc.metadata.uid,
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o777

    # A Pod of the agent's uid (not root: on the real node a container of the image) writes into it.
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "writer"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsUser": AGENT_UID, "runAsGroup": AGENT_UID, "runAsNonRoot": True},
                "containers": [
                    {
                        "name": "main",
                        **_image(),
                        "command": ["sh", "-c", "mkdir /data/docs && echo hello > /data/docs/hello.txt"],
                        "volumeMounts": [{"name": "v", "mountPath": "/data"}],
                    }
                ],
                "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}],
            },
        },
    )
    wait_for(
        "the writer Pod Succeeded",
        lambda: core.read_namespaced_pod("writer", namespace).status.phase in ("Succeeded", "Failed"),
        120,
    )
    pod = core.read_namespaced_pod("writer", namespace)
    assert pod.status.phase == "Succeeded", pod.status
    written = path / "docs" / "hello.txt"
    assert written.read_text() == "hello\n"
    if real_node():
        assert written.stat().st_uid == AGENT_UID

    core.delete_namespaced_pod("writer", namespace, grace_period_seconds=0)
    wait_for("the writer Pod gone", lambda: _gone(core.read_namespaced_pod, "writer", namespace), 60)
    t = time.monotonic()
    _delete_claim(core, namespace, "data")
    wait_for("the PV deleted", lambda: _gone(core.read_persistent_volume, pv.metadata.name), 60, 0.05)
    print(f"PV deleted {time.monotonic() - t:.2f}s after its claim")
    assert not path.exists()


@pytest.fixture
def demo_namespace(core: client.CoreV1Api, env: dict[str, str]) -> Iterator[str]:
    ns = f"demo-{uuid.uuid4().hex[:8]}"
    yield ns
    with_ns = not _gone(core.read_namespace, ns)
    if with_ns:
        core.delete_namespace(ns)
    db = ns.replace("-", "_")
    psql(env, "postgres", f'drop database if exists "{db}" with (force)')
    psql(env, "postgres", f'drop role if exists "{db}"')


def _demo(env: dict[str, str], ns: str) -> tuple[str, float]:
    t = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "nightjar.devstack",
            "demo",
            "--state",
            env["NIGHTJAR_STATE_DIR"],
            "--namespace",
            ns,
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
    )
    took = time.monotonic() - t
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stdout, res.stdout
    return res.stdout, took


def _kubectl(env: dict[str, str], ns: str, *args: str) -> str:
    res = subprocess.run(
        [env["NIGHTJAR_KUBECTL"], "-n", ns, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
        cwd=REPO_ROOT,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def _phase(custom: client.CustomObjectsApi, ns: str, plural: str, name: str) -> dict[str, Any] | None:
    obj: dict[str, Any] = custom.get_namespaced_custom_object(G, V, ns, plural, name)
    return obj if (obj.get("status") or {}).get("phase") in ("Completed", "Failed") else None


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_demo_backs_up_and_restores_by_copy_paste(
    core: client.CoreV1Api, custom: client.CustomObjectsApi, env: dict[str, str], demo_namespace: str
) -> None:
    ns = demo_namespace
    out, took = _demo(env, ns)
    print(f"demo verb: {took:.1f}s (first run)\n{out}")
    # Copy-paste: the printed steps name the files applied below and the namespace.
    assert f"kubectl -n {ns} apply -f examples/demo/backup.yaml" in out
    assert f"kubectl -n {ns} apply -f examples/demo/restore.yaml" in out
    pvc = core.read_namespaced_persistent_volume_claim("shop-files", ns)
    assert pvc.spec.storage_class_name == provisioner.CLASS_NAME
    _again, took_again = _demo(env, ns)
    print(f"demo verb: {took_again:.1f}s (second run)")
    assert (
        core.read_namespaced_persistent_volume_claim("shop-files", ns).spec.volume_name
        == pvc.spec.volume_name
    )

    db = ns.replace("-", "_")
    files = Path(core.read_persistent_volume(pvc.spec.volume_name).spec.host_path.path) / "data" / "files"
    rows = psql(env, db, "select count(*) from orders")
    assert rows == "1000"
    before = _tree(files)
    assert len(before) > 10 and any(k.startswith("invoices/") for k in before)

    _kubectl(env, ns, "apply", "-f", "examples/demo/backup.yaml")
    backup = wait_for(
        "Backup before-upgrade finished", lambda: _phase(custom, ns, "backups", "before-upgrade"), 240
    )
    assert backup["status"]["phase"] == "Completed", backup["status"].get("message")
    assert backup["status"]["modelVersion"] == "10.4.1"
    assert "Completed" in _kubectl(env, ns, "get", "backups")

    # The accident the instructions cause.
    psql(env, db, "set role " + db + "; delete from orders where id > 100")
    subprocess.run(["rm", "-r", str(files / "invoices")], check=True)
    assert psql(env, db, "select count(*) from orders") == "100"

    _kubectl(env, ns, "apply", "-f", "examples/demo/restore.yaml")
    restore = wait_for(
        "Restore after-the-accident finished",
        lambda: _phase(custom, ns, "restores", "after-the-accident"),
        240,
    )
    assert restore["status"]["phase"] == "Completed", restore["status"].get("message")
    assert psql(env, db, "select count(*) from orders") == rows
    assert _tree(files) == before
