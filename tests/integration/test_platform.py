"""The local stack is real: the Job controller, the garbage collector, CRD validation, the process
node's env and volumes, MinIO with Object Lock and PostgreSQL all do what a cluster's would."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar.devstack import realnode
from tests.support import agent_owns, hostpath_claim, real_node, running, wait_for


def job(
    name: str,
    command: list[str],
    *,
    backoff_limit: int = 0,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    env: list[dict[str, Any]] | None = None,
    env_from: list[dict[str, Any]] | None = None,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "command": command, **_image()}
    if mounts:
        container["volumeMounts"] = mounts
    if env:
        container["env"] = env
    if env_from:
        container["envFrom"] = env_from
    meta: dict[str, Any] = {"name": name}
    if owner:
        meta["ownerReferences"] = [owner]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [container], "volumes": volumes or []}
            },
        },
    }


def _image() -> dict[str, str]:
    """On the real node, the image ``make image`` built (the node imported it; there is no
    registry); the process node runs the command on its host whatever the image."""
    if real_node():
        return {"image": realnode.PROJECT_IMAGE, "imagePullPolicy": "Never"}
    return {"image": "busybox"}


def api_message(e: ApiException) -> str:
    """The API server's human-readable message, as kubectl prints it."""
    return str(json.loads(e.body)["message"])


def job_condition(batch: client.BatchV1Api, ns: str, name: str) -> str | None:
    j = batch.read_namespaced_job(name, ns)
    for c in j.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return str(c.type)
    return None


def pods_of(core: client.CoreV1Api, ns: str, job_name: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(ns, label_selector=f"job-name={job_name}").items)


def test_process_node_is_registered_and_ready(core: client.CoreV1Api) -> None:
    if real_node():
        pytest.skip("the stack runs the real node (tests/integration/test_real_node.py checks it)")
    nodes = core.list_node(label_selector="nightjar.dev/process-node=true").items
    assert len(nodes) == 1
    ready = {c.type: c.status for c in nodes[0].status.conditions}
    assert ready["Ready"] == "True"


