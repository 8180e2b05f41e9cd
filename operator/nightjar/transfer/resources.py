"""Backups and Restores made from the command line, and how they are listed and followed.

The objects are exactly what a person would write in YAML (pure builders, unit-tested); the
operator does the work. Following is polling the object's status once a second: simple, and
it survives an API server restart or a dropped watch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nightjar.constants import API_VERSION, GROUP, VERSION
from nightjar.kube import Kube
from nightjar.transfer import CommandError
from nightjar.transfer.progress import Follower

TERMINAL = ("Completed", "Failed")
BACKUP_COLUMNS = ["NAME", "STATUS", "TYPE", "CREATED", "EXPIRES", "SIZE(MB)", "MODEL", "COMMENT"]


def source_spec(
    *,
    db_secret: str,
    files_claim: str | None = None,
    files_path: str | None = None,
    app_kind: str | None = None,
    app_name: str | None = None,
) -> dict[str, Any]:
    """A Backup's ``spec.source`` (a Restore's ``spec.target`` has the same shape)."""
    if files_path and not files_claim:
        raise CommandError("--files-path needs --files-claim")
    if app_kind and not app_name:
        raise CommandError("--app-kind needs --app-name")
    source: dict[str, Any] = {"database": {"secretRef": {"name": db_secret}}}
    if files_claim:
        pvc: dict[str, Any] = {"claimName": files_claim}
        if files_path:
            pvc["path"] = files_path.strip("/")
        source["files"] = {"persistentVolumeClaim": pvc}
    if app_name:
        source["app"] = {"kind": app_kind or "Deployment", "name": app_name}
    return source


def backup_body(
    name: str, namespace: str, *, storage: str, source: dict[str, Any], database_only: bool, comment: str
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "storageRef": {"name": storage},
        "source": source,
        "type": "OnDemand",
        "contents": "DatabaseOnly" if database_only else "Full",
    }
    if comment:
        spec["comment"] = comment
    return {
        "apiVersion": API_VERSION,
        "kind": "Backup",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def backup_row(b: dict[str, Any], with_namespace: bool) -> list[str]:
    """One line of ``backup list``: the columns of ``kubectl get backups``."""
    st, spec, meta = b.get("status") or {}, b.get("spec") or {}, b["metadata"]
    row = [
        meta["name"],
        st.get("phase") or "",
        spec.get("type") or "OnDemand",
        st.get("createdOn") or "",
        st.get("expiresOn") or (meta.get("annotations") or {}).get(f"{GROUP}/expires-at", ""),
        st.get("sizeUncompressedMB") or "",
        st.get("modelVersion") or "",
        spec.get("comment") or "",
    ]
    return [meta["namespace"], *row] if with_namespace else row


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns as kubectl prints them: left-aligned, three spaces apart, the last one unpadded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)


def list_backups(kube: Kube, namespace: str | None) -> list[dict[str, Any]]:
    """Every Backup of ``namespace`` (None: of every namespace), paged, ordered by namespace and name."""
    items: list[dict[str, Any]] = []
    token = None
    while True:
        kw: dict[str, Any] = {"limit": 500}
        if token:
            kw["_continue"] = token
        if namespace is None:
            page = kube.custom.list_cluster_custom_object(GROUP, VERSION, "backups", **kw)
        else:
            page = kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "backups", **kw)
        items += page.get("items", [])
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            break
    items.sort(key=lambda b: (b["metadata"]["namespace"], b["metadata"]["name"]))
    return items


def restore_target(
    backup: dict[str, Any],
    *,
    to_namespace: str,
    db_secret: str | None,
    files_claim: str | None,
    files_path: str | None,
    app_kind: str | None,
    app_name: str | None,
    database_only: bool,
) -> dict[str, Any]:
    """A Restore's ``spec.target``: each part given on the command line, else the Backup's own
    source's (the same names, in the target namespace)."""
    source = (backup.get("spec") or {}).get("source") or {}
    if not db_secret and not source:
        raise CommandError(
            f'Backup "{backup["metadata"]["name"]}" was uploaded and has no source to restore into: '
            "give --database-secret (and --files-claim for its files)"
        )
    db = db_secret or source["database"]["secretRef"]["name"]
    if files_path and not files_claim:
        raise CommandError("--files-path needs --files-claim")
    target = source_spec(db_secret=db, app_kind=app_kind, app_name=app_name)
    if files_claim:
        target["files"] = source_spec(db_secret=db, files_claim=files_claim, files_path=files_path)["files"]
    elif source.get("files") and not database_only:
        target["files"] = source["files"]
    if not app_name and source.get("app"):
        target["app"] = source["app"]
    contents = (backup.get("spec") or {}).get("contents") or "Full"
    if not database_only and contents == "Full" and "files" not in target:
        has_files = ((backup.get("status") or {}).get("files") or {}).get("count")
        if has_files:
            raise CommandError(
                f'Backup "{backup["metadata"]["name"]}" holds files: give --files-claim to restore them '
                f"in namespace {to_namespace}, or --database-only"
            )
    return target


