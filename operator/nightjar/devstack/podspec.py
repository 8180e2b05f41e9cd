"""Pure helpers of the process node: Kubernetes container semantics without a container runtime.

TEST/DEV ONLY. The process node stands in for a kubelet on machines without a container
runtime. These functions turn a Pod's container spec into what a local process needs: the
argv (command/args with ``$(VAR)`` expansion, as the kubelet does), the environment, and the
paths of its volumes, which a local process sees at local directories rather than at the
container's ``mountPath``. They take plain dicts (the Pod as the API server serves it) and have
no I/O, so they are unit-tested directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# The kubelet caps a termination message at 4096 bytes; so do we.
TERMINATION_MESSAGE_LIMIT = 4096

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ContainerConfigError(Exception):
    """The container cannot start because its configuration does not resolve.

    Mirrors the kubelet's ``CreateContainerConfigError``: the Pod stays Pending and the
    process node retries, as a missing Secret may be created later.
    """


def expand(value: str, env: Mapping[str, str]) -> str:
    """Expand ``$(VAR)`` references the way the kubelet does.

    ``$$`` escapes a dollar; a reference to an unknown variable is left as it is.
    """

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_REF.sub(repl, value)


@dataclass(frozen=True)
class Lookups:
    """Read access to the objects a container's env may refer to (injected for tests)."""

    secret: Callable[[str], Mapping[str, str] | None]
    config_map: Callable[[str], Mapping[str, str] | None]


def _field_ref(pod: Mapping[str, Any], path: str) -> str:
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise ContainerConfigError(f"fieldRef {path!r} is not supported by the process node")


def resolve_env(pod: Mapping[str, Any], container: Mapping[str, Any], lookups: Lookups) -> dict[str, str]:
    """Resolve ``envFrom`` then ``env`` (later entries win), as the kubelet does."""
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix") or ""
        if "secretRef" in src:
            ref, kind, data = src["secretRef"], "secret", lookups.secret(src["secretRef"]["name"])
        elif "configMapRef" in src:
            ref, kind, data = (
                src["configMapRef"],
                "configmap",
                lookups.config_map(src["configMapRef"]["name"]),
            )
        else:
            continue
        if data is None:
            if ref.get("optional"):
                continue
            raise ContainerConfigError(f'{kind} "{ref["name"]}" not found')
        for key, val in data.items():
            env[prefix + key] = val
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(item.get("value") or "", env)
            continue
        vf = item["valueFrom"]
        if "secretKeyRef" in vf or "configMapKeyRef" in vf:
            is_secret = "secretKeyRef" in vf
            ref = vf["secretKeyRef"] if is_secret else vf["configMapKeyRef"]
            kind = "secret" if is_secret else "configmap"
            data = (lookups.secret if is_secret else lookups.config_map)(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'{kind} "{ref["name"]}" not found')
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
            env[name] = data[ref["key"]]
        elif "fieldRef" in vf:
            env[name] = _field_ref(pod, vf["fieldRef"]["fieldPath"])
        else:
            raise ContainerConfigError(
                f"env {name}: only secretKeyRef, configMapKeyRef and fieldRef are supported"
            )
    return env


def argv(
    container: Mapping[str, Any],
    env: Mapping[str, str],
    entrypoints: Mapping[str, list[str]],
    rewrite: Callable[[str], str] = lambda s: s,
) -> list[str]:
    """The process's argv: ``command`` (or the image's known entrypoint) plus ``args``, expanded.

    ``rewrite`` (volume paths) applies to what the container says, never to the node's own
    entrypoint path: a checkout under /tmp must not be mistaken for an emptyDir at /tmp.
    """
    command = [rewrite(expand(a, env)) for a in container.get("command") or []]
    args = [rewrite(expand(a, env)) for a in container.get("args") or []]
    if not command:
        image = str(container.get("image", ""))
        entry = entrypoints.get(image_name(image))
        if entry is None:
            raise ContainerConfigError(
                f"process node: no entrypoint is known for image {image!r}; give the container a command"
            )
        command = list(entry)
    return command + args