def test_job_writes_a_file_and_an_s3_object_and_completes(
    core: client.CoreV1Api,
    batch: client.BatchV1Api,
    namespace: str,
    env: dict[str, str],
    s3: Any,
    tmp_path: Path,
) -> None:
    key = f"platform/{uuid.uuid4().hex}.txt"
    agent_owns(tmp_path)  # the image runs as 65532
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": env["NIGHTJAR_S3_ACCESS_KEY"],
                "AWS_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_SECRET_KEY"],
            },
        },
    )
    script = (
        "import boto3, os\n"
        "open('/out/hello.txt', 'w').write('hello from a pod')\n"
        "s3 = boto3.client('s3', endpoint_url=os.environ['ENDPOINT'], region_name='us-east-1')\n"
        "s3.put_object(Bucket=os.environ['BUCKET'], Key=os.environ['KEY'], Body=b'object from a pod')\n"
    )
    body = job(
        "writer",
        ["python", "-c", script],
        volumes=[{"name": "out", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
        mounts=[{"name": "out", "mountPath": "/out"}],
        env=[
            {"name": "ENDPOINT", "value": env["NIGHTJAR_S3_ENDPOINT"]},
            {"name": "BUCKET", "value": env["NIGHTJAR_S3_BUCKET_PLAIN"]},
            {"name": "KEY", "value": key},
        ],
        env_from=[{"secretRef": {"name": "s3"}}],
    )
    batch.create_namespaced_job(namespace, body)
    assert (
        wait_for("job writer to finish", lambda: job_condition(batch, namespace, "writer"), 90) == "Complete"
    )
    assert (tmp_path / "hello.txt").read_text() == "hello from a pod"
    assert (
        s3.get_object(Bucket=env["NIGHTJAR_S3_BUCKET_PLAIN"], Key=key)["Body"].read() == b"object from a pod"
    )
    (pod,) = pods_of(core, namespace, "writer")
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_failing_job_with_backoff_limit_2_fails_after_exactly_three_pods(
    core: client.CoreV1Api, batch: client.BatchV1Api, namespace: str
) -> None:
    batch.create_namespaced_job(
        namespace, job("fails", ["sh", "-c", "echo attempt >&2; exit 1"], backoff_limit=2)
    )
    # The Job controller's own backoff (10 s, then 20 s) sits between the attempts.
    assert wait_for("job fails to fail", lambda: job_condition(batch, namespace, "fails"), 150) == "Failed"
    j = batch.read_namespaced_job("fails", namespace)
    reasons = [c.reason for c in j.status.conditions if c.type == "Failed"]
    assert reasons == ["BackoffLimitExceeded"]
    assert j.status.failed == 3
    pods = pods_of(core, namespace, "fails")
    assert len(pods) == 3
    for p in pods:
        assert p.status.phase == "Failed"
        assert p.status.container_statuses[0].state.terminated.exit_code == 1


def test_deleting_the_owner_cascades_to_its_job_and_pods_and_kills_the_process(
    core: client.CoreV1Api, batch: client.BatchV1Api, namespace: str, tmp_path: Path
) -> None:
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
        "blockOwnerDeletion": True,
    }
    body = job(
        "owned",
        ["sh", "-c", "echo $$$$ > /work/pid; exec sleep 600"],
        owner=ref,
        volumes=[{"name": "w", "hostPath": {"path": str(tmp_path)}}],
        mounts=[{"name": "w", "mountPath": "/work"}],
    )
    agent_owns(tmp_path)  # the image runs as 65532
    batch.create_namespaced_job(namespace, body)
    wait_for(
        "pod running",
        lambda: [p for p in pods_of(core, namespace, "owned") if p.status.phase == "Running"],
        60,
    )
    pid = int(wait_for("pid file", lambda: (tmp_path / "pid").read_text().strip(), 30))
    # The process node runs the container as a process of this host; on the real node it is pid
    # 1 of its own pid namespace, and the kubelet removes the Pod only once it has stopped it.
    host_pid = not real_node()
    if host_pid:
        assert Path(f"/proc/{pid}").exists()

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def job_gone() -> bool:
        try:
            batch.read_namespaced_job("owned", namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for("the garbage collector to delete the job", job_gone, 60)
    wait_for("the job's pods to be gone", lambda: not pods_of(core, namespace, "owned"), 60)
    if host_pid:
        wait_for("the pod's process to be killed", lambda: not running(pid), 30)


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.platform-test.nightjar.dev"},
    "spec": {
        "group": "platform-test.nightjar.dev",
        "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.size <= 10 || self.mode == 'Large'",
                                        "message": "a size above 10 needs mode Large",
                                    },
                                ],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "mode": {
                                        "type": "string",
                                        "enum": ["Small", "Large"],
                                        "default": "Small",
                                    },
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_schema_rejects_an_invalid_object_with_the_api_servers_message(
    apiext: client.ApiextensionsV1Api, custom: client.CustomObjectsApi, namespace: str
) -> None:
    try:
        apiext.create_custom_resource_definition(WIDGET_CRD)
    except ApiException as e:
        if e.status != 409:
            raise

    def established() -> bool:
        crd = apiext.read_custom_resource_definition(WIDGET_CRD["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for("widget CRD established", established, 30)
    group, plural = "platform-test.nightjar.dev", "widgets"

    def create(spec: dict[str, Any]) -> Any:
        body = {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": f"w{uuid.uuid4().hex[:6]}"},
            "spec": spec,
        }
        # The CRD was just established: the API server may take a moment to serve it.
        wait_for(
            "widgets served", lambda: custom.list_namespaced_custom_object(group, "v1", namespace, plural), 30
        )
        return custom.create_namespaced_custom_object(group, "v1", namespace, plural, body)

    assert create({"size": 3})["spec"]["mode"] == "Small"  # defaulted by the schema
    with pytest.raises(ApiException) as bad_enum:
        create({"size": 3, "mode": "Huge"})
    assert bad_enum.value.status == 422
    assert 'spec.mode: Unsupported value: "Huge": supported values: "Small", "Large"' in api_message(
        bad_enum.value
    )
    with pytest.raises(ApiException) as bad_min:
        create({"size": 0})
    assert (
        "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"
        in api_message(bad_min.value)
    )
    with pytest.raises(ApiException) as bad_cel:
        create({"size": 20})
    assert "a size above 10 needs mode Large" in api_message(bad_cel.value)


def test_nightjar_crds_are_installed_and_validate(custom: client.CustomObjectsApi, namespace: str) -> None:
    body = {
        "apiVersion": "nightjar.dev/v1alpha1",
        "kind": "Backup",
        "metadata": {"name": "bad"},
        "spec": {
            "storageRef": {"name": "s"},
            "source": {"database": {"secretRef": {"name": "db"}}},
            "contents": "Partial",
        },
    }
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object("nightjar.dev", "v1alpha1", namespace, "backups", body)
    assert 'spec.contents: Unsupported value: "Partial"' in api_message(err.value)


def test_env_from_secret_and_configmap_reaches_the_process(
    core: client.CoreV1Api, batch: client.BatchV1Api, namespace: str
) -> None:
    core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t with spaces", "user": "alice"}},
    )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"}, "data": {"mode": "fast"}})
    script = "import json, os; open('/dev/termination-log', 'w').write(json.dumps(dict(os.environ)))"
    body = job(
        "env",
        ["python", "-c", script],
        env=[
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "GREETING", "value": "hello $(DB_user) in $(MODE) mode, $$(escaped)"},
        ],
        env_from=[{"secretRef": {"name": "creds"}, "prefix": "DB_"}, {"configMapRef": {"name": "settings"}}],
    )
    batch.create_namespaced_job(namespace, body)
    assert wait_for("job env", lambda: job_condition(batch, namespace, "env"), 60) == "Complete"
    (pod,) = pods_of(core, namespace, "env")
    seen = json.loads(pod.status.container_statuses[0].state.terminated.message)
    assert seen["PASSWORD"] == "s3cr3t with spaces"
    assert seen["DB_user"] == "alice"
    assert seen["DB_password"] == "s3cr3t with spaces"
    assert seen["mode"] == seen["MODE"] == "fast"
    assert seen["NS"] == namespace
    assert seen["GREETING"] == "hello alice in fast mode, $(escaped)"


def test_pvc_mounted_directory_is_read_and_written(
    core: client.CoreV1Api, batch: client.BatchV1Api, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "input.txt").write_text("42\n")
    pv_name = hostpath_claim(core, namespace, "files", tmp_path)
    try:
        body = job(
            "pvc",
            ["sh", "-c", "n=$(cat /data/input.txt); echo $((n * 2)) > /data/output.txt"],
            volumes=[{"name": "files", "persistentVolumeClaim": {"claimName": "files"}}],
            mounts=[{"name": "files", "mountPath": "/data", "subPath": "docs"}],
        )
        batch.create_namespaced_job(namespace, body)
        assert wait_for("job pvc", lambda: job_condition(batch, namespace, "pvc"), 60) == "Complete"
        assert (tmp_path / "docs" / "output.txt").read_text() == "84\n"
    finally:
        core.delete_persistent_volume(pv_name)


def test_missing_secret_keeps_the_pod_pending_until_it_exists(
    core: client.CoreV1Api, batch: client.BatchV1Api, namespace: str
) -> None:
    body = job(
        "late",
        ["sh", "-c", 'test "$TOKEN" = abc'],
        env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}],
    )
    batch.create_namespaced_job(namespace, body)

    def config_error() -> str | None:
        for p in pods_of(core, namespace, "late"):
            for cs in p.status.container_statuses or []:
                if cs.state.waiting and cs.state.waiting.reason == "CreateContainerConfigError":
                    return str(cs.state.waiting.message)
        return None

    assert wait_for("CreateContainerConfigError", config_error, 30) == 'secret "later" not found'
    core.create_namespaced_secret(namespace, {"metadata": {"name": "later"}, "stringData": {"token": "abc"}})
    assert wait_for("job late", lambda: job_condition(batch, namespace, "late"), 60) == "Complete"


