"""Report a restore's (or a restore drill's) progress into its object's status while the Job runs.

The one thing the agent says to the Kubernetes API, and the least it can: a JSON merge patch of
``status.progress`` of one Restore, with a service account token the operator minted for that
Restore alone (its Role grants ``patch`` on ``restores/status`` for that one name). Plain HTTPS
through ``urllib``: the agent does not carry a Kubernetes client for one request.

Reports are throttled (one a second plus the last), and a report that fails is
logged and dropped: progress is information, never a reason for a restore to fail.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightjar.domain.retention import format_time

API_GROUP_PATH = "/apis/nightjar.dev/v1alpha1"


@dataclass
class Counters:
    """What has been restored so far; updated from the worker threads."""

    bytes_total: int = 0
    files_total: int = 0
    bytes_done: int = 0
    files_done: int = 0
    stage: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, nbytes: int = 0, nfiles: int = 0) -> None:
        with self.lock:
            self.bytes_done += nbytes
            self.files_done += nfiles

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            total = max(self.bytes_total, 1)
            percent = min(100, int(self.bytes_done * 100 / total)) if self.bytes_total else 100
            if self.files_total and not self.bytes_total:
                percent = min(100, int(self.files_done * 100 / self.files_total))
            return {
                "bytesDone": self.bytes_done,
                "bytesTotal": self.bytes_total,
                "filesDone": self.files_done,
                "filesTotal": self.files_total,
                "percent": percent,
                "display": f"{percent}%",
                "stage": self.stage,
                "updatedAt": format_time(dt.datetime.now(dt.UTC)),
            }


class Reporter:
    """Patches ``status.progress``; a no-op when the Job gave no API credentials."""

    def __init__(
        self, namespace: str, name: str, api_dir: str, interval: float = 1.0, resource: str = "restores"
    ) -> None:
        """``resource``: the plural of the object reported to (restores, or verifications for a
        drill); the token the Job gets may patch only that one object's status."""
        self.namespace = namespace
        self.name = name
        self.interval = interval
        self.last = 0.0
        self.url = ""
        self.ctx: ssl.SSLContext | None = None
        self.token_file: Path | None = None
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
        if api_dir and host and name:
            d = Path(api_dir)
            if (d / "token").is_file():
                self.token_file = d / "token"
                ca = d / "ca.crt"
                self.ctx = ssl.create_default_context(cafile=str(ca) if ca.is_file() else None)
                h = f"[{host}]" if ":" in host else host
                path = f"{API_GROUP_PATH}/namespaces/{namespace}/{resource}/{name}/status"
                self.url = f"https://{h}:{port or 443}{path}"

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def report(self, counters: Counters, force: bool = False) -> None:
        now = time.monotonic()
        if self.token_file is None or (not force and now - self.last < self.interval):
            return
        self.last = now
        body = json.dumps({"status": {"progress": counters.snapshot()}}).encode()
        req = urllib.request.Request(  # noqa: S310 - always https://, built above
            self.url,
            data=body,
            method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                "Authorization": "Bearer " + self.token_file.read_text().strip(),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ctx) as resp:  # noqa: S310
                resp.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            print(f"progress report failed (the restore goes on): {e}", file=sys.stderr)


class Ticker:
    """Reports every ``interval`` seconds from a background thread until stopped."""

    def __init__(self, reporter: Reporter, counters: Counters) -> None:
        self.reporter = reporter
        self.counters = counters
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(self.reporter.interval):
            self.reporter.report(self.counters, force=True)

    def __enter__(self) -> Ticker:
        if self.reporter.enabled:
            self.reporter.report(self.counters, force=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=15)
        self.reporter.report(self.counters, force=True)
