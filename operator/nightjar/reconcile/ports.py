"""What the reconcilers need from the outside world, as typed protocols.

The reconcilers take a :class:`KubeAPI` and a :class:`Clock` in their constructors; production
passes :class:`nightjar.kube.Kube` and :class:`SystemClock`, the unit tests pass the one
in-memory fake of ``tests/fakes.py``. Nothing is monkeypatched. A 409 or any other API error is
the official client's ``ApiException`` either way, so error handling is the same code.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any, Protocol

#: Objects per page when the reconcilers list a kind (memory stays bounded).
PAGE = 500


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware (UTC)."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class KubeAPI(Protocol):
    """The Kubernetes calls the reconcilers make (see :class:`nightjar.kube.Kube`)."""

    #: The namespaces the operator watches; empty means every namespace.
    namespaces: tuple[str, ...]

    # custom objects
    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None: ...
    def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]: ...
    def list_page(
        self, plural: str, namespace: str | None, label_selector: str, limit: int, cont: str | None
    ) -> tuple[list[dict[str, Any]], str | None]: ...
    def create_object(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None: ...
    def delete_object(self, plural: str, namespace: str, name: str) -> bool: ...
    def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]: ...
    def patch_meta(self, plural: str, namespace: str, name: str, meta: dict[str, Any]) -> dict[str, Any]: ...
    def set_finalizers(
        self, plural: str, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> bool: ...

    # core objects
    def namespace_terminating(self, namespace: str) -> bool: ...
    def claim_exists(self, namespace: str, name: str) -> bool: ...
    def secret_data(self, namespace: str, name: str) -> dict[str, str]: ...
    def secret_keys(self, namespace: str, name: str, keys: list[str]) -> dict[str, str]: ...
    def read_workload(self, namespace: str, app: dict[str, Any]) -> Any: ...
    def scale_workload(self, namespace: str, app: dict[str, Any], replicas: int) -> None: ...
    def create_if_absent(self, obj: dict[str, Any]) -> bool: ...
    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def create_job(self, namespace: str, job: dict[str, Any]) -> bool: ...
    def job_results(self, namespace: str, job: str) -> list[dict[str, Any]]: ...
    def job_pod_uids(self, namespace: str, job: str) -> list[str]: ...
    def event(self, obj: dict[str, Any], etype: str, reason: str, message: str) -> None: ...
    # a restore drill's scratch server
    def create_pod(self, namespace: str, pod: dict[str, Any]) -> bool: ...
    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def delete_pod(self, namespace: str, name: str) -> bool: ...
    def delete_secret(self, namespace: str, name: str) -> bool: ...


def list_all(
    kube: KubeAPI, plural: str, label_selector: str = "", namespaces: tuple[str, ...] | None = None
) -> Iterator[dict[str, Any]]:
    """Every object of a kind in ``namespaces`` (default: the watched ones; cluster-wide when the
    operator watches all), a page at a time."""
    for ns in (namespaces if namespaces is not None else kube.namespaces) or (None,):
        cont: str | None = None
        while True:
            items, cont = kube.list_page(plural, ns, label_selector, PAGE, cont)
            yield from items
            if not cont:
                break
