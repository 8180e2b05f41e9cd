"""The Helm chart: lint, manifests the real API server accepts, and RBAC that is enough but no more."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar import __version__
from nightjar.domain.residency import Policy
from tests.e2e.conftest import (
    CHART,
    OUTSIDER,
    RELEASE,
    SYSTEM_NS,
    WATCHED,
    Helm,
    Release,
    kubectl,
    lease_holder,
    operator_pods,
)

VARIANTS = {
    "defaults (every namespace)": [],
    "watched namespaces, two replicas": ["--set=watchNamespaces={a,b}", "--set=replicaCount=2"],
    "no metrics, no leader election": ["--set=metrics.enabled=false", "--set=leaderElection.enabled=false"],
    "own residency policy": [
        "--set=residencyPolicy.rules[0].name=eu-and-ch",
        "--set=residencyPolicy.rules[0].primary={EU,CH}",
        "--set=residencyPolicy.rules[0].replicasIn={EU,CH}",
    ],
    "pinned digest, own agent image": [
        "--set=image.digest=sha256:" + "ab" * 32,
        "--set=agent.image.repository=registry.example/nightjar-agent",
        "--set=agent.image.tag=1.2.3",
    ],
    "alerts, dashboard, ServiceMonitor": [
        "--set=prometheusRule.enabled=true",
        "--set=prometheusRule.labels.release=kube-prometheus-stack",
        "--set=grafanaDashboard.enabled=true",
        "--set=metrics.serviceMonitor.enabled=true",
    ],
}
#: The stack has no Prometheus Operator: a minimal copy of its CRDs' schemas (PrometheusRule,
#: ServiceMonitor) lets the API server check those objects in the dry run.
MONITORING_CRDS = Path(__file__).resolve().parents[1] / "fixtures" / "monitoring" / "crds.yaml"


def render(helm: Helm, *args: str) -> list[dict[str, Any]]:
    out = helm("template", "nj", str(CHART), "--namespace", "nj-render", "--include-crds", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint_is_clean(helm: Helm) -> None:
    for args in VARIANTS.values():
        out = helm("lint", "--strict", str(CHART), *args)
        assert "0 chart(s) failed" in out.stdout, out.stdout


def test_chart_version_is_the_operators() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__ and chart["version"] == __version__


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_manifests_are_accepted_by_the_api_server(
    helm: Helm, env: dict[str, str], variant: str
) -> None:
    docs = render(helm, *VARIANTS[variant])
    kinds = sorted({d["kind"] for d in docs})
    assert "Deployment" in kinds and "ServiceAccount" in kinds
    if {"PrometheusRule", "ServiceMonitor"} & set(kinds):
        out = kubectl(env, "apply", "-f", str(MONITORING_CRDS))
        assert out.returncode == 0, out.stderr
        for crd in ("prometheusrules", "servicemonitors"):
            out = kubectl(env, "wait", "--for=condition=Established", f"crd/{crd}.monitoring.coreos.com")
            assert out.returncode == 0, out.stderr
    # Namespaced objects need their namespaces to exist for a server-side dry run.
    for ns in {d["metadata"].get("namespace") for d in docs} - {None}:
        kubectl(env, "create", "namespace", ns)
    out = kubectl(env, "apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(docs))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(server dry run)") == len(docs)


def test_bad_values_are_refused_with_a_readable_message(helm: Helm) -> None:
    out = helm("template", "nj", str(CHART), "--set=watchNamespaces={Not_A_Namespace}", check=False)
    assert out.returncode != 0 and "watchNamespaces" in out.stderr
    out = helm("template", "nj", str(CHART), "--set=defaultRetention.onDemand=3 months", check=False)
    assert out.returncode != 0 and "defaultRetention" in out.stderr
    out = helm(
        "template",
        "nj",
        str(CHART),
        "--set=replicaCount=2",
        "--set=leaderElection.enabled=false",
        check=False,
    )
    assert out.returncode != 0 and "leaderElection" in out.stderr
    out = helm("template", "nj", str(CHART), "--kube-version=1.29.5", check=False)
    assert out.returncode != 0 and "kubeVersion" in out.stderr


def test_the_stack_reports_a_real_kubernetes_version(env: dict[str, str]) -> None:
    # helm install checks the chart's kubeVersion against it (the local stack's binaries are
    # version-stamped like upstream's releases).
    out = kubectl(env, "version", "-o", "json")
    assert json.loads(out.stdout)["serverVersion"]["gitVersion"].startswith("v1.")


def test_the_pod_is_restricted_and_every_container_runs_as_non_root(helm: Helm) -> None:
    deployment = next(d for d in render(helm) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
        assert c["args"][0] == "operator"


def test_service_monitor_renders_when_asked(helm: Helm) -> None:
    docs = render(
        helm, "--set=metrics.serviceMonitor.enabled=true", "--set=metrics.serviceMonitor.labels.release=kps"
    )
    sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
    svc = next(d for d in docs if d["kind"] == "Service")
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert not any(d["kind"] == "ServiceMonitor" for d in render(helm))


def test_a_residency_policy_reaches_the_operator_as_a_file_it_parses(helm: Helm) -> None:
    docs = render(helm, *VARIANTS["own residency policy"])
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-residency"))
    policy = Policy.parse(yaml.safe_load(cm["data"]["policy.yaml"]))
    assert policy.check("CH", "EU").allowed and not policy.check("EU", "UK").allowed
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "residency")
    assert env["NIGHTJAR_RESIDENCY_POLICY_FILE"] == mount["mountPath"] + "/policy.yaml"
    # Without one, the built-in Mendix rules apply: no ConfigMap, no file.
    assert not any(d["kind"] == "ConfigMap" for d in render(helm))


def test_watched_namespaces_get_roles_and_nothing_cluster_wide(helm: Helm) -> None:
    docs = render(helm, "--set=watchNamespaces={a,b}")
    kinds = [(d["kind"], d["metadata"].get("namespace")) for d in docs]
    assert ("Role", "a") in kinds and ("Role", "b") in kinds
    assert not any(k in ("ClusterRole", "ClusterRoleBinding") for k, _ in kinds)
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == "a")
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    # patch: a restore drill's ephemeral scratch server's Secret (its address); never delete.
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]}]
    pods = [r for r in role["rules"] if "pods" in r["resources"]]
    assert pods == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "get", "create", "delete"]}]


def test_the_scratch_server_image_reaches_the_operator(helm: Helm) -> None:
    docs = render(
        helm,
        "--set=verification.scratchImage=reg.example/pg:{major}",
        "--set=verification.scratchMajors={15,16}",
        "--set=verification.scratchPullPolicy=Never",
    )
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NIGHTJAR_SCRATCH_IMAGE"] == "reg.example/pg:{major}"
    assert env["NIGHTJAR_SCRATCH_MAJORS"] == "15 16"
    assert env["NIGHTJAR_SCRATCH_IMAGE_PULL_POLICY"] == "Never"
    assert env["NIGHTJAR_SCRATCH_START_TIMEOUT_SECONDS"] == "300"


# --- the installed release ------------------------------------------------------------------


def test_the_operator_runs_from_the_chart_with_its_service_account(
    release: Release, core: client.CoreV1Api, api_client: client.ApiClient
) -> None:
    pods = operator_pods(core)
    assert len(pods) == 1
    pod = pods[0]
    assert pod.spec.service_account_name == release.service_account
    assert pod.status.phase == "Running"
    # It holds the Lease under its own name: it runs, and it is the one that acts.
    assert lease_holder(api_client) == pod.metadata.name


def sa_client(api_client: client.ApiClient, release: Release) -> client.ApiClient:
    """A client that authenticates exactly as the operator does: a token of its ServiceAccount."""
    token = (
        client.CoreV1Api(api_client)
        .create_namespaced_service_account_token(
            release.service_account, SYSTEM_NS, {"spec": {"expirationSeconds": 600}}
        )
        .status.token
    )
    cfg = client.Configuration()
    base = api_client.configuration
    cfg.host, cfg.ssl_ca_cert, cfg.verify_ssl = base.host, base.ssl_ca_cert, base.verify_ssl
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def status_of(call: Any) -> int:
    try:
        call()
    except ApiException as e:
        return int(e.status)
    return 200


def test_the_service_account_has_no_more_than_the_chart_promises(
    release: Release, api_client: client.ApiClient, core: client.CoreV1Api
) -> None:
    for ns in (*WATCHED, OUTSIDER, SYSTEM_NS):
        with contextlib.suppress(ApiException):  # already there from an earlier run
            core.create_namespaced_secret(ns, {"metadata": {"name": "probe"}, "stringData": {"k": "v"}})
    sa = sa_client(api_client, release)
    sa_core, sa_rbac = client.CoreV1Api(sa), client.RbacAuthorizationV1Api(sa)
    # What it needs: a named Secret in a watched namespace.
    assert status_of(lambda: sa_core.read_namespaced_secret("probe", WATCHED[0])) == 200
    # Not a Secret anywhere else, not even in its own namespace; never a listing.
    assert status_of(lambda: sa_core.read_namespaced_secret("probe", OUTSIDER)) == 403
    assert status_of(lambda: sa_core.read_namespaced_secret("probe", SYSTEM_NS)) == 403
    assert status_of(lambda: sa_core.list_namespaced_secret(WATCHED[0])) == 403
    assert status_of(sa_core.list_secret_for_all_namespaces) == 403
    # Its own watched namespaces, to see whether one is being deleted; never another, never a list.
    assert status_of(lambda: sa_core.read_namespace(WATCHED[0])) == 200
    assert status_of(lambda: sa_core.read_namespace(OUTSIDER)) == 403
    # Nothing cluster-scoped, no deletes of what it did not create.
    assert status_of(sa_core.list_node) == 403
    assert status_of(sa_core.list_namespace) == 403
    assert status_of(sa_rbac.list_cluster_role) == 403
    assert status_of(lambda: sa_core.delete_namespaced_secret("probe", WATCHED[0])) == 403
    assert status_of(lambda: client.BatchV1Api(sa).list_namespaced_job(OUTSIDER)) == 403


def test_helm_status_reports_deployed(helm: Helm, release: Release) -> None:
    out = helm("status", RELEASE, "--namespace", SYSTEM_NS, "-o", "json")
    assert json.loads(out.stdout)["info"]["status"] == "deployed"