def test_exit_code_and_custom_termination_message_path_are_reported(
    core: client.CoreV1Api, batch: client.BatchV1Api, namespace: str
) -> None:
    body = job("code", ["sh", "-c", "printf 'disk full' > /tmp/nightjar/result; exit 3"])
    c = body["spec"]["template"]["spec"]["containers"][0]
    c["terminationMessagePath"] = "/tmp/nightjar/result"
    batch.create_namespaced_job(namespace, body)
    assert wait_for("job code", lambda: job_condition(batch, namespace, "code"), 60) == "Failed"
    (pod,) = pods_of(core, namespace, "code")
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason, term.message) == (3, "Error", "disk full")


def test_s3_server_has_a_bucket_with_object_lock_and_one_without(s3: Any, env: dict[str, str]) -> None:
    locked, plain = env["NIGHTJAR_S3_BUCKET_LOCKED"], env["NIGHTJAR_S3_BUCKET_PLAIN"]
    cfg = s3.get_object_lock_configuration(Bucket=locked)["ObjectLockConfiguration"]
    assert cfg["ObjectLockEnabled"] == "Enabled"
    with pytest.raises(ClientError) as no_lock:
        s3.get_object_lock_configuration(Bucket=plain)
    assert no_lock.value.response["Error"]["Code"] == "ObjectLockConfigurationNotFoundError"

    key = f"platform/{uuid.uuid4().hex}"
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    put = s3.put_object(
        Bucket=locked,
        Key=key,
        Body=b"immutable",
        ObjectLockMode="COMPLIANCE",
        ObjectLockRetainUntilDate=until,
    )
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=locked, Key=key, VersionId=put["VersionId"], BypassGovernanceRetention=True)
    # AWS says AccessDenied, MinIO InvalidRequest ("Object is WORM protected"): either way, refused.
    assert refused.value.response["Error"]["Code"] in ("AccessDenied", "InvalidRequest")
    assert s3.get_object(Bucket=locked, Key=key, VersionId=put["VersionId"])["Body"].read() == b"immutable"


