"""The process node gives a Pod its ServiceAccount's token, as the admission plugin and a kubelet
do: a process in the Pod talks to the real API server as that ServiceAccount, so RBAC applies
(what the chart's e2e test relies on), and a Pod whose ServiceAccount is missing does not run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.support import wait_for

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.fixture(autouse=True)
def _process_node_only(env: dict[str, str]) -> None:
    if env.get("NIGHTJAR_NODE") == "real":
        pytest.skip(
            "exercises the process node's stand-in for the ServiceAccount admission plugin and the "
            "kubelet's token mount; on the real node those are the real ones (the restore Job's "
            "progress and the e2e chart use them)"
        )


# Run by the Pod. It reads its namespace from the in-cluster path (the node rewrites it to the
# Pod's own directory) and talks to the API with the kubeconfig in $KUBECONFIG, as kopf and the
# kubernetes client do when in-cluster loading is impossible.
PROBE = f"""
import json, os
from kubernetes import client, config
from kubernetes.client.rest import ApiException

config.load_kube_config()
api = client.ApiClient()
ns = open("{SA_DIR}/namespace").read()
out = {{"namespace": ns, "kubeconfig": os.environ.get("KUBECONFIG", "")}}
review = client.AuthenticationV1Api(api).create_self_subject_review(
    {{"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}}
)
out["user"] = review.status.user_info.username
bearer = api.configuration.api_key["BearerToken"].split()[-1]
out["token_file_matches"] = open("{SA_DIR}/token").read() == bearer
core = client.CoreV1Api(api)
out["configmap"] = core.read_namespaced_config_map("allowed", ns).data["k"]
try:
    core.read_namespaced_secret("hidden", ns)
    out["secret"] = 200
except ApiException as e:
    out["secret"] = e.status
open("/dev/termination-log", "w").write(json.dumps(out))
"""


def _rbac(api_client: client.ApiClient, ns: str, sa: str) -> None:
    """``sa`` may get the ConfigMap "allowed" and nothing else."""
    rbac = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "read-allowed"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": ["allowed"],
                    "verbs": ["get"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "read-allowed"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-allowed"},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
        },
    )


def _pod(name: str, sa: str, command: list[str], restart: str = "Never") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "serviceAccountName": sa,
            "restartPolicy": restart,
            "containers": [{"name": "main", "image": "python:3", "command": command}],
        },
    }


def _finished(core: client.CoreV1Api, ns: str, name: str) -> client.V1Pod:
    def done() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, ns)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    return wait_for(f"Pod {name} to finish", done, 60)


def test_pod_talks_to_the_api_as_its_service_account_and_rbac_applies(
    core: client.CoreV1Api, api_client: client.ApiClient, namespace: str
) -> None:
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "allowed"}, "data": {"k": "v"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "hidden"}, "stringData": {"k": "s"}})
    _rbac(api_client, namespace, "reader")
    core.create_namespaced_pod(namespace, _pod("probe", "reader", [sys.executable, "-c", PROBE]))

    pod = _finished(core, namespace, "probe")
    term = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Succeeded", term
    out = json.loads(term.message)
    assert out["user"] == f"system:serviceaccount:{namespace}:reader"
    assert out["namespace"] == namespace
    assert out["configmap"] == "v"  # the Role allows it
    assert out["secret"] == 403  # nothing else: no admin credentials leaked into the Pod
    assert out["token_file_matches"]
    assert out["kubeconfig"].endswith("/serviceaccount/kubeconfig")


def test_pod_that_opts_out_gets_no_credentials(
    core: client.CoreV1Api, api_client: client.ApiClient, namespace: str
) -> None:
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    script = (
        "import json, os\n"
        f"out = {{'kubeconfig': os.environ.get('KUBECONFIG'), 'token': os.path.exists('{SA_DIR}/token')}}\n"
        "open('/dev/termination-log', 'w').write(json.dumps(out))\n"
    )
    body = _pod("no-token", "reader", [sys.executable, "-c", script])
    body["spec"]["automountServiceAccountToken"] = False
    core.create_namespaced_pod(namespace, body)
    pod = _finished(core, namespace, "no-token")
    assert pod.status.phase == "Succeeded"
    assert json.loads(pod.status.container_statuses[0].state.terminated.message) == {
        "kubeconfig": None,
        "token": False,
    }


def test_pod_whose_service_account_is_missing_does_not_run_and_says_why(
    core: client.CoreV1Api, namespace: str, env: dict[str, str]
) -> None:
    marker = Path(env["NIGHTJAR_STATE_DIR"]) / "node" / f"ran-{namespace}"
    core.create_namespaced_pod(
        namespace, _pod("ghost-pod", "ghost", [sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    )

    def refused() -> client.V1Pod | None:
        pod = core.read_namespaced_pod("ghost-pod", namespace)
        return pod if pod.status.message == 'serviceaccount "ghost" not found' else None

    pod = wait_for("the Pod to say its ServiceAccount is missing", refused, 30)
    assert pod.status.phase == "Pending"
    assert pod.status.reason == "ServiceAccountNotFound"
    waiting = pod.status.container_statuses[0].state.waiting
    assert waiting.reason == "CreateContainerConfigError"
    assert waiting.message == 'serviceaccount "ghost" not found'
    assert not marker.exists()

    # Like a kubelet retrying its volume mount: once the ServiceAccount exists, the Pod runs.
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "ghost"}})
    pod = _finished(core, namespace, "ghost-pod")
    assert pod.status.phase == "Succeeded"
    assert pod.status.reason is None and pod.status.message is None
    assert marker.exists()
    marker.unlink()


def test_deployment_pod_is_running_and_ready_with_its_token_and_logs_on_the_node(
    core: client.CoreV1Api, api_client: client.ApiClient, namespace: str, env: dict[str, str]
) -> None:
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "allowed"}, "data": {"k": "v"}})
    _rbac(api_client, namespace, "reader")
    script = (
        "import time\n"
        "from kubernetes import client, config\n"
        "config.load_kube_config()\n"
        "ns = open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read()\n"
        "print('read', client.CoreV1Api().read_namespaced_config_map('allowed', ns).data['k'], flush=True)\n"
        "time.sleep(3600)\n"
    )
    tmpl = _pod("app", "reader", [sys.executable, "-c", script], restart="Always")
    apps = client.AppsV1Api(api_client)
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "app"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "app"}}, "template": tmpl},
        },
    )

    def available() -> bool:
        d = apps.read_namespaced_deployment("app", namespace)
        return (d.status.available_replicas or 0) == 1

    wait_for("the Deployment to be available", available, 60)
    [pod] = core.list_namespaced_pod(namespace, label_selector="app=app").items
    assert pod.status.phase == "Running"
    conditions = {c.type: c.status for c in pod.status.conditions}
    assert conditions["Ready"] == "True"
    assert conditions["ContainersReady"] == "True"
    status = pod.status.container_statuses[0]
    assert status.ready and status.started and status.state.running is not None

    log = Path(env["NIGHTJAR_STATE_DIR"]) / "node" / "logs" / f"{namespace}_{pod.metadata.name}_main.log"
    wait_for(f"{log} to say the ConfigMap was read", lambda: log.is_file() and "read v" in log.read_text())