def restore_body(
    name: str,
    namespace: str,
    *,
    backup_name: str,
    backup_namespace: str,
    target: dict[str, Any],
    database_only: bool,
    stop_app: bool,
) -> dict[str, Any]:
    ref = {"name": backup_name}
    if backup_namespace != namespace:
        ref["namespace"] = backup_namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "Restore",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "backupRef": ref,
            "target": target,
            "contents": "DatabaseOnly" if database_only else "Full",
            "stopApp": stop_app,
        },
    }


def describe_target(namespace: str, target: dict[str, Any]) -> str:
    parts = [f"database Secret {namespace}/{target['database']['secretRef']['name']}"]
    pvc = (target.get("files") or {}).get("persistentVolumeClaim")
    if pvc:
        parts.append(f"files PVC {pvc['claimName']}" + (f" path {pvc['path']}" if pvc.get("path") else ""))
    elif (target.get("files") or {}).get("s3"):
        parts.append(f"files bucket {target['files']['s3']['bucket']}")
    if target.get("app"):
        parts.append(f"app {target['app'].get('kind') or 'Deployment'} {target['app']['name']}")
    return ", ".join(parts)


def restore_progress(obj: dict[str, Any]) -> tuple[float | None, str]:
    """(percent or None, a short text) of a Restore's ``status.progress``."""
    p = (obj.get("status") or {}).get("progress") or {}
    if not p:
        return None, ""
    detail = []
    if p.get("stage"):
        detail.append(str(p["stage"]))
    if p.get("filesTotal"):
        detail.append(f"{p.get('filesDone', 0)}/{p['filesTotal']} files")
    if p.get("bytesTotal"):
        detail.append(f"{p.get('bytesDone', 0) / 1e6:.1f}/{p['bytesTotal'] / 1e6:.1f} MB")
    pct = p.get("percent")
    return (float(pct) if pct is not None else None), ", ".join(detail)


def follow(
    kube: Kube,
    plural: str,
    namespace: str,
    name: str,
    follower: Follower,
    *,
    timeout: float | None = None,
    interval: float = 1.0,
    progress: Callable[[dict[str, Any]], tuple[float | None, str]] = lambda _: (None, ""),
    terminal: tuple[str, ...] = TERMINAL,
) -> dict[str, Any]:
    """Poll the object until its phase is Completed or Failed; returns it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with follower:
        while True:
            obj = kube.get(plural, namespace, name)
            if obj is None:
                raise CommandError(f"{plural[:-1].capitalize()} {namespace}/{name} was deleted")
            st = obj.get("status") or {}
            pct, detail = progress(obj)
            follower.update(st.get("phase") or "", st.get("message") or "", pct, detail)
            if st.get("phase") in terminal:
                return obj
            if deadline is not None and time.monotonic() > deadline:
                raise CommandError(
                    f"{plural[:-1].capitalize()} {namespace}/{name} is still {st.get('phase') or 'pending'} "
                    f"after {timeout:.0f}s (is the operator running?)"
                )
            time.sleep(interval)