def image_name(image: str) -> str:
    """``registry:5000/org/nightjar:v1@sha256:...`` -> ``nightjar``."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


@dataclass
class PathMap:
    """Container paths (``mountPath`` prefixes) mapped to local directories and files.

    A local process cannot see a volume at its ``mountPath`` without a mount namespace, so the
    process node rewrites those paths wherever the container names them: command, args, env
    values and workingDir. Paths match on whole path components (``/data`` never rewrites
    ``/database``); the longest mount wins.
    """

    mounts: dict[str, str] = field(default_factory=dict)

    def add(self, container_path: str, local_path: str) -> None:
        norm = container_path.rstrip("/") or "/"
        if norm == "/":
            raise ContainerConfigError("process node: a volume mounted at / is not supported")
        self.mounts[norm] = local_path

    def _pattern(self) -> re.Pattern[str] | None:
        if not self.mounts:
            return None
        alts = "|".join(re.escape(p) for p in sorted(self.mounts, key=len, reverse=True))
        return re.compile(rf"(?<![\w.\-/])({alts})(?=/|$|[^\w.\-])")

    def rewrite(self, text: str) -> str:
        pat = self._pattern()
        if pat is None:
            return text
        return pat.sub(lambda m: self.mounts[m.group(1)], text)


def termination_message(raw: bytes) -> str:
    """The kubelet keeps at most 4096 bytes of the message file."""
    return raw[:TERMINATION_MESSAGE_LIMIT].decode("utf-8", errors="replace")


# --- service account automount (what the ServiceAccount admission plugin + kubelet do) -------

SERVICE_ACCOUNT_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# The kubelet asks for 3607 s: the API server recognises the number and (with its default
# --service-account-extend-token-expiration) keeps the token valid longer, only warning after
# an hour, for clients that never re-read their token.
SERVICE_ACCOUNT_TOKEN_SECONDS = 3607
# The kubelet refreshes a projected token once 80% of its lifetime has passed.
TOKEN_REFRESH_FRACTION = 0.8


def service_account_name(pod: Mapping[str, Any]) -> str:
    return str((pod.get("spec") or {}).get("serviceAccountName") or "default")


def automount_token(pod: Mapping[str, Any], service_account: Mapping[str, Any] | None) -> bool:
    """Whether the Pod gets its service account's token: the Pod's
    ``automountServiceAccountToken`` wins, else the ServiceAccount's, else true."""
    own = (pod.get("spec") or {}).get("automountServiceAccountToken")
    if own is not None:
        return bool(own)
    sa_value = (service_account or {}).get("automountServiceAccountToken")
    return True if sa_value is None else bool(sa_value)


def mounts_service_account_path(container: Mapping[str, Any]) -> bool:
    """The container mounts a volume of its own at the token path: the automount skips it."""
    return any(
        (vm.get("mountPath") or "").rstrip("/") == SERVICE_ACCOUNT_MOUNT_PATH
        for vm in container.get("volumeMounts") or []
    )


def service_account_kubeconfig(
    server: str, ca_file: str, token: str, namespace: str, service_account: str
) -> dict[str, Any]:
    """A kubeconfig carrying a Pod's service account token.

    Clients read the in-cluster credentials from the fixed path
    ``/var/run/secrets/kubernetes.io/serviceaccount``, which a local process cannot be shown
    without a mount namespace; with ``KUBECONFIG`` pointing here they fall back to this file
    (the kubernetes client and kopf try in-cluster first, then ``KUBECONFIG``).
    """
    user = f"system:serviceaccount:{namespace}:{service_account}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "in-cluster", "cluster": {"server": server, "certificate-authority": ca_file}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": "in-cluster", "context": {"cluster": "in-cluster", "user": user, "namespace": namespace}}
        ],
        "current-context": "in-cluster",
    }


def token_refresh_due(issued_at: float, expires_at: float, now: float) -> bool:
    """True once ``TOKEN_REFRESH_FRACTION`` of the token's lifetime has passed (any clock, seconds)."""
    return now >= issued_at + TOKEN_REFRESH_FRACTION * max(0.0, expires_at - issued_at)


def process_env(
    *,
    path: str,
    home: str,
    hostname: str,
    api_host: str,
    api_port: int,
    pod_env: Mapping[str, str],
    kubeconfig: str | None = None,
    service_env: bool = True,
) -> dict[str, str]:
    """The whole environment of a container's process, built from nothing.

    Nothing is inherited from the node (whose environment may hold the admin ``KUBECONFIG``):
    ``PATH``, ``HOME``, ``HOSTNAME``, ``LANG``, the API server's service variables, the service
    account ``KUBECONFIG`` when the Pod automounts a token, then the Pod's own env, which wins
    (a container that sets ``KUBECONFIG`` keeps its own).
    """
    env = {"PATH": path, "HOME": home, "HOSTNAME": hostname, "LANG": "C.UTF-8"}
    if service_env:
        env["KUBERNETES_SERVICE_HOST"] = api_host
        env["KUBERNETES_SERVICE_PORT"] = str(api_port)
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    return {**env, **pod_env}
