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
