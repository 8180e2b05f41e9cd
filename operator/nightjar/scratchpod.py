"""Pure builders for the ephemeral scratch PostgreSQL server of a restore drill (a Verification
without ``spec.scratch``): its Secret and its Pod. No API calls: values in, manifests out.

The Secret holds what the drill's agent reads through the usual ``NIGHTJAR_SCRATCH_*`` keys
(user postgres, port, password; ``host`` is added once the Pod has an address) and the Pod's
password: one generated per drill, never logged. The Pod runs the scratch image of the Backup's
server major (``images/scratch-postgres``) under the restricted PodSecurity standard: non-root,
no capabilities, a read-only root filesystem, its data on an emptyDir. Both are owned by the
Verification, so deleting it deletes them; the operator deletes them itself when the drill ends.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

from nightjar.config import OperatorConfig
from nightjar.constants import API_VERSION, LABEL_MANAGED_BY, LABEL_VERIFICATION, MANAGED_BY
from nightjar.jobs import job_name, label_value

PORT = 5432
USER = "postgres"
#: The scratch image's postgres user (images/scratch-postgres/Dockerfile).
UID = 999
DATA = "/var/lib/postgresql/data"
SOCKETS = "/var/run/postgresql"
#: The chart value that names the scratch images (in messages that tell what to set).
CHART_VALUE = "verification.scratchImage"


def scratch_name(verification: str) -> str:
    """Name of the scratch server's Pod and of its Secret (deterministic: a restarted operator
    finds them)."""
    return job_name("scratch", verification)


def server_major(server_version: str) -> str:
    """The major of a server version as the agent records it ("15.4" → "15", "9.6.24" → "9.6");
    empty when unknown."""
    parts = (server_version or "").strip().split(".")
    if not parts[0].isdigit():
        return ""
    if int(parts[0]) >= 10 or len(parts) < 2:
        return parts[0]
    return f"{parts[0]}.{parts[1]}"


def image_for(config: OperatorConfig, major: str) -> str | None:
    """The scratch image of ``major``, or None when none is configured for it."""
    if not config.scratch_image or not major:
        return None
    if config.scratch_majors and major not in config.scratch_majors:
        return None
    return config.scratch_image.replace("{major}", major)


def new_password() -> str:
    return secrets.token_urlsafe(32)


def _meta(name: str, namespace: str, verification: dict[str, Any]) -> dict[str, Any]:
    vmeta = verification["metadata"]
    return {
        "name": name,
        "namespace": namespace,
        "labels": {
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_VERIFICATION: label_value(vmeta["name"]),
            "app.kubernetes.io/component": "scratch-postgres",
        },
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": "Verification",
                "name": vmeta["name"],
                "uid": vmeta.get("uid", ""),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def build_secret(verification: dict[str, Any], password: str) -> dict[str, Any]:
    """The scratch server's Secret, without ``host`` (the Pod has no address yet)."""
    ns = verification["metadata"]["namespace"]
    data = {"user": USER, "port": str(PORT), "dbname": "postgres", "password": password}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(scratch_name(verification["metadata"]["name"]), ns, verification),
        "data": {k: _b64(v) for k, v in data.items()},
    }


def build_pod(verification: dict[str, Any], image: str, major: str, config: OperatorConfig) -> dict[str, Any]:
    """The scratch server's Pod: PostgreSQL ``major`` from ``image``, Ready once it accepts
    connections (pg_isready), its password from the Secret of the same name."""
    name = scratch_name(verification["metadata"]["name"])
    ns = verification["metadata"]["namespace"]
    meta = _meta(name, ns, verification)
    meta["annotations"] = {"nightjar.dev/postgres-major": major}
    probe = ["pg_isready", "--quiet", "--host", SOCKETS, "--port", str(PORT), "--username", USER]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 5,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "postgres",
                    "image": image,
                    "imagePullPolicy": config.scratch_image_pull_policy,
                    "ports": [{"name": "postgres", "containerPort": PORT, "protocol": "TCP"}],
                    "env": [
                        {
                            "name": "POSTGRES_PASSWORD",
                            "valueFrom": {"secretKeyRef": {"name": name, "key": "password"}},
                        }
                    ],
                    "readinessProbe": {
                        "exec": {"command": probe},
                        "periodSeconds": 1,
                        "timeoutSeconds": 2,
                        "failureThreshold": 3,
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {
                        "requests": {
                            "cpu": config.scratch_cpu_request,
                            "memory": config.scratch_memory_request,
                        },
                        "limits": {"memory": config.scratch_memory_limit},
                    },
                    "volumeMounts": [
                        {"name": "data", "mountPath": DATA},
                        {"name": "sockets", "mountPath": SOCKETS},
                        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
                    ],
                }
            ],
            "volumes": [
                {"name": "data", "emptyDir": {}},
                {"name": "sockets", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
            ],
        },
    }
