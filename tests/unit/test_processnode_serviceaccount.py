"""The process node's service account automount: the decision, the kubeconfig, the clean env.

The pure parts are in ``podspec``; the runner-level tests drive a ``PodRunner`` against a fake
CoreV1Api (no network), up to the argv and environment a container's process would get.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar.devstack import podspec
from nightjar.devstack.processnode import PodRunner, ProcessNode, ServiceAccountError

SA_PATH = podspec.SERVICE_ACCOUNT_MOUNT_PATH


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"}, "spec": spec}


# --- the automount decision -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod_value", "sa_value", "expected"),
    [
        (None, None, True),  # neither says: the default is to mount
        (None, True, True),
        (None, False, False),  # the ServiceAccount opts out
        (True, False, True),  # the Pod wins over its ServiceAccount
        (False, True, False),
        (False, None, False),
    ],
)
def test_automount_pod_wins_then_service_account_then_true(
    pod_value: bool | None, sa_value: bool | None, expected: bool
) -> None:
    spec: dict[str, Any] = {"containers": []}
    if pod_value is not None:
        spec["automountServiceAccountToken"] = pod_value
    sa: dict[str, Any] = {"metadata": {"name": "default"}}
    if sa_value is not None:
        sa["automountServiceAccountToken"] = sa_value
    assert podspec.automount_token(_pod(spec), sa) is expected


def test_service_account_name_defaults_to_default() -> None:
    assert podspec.service_account_name(_pod({})) == "default"
    assert podspec.service_account_name(_pod({"serviceAccountName": "nightjar"})) == "nightjar"


def test_a_container_mounting_its_own_volume_at_the_token_path_is_skipped() -> None:
    own = {"name": "c", "volumeMounts": [{"name": "t", "mountPath": SA_PATH + "/"}]}
    other = {"name": "d", "volumeMounts": [{"name": "t", "mountPath": "/var/run/secrets"}]}
    assert podspec.mounts_service_account_path(own)
    assert not podspec.mounts_service_account_path(other)
    assert not podspec.mounts_service_account_path({"name": "e"})


# --- the kubeconfig -------------------------------------------------------------------------


def test_kubeconfig_names_server_ca_token_and_namespace() -> None:
    cfg = podspec.service_account_kubeconfig("https://127.0.0.1:6443", "/x/ca.crt", "tok", "shop", "nightjar")
    ctx = next(c for c in cfg["contexts"] if c["name"] == cfg["current-context"])["context"]
    cluster = next(c for c in cfg["clusters"] if c["name"] == ctx["cluster"])["cluster"]
    user = next(u for u in cfg["users"] if u["name"] == ctx["user"])["user"]
    assert cluster == {"server": "https://127.0.0.1:6443", "certificate-authority": "/x/ca.crt"}
    assert user == {"token": "tok"}
    assert ctx["namespace"] == "shop"
    assert ctx["user"] == "system:serviceaccount:shop:nightjar"


def test_kubeconfig_loads_in_the_kubernetes_client(tmp_path: Path) -> None:
    from kubernetes import config

    ca = tmp_path / "ca.crt"
    ca.write_text("not parsed at load\n")
    path = tmp_path / "kubeconfig"
    cfg = podspec.service_account_kubeconfig("https://127.0.0.1:6443", str(ca), "tok", "shop", "sa")
    path.write_text(json.dumps(cfg))
    conf = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=conf)
    assert conf.host == "https://127.0.0.1:6443"
    assert conf.ssl_ca_cert == str(ca)
    assert conf.auth_settings()["BearerToken"]["value"] == "Bearer tok"


def test_token_refresh_is_due_at_80_percent_of_its_lifetime() -> None:
    assert not podspec.token_refresh_due(100.0, 1100.0, 100.0)
    assert not podspec.token_refresh_due(100.0, 1100.0, 899.0)
    assert podspec.token_refresh_due(100.0, 1100.0, 900.0)
    assert podspec.token_refresh_due(100.0, 100.0, 100.0)  # an expired (zero-length) token: now


# --- the process's environment ----------------------------------------------------------------


def test_process_env_is_built_from_nothing_and_pod_env_wins() -> None:
    env = podspec.process_env(
        path="/venv/bin:/usr/bin",
        home="/h",
        hostname="p",
        api_host="127.0.0.1",
        api_port=6443,
        pod_env={"A": "1", "KUBECONFIG": "/mine"},
        kubeconfig="/sa/kubeconfig",
    )
    assert env == {
        "PATH": "/venv/bin:/usr/bin",
        "HOME": "/h",
        "HOSTNAME": "p",
        "LANG": "C.UTF-8",
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "6443",
        "KUBECONFIG": "/mine",  # the container's own KUBECONFIG is kept
        "A": "1",
    }


def test_process_env_without_token_has_no_kubeconfig_and_can_drop_service_vars() -> None:
    env = podspec.process_env(
        path="/bin", home="/h", hostname="p", api_host="h", api_port=1, pod_env={}, service_env=False
    )
    assert "KUBECONFIG" not in env
    assert "KUBERNETES_SERVICE_HOST" not in env


# --- the runner, against a fake API -----------------------------------------------------------


class FakeCore:
    """Just what PodRunner calls before a process starts."""

    def __init__(self, service_accounts: dict[str, dict[str, Any]]) -> None:
        self.service_accounts = service_accounts
        self.token_requests: list[tuple[str, str, dict[str, Any]]] = []
        self.statuses: list[dict[str, Any]] = []

    def read_namespaced_service_account(self, name: str, namespace: str) -> client.V1ServiceAccount:
        if name not in self.service_accounts:
            raise ApiException(status=404, reason="Not Found")
        return client.V1ServiceAccount.from_dict(self.service_accounts[name])

    def create_namespaced_service_account_token(
        self, name: str, namespace: str, body: dict[str, Any]
    ) -> SimpleNamespace:
        if name not in self.service_accounts:
            raise ApiException(status=404, reason="Not Found")
        self.token_requests.append((name, namespace, body))
        seconds = body["spec"]["expirationSeconds"]
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
        return SimpleNamespace(
            status=SimpleNamespace(token=f"token-{len(self.token_requests)}", expiration_timestamp=expires)
        )

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        raise ApiException(status=404, reason="Not Found")

    def read_namespaced_config_map(self, name: str, namespace: str) -> Any:
        raise ApiException(status=404, reason="Not Found")

    def patch_namespaced_pod_status(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.statuses.append(body["status"])


def _runner(
    tmp_path: Path, spec: dict[str, Any], sas: dict[str, dict[str, Any]]
) -> tuple[PodRunner, FakeCore]:
    ca = tmp_path / "pki" / "apiserver" / "apiserver.crt"
    ca.parent.mkdir(parents=True)
    ca.write_text("CA PEM\n")
    api = FakeCore(sas)
    node = ProcessNode(
        api,
        "node",
        tmp_path / "node",
        entrypoints={"nightjar": ["/venv/bin/nightjar"]},
        api_host="127.0.0.1",
        api_port=6443,
    )
    pod = client.V1Pod.from_dict(
        {"metadata": {"name": "op", "namespace": "shop", "uid": "uid-1"}, "spec": spec}
    )
    return PodRunner(node, pod), api


OPERATOR_SPEC: dict[str, Any] = {
    "serviceAccountName": "nightjar",
    "containers": [
        {
            "name": "operator",
            "image": "ghcr.io/x/nightjar:1.0",
            "args": ["operator", "--token-file", SA_PATH + "/token"],
            "env": [{"name": "NS_FILE", "value": SA_PATH + "/namespace"}],
        }
    ],
}


def test_runner_automounts_the_token_and_points_kubeconfig_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", "/admin/kubeconfig")  # the node's own: must not leak
    monkeypatch.setenv("NIGHTJAR_SECRET_OF_THE_NODE", "x")
    runner, api = _runner(tmp_path, OPERATOR_SPEC, {"nightjar": {"metadata": {"name": "nightjar"}}})
    runner._setup_service_account()
    argv, env, _, _ = runner._prepare(OPERATOR_SPEC["containers"][0], {})

    sa_dir = runner.dir / "serviceaccount"
    assert runner.sa_dir == sa_dir
    [(name, ns, body)] = api.token_requests
    assert (name, ns) == ("nightjar", "shop")
    assert body["spec"]["expirationSeconds"] == 3607
    assert body["spec"]["boundObjectRef"] == {"kind": "Pod", "apiVersion": "v1", "name": "op", "uid": "uid-1"}
    assert (sa_dir / "token").read_text() == "token-1"
    assert (sa_dir / "ca.crt").read_text() == "CA PEM\n"
    assert (sa_dir / "namespace").read_text() == "shop"
    assert (sa_dir / "token").stat().st_mode & 0o077 == 0
    cfg = json.loads((sa_dir / "kubeconfig").read_text())
    assert cfg["users"][0]["user"]["token"] == "token-1"
    assert cfg["clusters"][0]["cluster"]["certificate-authority"] == str(sa_dir / "ca.crt")
    assert cfg["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"

    assert env["KUBECONFIG"] == str(sa_dir / "kubeconfig")
    assert "NIGHTJAR_SECRET_OF_THE_NODE" not in env
    assert argv == ["/venv/bin/nightjar", "operator", "--token-file", f"{sa_dir}/token"]
    assert env["NS_FILE"] == f"{sa_dir}/namespace"


def test_runner_refreshes_token_and_kubeconfig_at_80_percent(tmp_path: Path) -> None:
    runner, api = _runner(tmp_path, OPERATOR_SPEC, {"nightjar": {"metadata": {"name": "nightjar"}}})
    runner._setup_service_account()
    runner._refresh_service_account()
    assert len(api.token_requests) == 1  # not yet due
    lifetime = runner.sa_expires - runner.sa_issued
    assert 3500 < lifetime <= 3607
    runner.sa_issued -= 0.8 * lifetime + 1  # as if 80% of it had passed
    runner.sa_expires -= 0.8 * lifetime + 1
    runner._refresh_service_account()
    assert len(api.token_requests) == 2
    sa_dir = runner.dir / "serviceaccount"
    assert (sa_dir / "token").read_text() == "token-2"
    assert json.loads((sa_dir / "kubeconfig").read_text())["users"][0]["user"]["token"] == "token-2"


def test_runner_container_with_own_kubeconfig_keeps_it(tmp_path: Path) -> None:
    spec: dict[str, Any] = {
        "serviceAccountName": "nightjar",
        "containers": [{"name": "c", "command": ["true"], "env": [{"name": "KUBECONFIG", "value": "/k"}]}],
    }
    runner, _ = _runner(tmp_path, spec, {"nightjar": {"metadata": {"name": "nightjar"}}})
    runner._setup_service_account()
    _, env, _, _ = runner._prepare(spec["containers"][0], {})
    assert env["KUBECONFIG"] == "/k"


@pytest.mark.parametrize(
    ("spec_extra", "sa_extra"),
    [({"automountServiceAccountToken": False}, {}), ({}, {"automountServiceAccountToken": False})],
)
def test_runner_opted_out_gets_no_token_and_no_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec_extra: dict[str, Any], sa_extra: dict[str, Any]
) -> None:
    monkeypatch.setenv("KUBECONFIG", "/admin/kubeconfig")
    spec = {**OPERATOR_SPEC, **spec_extra}
    runner, api = _runner(tmp_path, spec, {"nightjar": {"metadata": {"name": "nightjar"}, **sa_extra}})
    runner._setup_service_account()
    argv, env, _, _ = runner._prepare(spec["containers"][0], {})
    assert api.token_requests == []
    assert runner.sa_dir is None
    assert "KUBECONFIG" not in env  # neither a token nor the admin's
    assert argv[-1] == SA_PATH + "/token"  # nothing mounted there: not rewritten


def test_pod_naming_no_service_account_gets_an_unbound_token_of_default(tmp_path: Path) -> None:
    # The API server binds a token only to a Pod naming that ServiceAccount; without the
    # admission plugin nothing fills in "default", so such a Pod's token cannot be bound.
    spec: dict[str, Any] = {"containers": [{"name": "c", "command": ["true"]}]}
    runner, api = _runner(tmp_path, spec, {"default": {"metadata": {"name": "default"}}})
    runner._setup_service_account()
    [(name, _, body)] = api.token_requests
    assert name == "default"
    assert "boundObjectRef" not in body["spec"]
    assert runner.sa_dir is not None


def test_runner_missing_service_account_says_so(tmp_path: Path) -> None:
    runner, api = _runner(tmp_path, OPERATOR_SPEC, {})
    with pytest.raises(ServiceAccountError, match='serviceaccount "nightjar" not found') as err:
        runner._setup_service_account()
    assert err.value.reason == "ServiceAccountNotFound"
    assert api.token_requests == []


def test_running_pod_refreshes_its_token_from_the_supervision_loop(tmp_path: Path) -> None:
    spec: dict[str, Any] = {
        "serviceAccountName": "nightjar",
        "containers": [{"name": "c", "command": ["sleep", "30"]}],
    }
    runner, api = _runner(tmp_path, spec, {"nightjar": {"metadata": {"name": "nightjar"}}})
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not any(s["phase"] == "Running" for s in api.statuses) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(s["phase"] == "Running" for s in api.statuses)
        running = next(s for s in api.statuses if s["phase"] == "Running")
        conditions = {c["type"]: c["status"] for c in running["conditions"]}
        assert conditions["Ready"] == conditions["ContainersReady"] == "True"
        assert len(api.token_requests) == 1
        runner.sa_expires = runner.sa_issued  # the token's whole life has passed
        deadline = time.monotonic() + 20  # its own patience: a loaded machine took the first's
        token = runner.dir / "serviceaccount" / "token"
        # The request comes first, the file is written right after: wait for both.
        while (len(api.token_requests) < 2 or token.read_text() != "token-2") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(api.token_requests) == 2
        assert token.read_text() == "token-2"
    finally:
        runner.kill(grace=1.0)
    assert runner.done.is_set()