def test_postgresql_is_real_and_runs_as_a_non_root_user(env: dict[str, str]) -> None:
    psql = os.path.join(env["NIGHTJAR_PG_BINDIR"], "psql")
    out = subprocess.run(
        [
            psql,
            env["NIGHTJAR_PG_DSN"],
            "-Atc",
            "select current_setting('server_version_num')::int >= 120000, "
            "(select count(*) from pg_stat_activity where backend_type = 'client backend') > 0",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "t|t"
    state = json.loads((Path(env["NIGHTJAR_STATE_DIR"]) / "state.json").read_text())
    (pg,) = [p for p in state["procs"] if p["name"] == "postgres"]
    uid_line = next(
        line for line in Path(f"/proc/{pg['pid']}/status").read_text().splitlines() if line.startswith("Uid:")
    )
    assert int(uid_line.split()[1]) != 0


def test_kubectl_lists_backups_with_nightjars_columns(env: dict[str, str], namespace: str) -> None:
    out = subprocess.run(
        [env["NIGHTJAR_KUBECTL"], "--kubeconfig", env["KUBECONFIG"], "get", "backups", "-n", namespace],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "No resources found" in out.stderr
    explain = subprocess.run(
        [env["NIGHTJAR_KUBECTL"], "--kubeconfig", env["KUBECONFIG"], "explain", "backup.spec.source"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "The app's data to back up." in explain
