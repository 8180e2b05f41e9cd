"""The one in-memory fake of the Kubernetes API the reconcilers use (``KubeAPI``), and a clock.

It behaves like the API server where the reconcilers depend on it: a status patch is a JSON
merge patch (``None`` deletes a key) honouring the resourceVersion precondition (409), a missing
object is a 404, a create of an existing name is refused, listings are paged. Faults are
injected by queueing ``ApiException``s per call (``fail("patch_status", 409, 409)``), never by
monkeypatching the code under test.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar.kube import SecretMissing

NOW = dt.datetime(2026, 11, 24, 18, 0, 0, tzinfo=dt.UTC)


class FakeClock:
    """A clock that stands still until moved."""

    def __init__(self, now: dt.datetime = NOW) -> None:
        self.current = now

    def now(self) -> dt.datetime:
        return self.current

    def advance(self, seconds: float) -> dt.datetime:
        self.current += dt.timedelta(seconds=seconds)
        return self.current


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    out = dict(into)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def workload(replicas: int = 1, ready: int | None = None, **annotations: str) -> Any:
    """A Deployment as the client returns it (attributes), for ``read_workload``."""
    return SimpleNamespace(
        metadata=SimpleNamespace(annotations=dict(annotations), labels={}),
        spec=SimpleNamespace(replicas=replicas),
        status=SimpleNamespace(replicas=replicas if ready is None else ready, ready_replicas=ready),
    )


class FakeKube:
    """Custom objects, Jobs and their results, Secrets, PVCs, workloads, namespaces, Events."""

    def __init__(self, namespaces: tuple[str, ...] = ()) -> None:
        self.namespaces: tuple[str, ...] = namespaces
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, str, str]] = []  # (object name, type, reason, message)
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        #: A Job's results (the agents' termination messages), by (namespace, job name).
        self.job_output: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        #: Results every Job reports when it has none of its own (a test of one Job).
        self.results: list[dict[str, Any]] = []
        #: The uids of a Job's Pods, by (namespace, job name).
        self.pod_uids: dict[tuple[str, str], list[str]] = {}
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.claims: set[tuple[str, str]] = set()
        self.workloads: dict[tuple[str, str], Any] = {}
        #: Returned for any app when ``workloads`` has no entry (None: not found).
        self.workload: Any = None
        self.terminating: set[str] = set()
        self.created_jobs: list[dict[str, Any]] = []
        self.made: list[dict[str, Any]] = []  # create_if_absent
        #: Pods the reconcilers create (a drill's scratch server), by (namespace, name); a test
        #: plays the kubelet by setting their status.
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.deleted: list[tuple[str, str, str]] = []  # (kind, namespace, name)
        self.scaled: list[tuple[str, str, int]] = []
        self.calls: defaultdict[str, int] = defaultdict(int)
        self._faults: defaultdict[str, list[int]] = defaultdict(list)
        self._rv = 0

    # --- test helpers -----------------------------------------------------------------------

    def fail(self, method: str, *statuses: int) -> None:
        """The next calls of ``method`` raise ApiException with these statuses, in order."""
        self._faults[method].extend(statuses)

    def _call(self, method: str) -> None:
        self.calls[method] += 1
        if self._faults[method]:
            raise ApiException(status=self._faults[method].pop(0), reason="injected")

    def _bump(self, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def add(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["metadata"].setdefault("uid", f"uid-{obj['metadata']['name']}")
        obj["metadata"].setdefault("creationTimestamp", "2026-11-24T17:00:00Z")
        self._bump(obj)
        self.objects[(plural, obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
        return copy.deepcopy(obj)

    def status_of(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        out: dict[str, Any] = (self.objects[(plural, namespace, name)].get("status")) or {}
        return out

    def reasons(self, name: str) -> list[str]:
        return [r for n, _, r, _ in self.events if n == name]

    def add_secret(self, namespace: str, name: str, **data: str) -> None:
        self.secrets[(namespace, name)] = dict(data)

    def set_job(self, namespace: str, name: str, job_status: dict[str, Any], **labels: str) -> dict[str, Any]:
        job = {"metadata": {"name": name, "namespace": namespace, "labels": labels}, "status": job_status}
        self.jobs[(namespace, name)] = job
        return copy.deepcopy(job)

    # --- custom objects ----------------------------------------------------------------------

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("get")
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        self._call("list_objects")
        return [
            copy.deepcopy(o)
            for (p, ns, _), o in sorted(self.objects.items())
            if p == plural and ns == namespace
        ]

    def list_page(
        self, plural: str, namespace: str | None, label_selector: str, limit: int, cont: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        self._call("list_page")
        items = [
            o
            for (p, ns, _), o in sorted(self.objects.items())
            if p == plural and (namespace is None or ns == namespace) and _selects(label_selector, o)
        ]
        start = int(cont or 0)
        page = items[start : start + limit]
        more = start + limit < len(items)
        return [copy.deepcopy(o) for o in page], str(start + limit) if more else None

    def create_object(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self._call("create_object")
        if (plural, namespace, body["metadata"]["name"]) in self.objects:
            return None
        return self.add(plural, {**body, "metadata": {**body["metadata"], "namespace": namespace}})

    def delete_object(self, plural: str, namespace: str, name: str) -> bool:
        self._call("delete_object")
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            return False
        if obj["metadata"].get("finalizers"):
            obj["metadata"]["deletionTimestamp"] = "2026-11-24T18:00:00Z"
            self._bump(obj)
        else:
            del self.objects[(plural, namespace, name)]
        return True

    def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        self._call("patch_status")
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            raise ApiException(status=404, reason="Not Found")
        if resource_version and resource_version != obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        obj["status"] = _merge(obj.get("status") or {}, status)
        self._bump(obj)
        return copy.deepcopy(obj)

    def patch_meta(self, plural: str, namespace: str, name: str, meta: dict[str, Any]) -> dict[str, Any]:
        self._call("patch_meta")
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            raise ApiException(status=404, reason="Not Found")
        obj["metadata"] = _merge(obj["metadata"], meta)
        self._bump(obj)
        return copy.deepcopy(obj)

    def set_finalizers(
        self, plural: str, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> bool:
        self._call("set_finalizers")
        obj = self.objects.get((plural, namespace, name))
        if obj is None or obj["metadata"]["resourceVersion"] != resource_version:
            return False
        obj["metadata"]["finalizers"] = list(finalizers)
        if not finalizers and obj["metadata"].get("deletionTimestamp"):
            del self.objects[(plural, namespace, name)]
        else:
            self._bump(obj)
        return True

    # --- core objects ---------------------------------------------------------------------------

    def namespace_terminating(self, namespace: str) -> bool:
        self._call("namespace_terminating")
        return namespace in self.terminating

    def claim_exists(self, namespace: str, name: str) -> bool:
        self._call("claim_exists")
        return (namespace, name) in self.claims

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        self._call("secret_data")
        if (namespace, name) not in self.secrets:
            raise SecretMissing(f'Secret "{name}" not found in namespace {namespace}')
        return dict(self.secrets[(namespace, name)])

    def secret_keys(self, namespace: str, name: str, keys: list[str]) -> dict[str, str]:
        data = self.secret_data(namespace, name)
        missing = [k for k in keys if k not in data]
        if missing:
            raise SecretMissing(f'Secret "{name}" has no key {", ".join(missing)}')
        return {k: data[k] for k in keys}

    def read_workload(self, namespace: str, app: dict[str, Any]) -> Any:
        self._call("read_workload")
        return self.workloads.get((namespace, app["name"]), self.workload)

    def scale_workload(self, namespace: str, app: dict[str, Any], replicas: int) -> None:
        self._call("scale_workload")
        self.scaled.append((namespace, app["name"], replicas))
        obj = self.workloads.get((namespace, app["name"]))
        if obj is not None:
            obj.spec.replicas = replicas

    def create_if_absent(self, obj: dict[str, Any]) -> bool:
        self._call("create_if_absent")
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if any((o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) == key for o in self.made):
            return False
        self.made.append(copy.deepcopy(obj))
        if obj["kind"] == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            self.secrets[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = data
        return True

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("read_job")
        job = self.jobs.get((namespace, name))
        return copy.deepcopy(job) if job is not None else None

    def create_job(self, namespace: str, job: dict[str, Any]) -> bool:
        self._call("create_job")
        name = job["metadata"]["name"]
        if (namespace, name) in self.jobs:
            return False
        self.jobs[(namespace, name)] = {**copy.deepcopy(job), "status": {}}
        self.created_jobs.append(copy.deepcopy(job))
        return True

    def job_pod_uids(self, namespace: str, job: str) -> list[str]:
        self._call("job_pod_uids")
        return list(self.pod_uids.get((namespace, job)) or [])

    def job_results(self, namespace: str, job: str) -> list[dict[str, Any]]:
        self._call("job_results")
        return list(self.job_output.get((namespace, job)) or self.results)

    def create_pod(self, namespace: str, pod: dict[str, Any]) -> bool:
        self._call("create_pod")
        if (namespace, pod["metadata"]["name"]) in self.pods:
            return False
        self.pods[(namespace, pod["metadata"]["name"])] = {
            **copy.deepcopy(pod),
            "status": {"phase": "Pending"},
        }
        return True

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("read_pod")
        pod = self.pods.get((namespace, name))
        return copy.deepcopy(pod) if pod is not None else None

    def delete_pod(self, namespace: str, name: str) -> bool:
        self._call("delete_pod")
        self.deleted.append(("Pod", namespace, name))
        return self.pods.pop((namespace, name), None) is not None

    def delete_secret(self, namespace: str, name: str) -> bool:
        self._call("delete_secret")
        self.deleted.append(("Secret", namespace, name))
        self.made = [
            o
            for o in self.made
            if not (
                o["kind"] == "Secret"
                and (o["metadata"]["namespace"], o["metadata"]["name"]) == (namespace, name)
            )
        ]
        return self.secrets.pop((namespace, name), None) is not None

    def event(self, obj: dict[str, Any], etype: str, reason: str, message: str) -> None:
        self.events.append((obj["metadata"]["name"], etype, reason, message))


def _selects(selector: str, obj: dict[str, Any]) -> bool:
    """The label selectors the reconcilers use: ``k=v``, ``k``, ``!k``, comma-separated."""
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k) != v:
                return False
        elif term not in labels:
            return False
    return True
