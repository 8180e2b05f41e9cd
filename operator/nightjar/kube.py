"""Thin access to the Kubernetes API for the reconcilers (official client, synchronous: kopf runs
sync handlers in worker threads, so these calls never block its event loop)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from nightjar.constants import GROUP, VERSION

log = logging.getLogger("nightjar")


def load_client() -> Any:
    """In-cluster service account when inside a Pod, else $KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class SecretMissing(Exception):
    """A Secret or one of its keys is missing; the message names which (never a value)."""


@dataclass
class Kube:
    api: Any
    #: The namespaces the operator watches; empty means every namespace. Cluster-wide lists and
    #: watches become one per namespace, so a namespaced install needs no cluster-wide read.
    namespaces: tuple[str, ...] = ()

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.api)

    @property
    def batch(self) -> Any:
        return client.BatchV1Api(self.api)

    @property
    def apps(self) -> Any:
        return client.AppsV1Api(self.api)

    @property
    def rbac(self) -> Any:
        return client.RbacAuthorizationV1Api(self.api)

    @property
    def custom(self) -> Any:
        return client.CustomObjectsApi(self.api)

    # --- custom objects ------------------------------------------------------------------

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return obj

    def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, plural
        )["items"]
        return items

    def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        out: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, body
        )
        return out

    def list_page(
        self, plural: str, namespace: str | None, label_selector: str, limit: int, cont: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of a listing (``namespace`` None: cluster-wide) and the continue token."""
        kw: dict[str, Any] = {"label_selector": label_selector, "limit": limit, "_continue": cont}
        resp = (
            self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural, **kw)
            if namespace
            else self.custom.list_cluster_custom_object(GROUP, VERSION, plural, **kw)
        )
        return list(resp["items"]), resp["metadata"].get("continue") or None

    def create_object(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create a custom object; None when one of that name exists (409)."""
        try:
            out: dict[str, Any] = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, body
            )
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return out

    def delete_object(self, plural: str, namespace: str, name: str) -> bool:
        """Ask for the deletion of a custom object; False when it is gone already (404)."""
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    def set_finalizers(
        self, plural: str, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> bool:
        """Replace the finalizers, conditional on ``resource_version``; False when the object is
        gone (404) or changed meanwhile (409)."""
        meta = {"finalizers": finalizers, "resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, {"metadata": meta}
            )
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise
        return True

    def patch_meta(self, plural: str, namespace: str, name: str, meta: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, {"metadata": meta}
        )
        return out

    # --- core objects --------------------------------------------------------------------

    def namespace_terminating(self, namespace: str) -> bool:
        """``namespace`` is being deleted (or is gone). Reading a namespace needs ``get`` on
        ``namespaces``, which a Role in that same namespace grants (for RBAC a namespace is in
        itself): the chart's Roles hold it. Without it (403), the answer is no, and a deletion
        deletes as it always did."""
        try:
            ns = self.core.read_namespace(namespace)
        except ApiException as e:
            if e.status == 404:
                return True
            if e.status == 403:
                log.warning("may not read namespace %s: treating it as not being deleted", namespace)
                return False
            raise
        return bool(ns.metadata.deletion_timestamp) or (ns.status and ns.status.phase) == "Terminating"

    def claim_exists(self, namespace: str, name: str) -> bool:
        """The PersistentVolumeClaim ``name`` exists in ``namespace``."""
        try:
            self.core.read_namespaced_persistent_volume_claim(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        try:
            s = self.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                raise SecretMissing(f'Secret "{name}" not found in namespace {namespace}') from e
            raise
        return {k: base64.b64decode(v).decode("utf-8", errors="replace") for k, v in (s.data or {}).items()}

    def secret_keys(self, namespace: str, name: str, keys: list[str]) -> dict[str, str]:
        data = self.secret_data(namespace, name)
        missing = [k for k in keys if k not in data]
        if missing:
            raise SecretMissing(f'Secret "{name}" has no key {", ".join(missing)}')
        return {k: data[k] for k in keys}

    def read_workload(self, namespace: str, app: dict[str, Any]) -> Any:
        """The app's Deployment or StatefulSet (``source.app``), or None when it does not exist."""
        kind, name = app.get("kind") or "Deployment", app["name"]
        read = (
            self.apps.read_namespaced_stateful_set
            if kind == "StatefulSet"
            else self.apps.read_namespaced_deployment
        )
        try:
            return read(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def scale_workload(self, namespace: str, app: dict[str, Any], replicas: int) -> None:
        kind, name = app.get("kind") or "Deployment", app["name"]
        patch = (
            self.apps.patch_namespaced_stateful_set_scale
            if kind == "StatefulSet"
            else self.apps.patch_namespaced_deployment_scale
        )
        patch(name, namespace, {"spec": {"replicas": replicas}})

    def create_if_absent(self, obj: dict[str, Any]) -> bool:
        """Create a ServiceAccount, Role, RoleBinding or Secret; False when it already exists."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        create = {
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Secret": self.core.create_namespaced_secret,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
        }[kind]
        try:
            create(ns, obj)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job as a dict in API form (camelCase), like the bodies kopf passes to handlers."""
        try:
            job = self.batch.read_namespaced_job(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        out: dict[str, Any] = self.api.sanitize_for_serialization(job)
        return out

    def create_job(self, namespace: str, job: dict[str, Any]) -> bool:
        """Create; False when it already exists (a retry or a restarted operator)."""
        try:
            self.batch.create_namespaced_job(namespace, job)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def job_pods(self, namespace: str, job: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items)

    def job_pod_uids(self, namespace: str, job: str) -> list[str]:
        """The uids of the Job's Pods (a restore drill's temporary database is named by one)."""
        return [str(p.metadata.uid) for p in self.job_pods(namespace, job)]

    def job_results(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """The JSON each finished agent container of the Job wrote as its termination message,
        oldest Pod first (a message that is not JSON becomes {"error": <its tail>})."""
        out: list[tuple[Any, dict[str, Any]]] = []
        for pod in self.job_pods(namespace, job):
            for cs in pod.status.container_statuses or []:
                term = cs.state.terminated if cs.state else None
                if term is None:
                    continue
                try:
                    result = json.loads(term.message or "")
                    if not isinstance(result, dict):
                        raise ValueError
                except ValueError:
                    result = {"error": (term.message or f"exit code {term.exit_code}").strip()[-500:]}
                out.append((pod.metadata.creation_timestamp, result))
        out.sort(key=lambda pr: pr[0])
        return [r for _, r in out]

    # --- a restore drill's scratch server -----------------------------------------------------

    def create_pod(self, namespace: str, pod: dict[str, Any]) -> bool:
        """Create; False when one of that name exists (a retry or a restarted operator)."""
        try:
            self.core.create_namespaced_pod(namespace, pod)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Pod as a dict in API form (camelCase), or None when it does not exist."""
        try:
            pod = self.core.read_namespaced_pod(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        out: dict[str, Any] = self.api.sanitize_for_serialization(pod)
        return out

    def delete_pod(self, namespace: str, name: str) -> bool:
        """Ask for the Pod's deletion; False when it is gone already."""
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    def delete_secret(self, namespace: str, name: str) -> bool:
        """Ask for the Secret's deletion; False when it is gone already."""
        try:
            self.core.delete_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    def event(self, obj: dict[str, Any], etype: str, reason: str, message: str) -> None:
        """Post a Kubernetes Event about ``obj``; failures are logged, never raised."""
        meta = obj["metadata"]
        now = dt.datetime.now(dt.UTC)
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": etype,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "nightjar-operator"},
            "reportingComponent": "nightjar.dev/operator",
            "reportingInstance": f"nightjar-{uuid.getnode():x}",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as e:
            log.warning(
                "could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason
            )
