"""Install the CRDs from ``crds/`` into a cluster and wait until they are Established."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException


def load_crds(crd_dir: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for f in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text(encoding="utf-8")):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                docs.append(doc)
    return docs


def install_crds(kubeconfig: Path, crd_dir: Path, timeout: float = 60.0) -> list[str]:
    """Create or update each CRD (idempotent) and wait for it to be Established."""
    api = client.ApiextensionsV1Api(config.new_client_from_config(str(kubeconfig)))
    names = []
    for crd in load_crds(crd_dir):
        name = crd["metadata"]["name"]
        names.append(name)
        try:
            api.create_custom_resource_definition(crd)
        except ApiException as e:
            if e.status != 409:
                raise
            current = api.read_custom_resource_definition(name)
            crd["metadata"]["resourceVersion"] = current.metadata.resource_version
            api.replace_custom_resource_definition(name, crd)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            got = api.read_custom_resource_definition(name)
            conds = got.status.conditions or [] if got.status else []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} was not Established after {timeout:.0f}s")
            time.sleep(0.2)
    return names
