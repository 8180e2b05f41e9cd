"""The fault-injection run's workload: lanes of Backups, Restores and expiries on the real stack.

Each lane is a namespace of its own with a source database and files PVC, a restore target
database and PVC, and a BackupStorage on the primary S3 server replicated to one on the replica
server (plain buckets: deletion really deletes, so the bucket can be checked for orphans). A lane
works sequentially — it changes its source only when its previous Backup is terminal, so what
each Backup must hold is known (``Content``) — while the lanes run side by side and the fault
thread breaks things underneath them. Every API and SQL call is retried through outages.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kubernetes.client.rest import ApiException

from nightjar.devstack.chaos.invariants import COMPLETED, FAILED, Content, RestoreSeen

T = TypeVar("T")
G, V = "nightjar.dev", "v1alpha1"
AGENT_UID = 65532  # the agent's uid in the image: a hostPath volume gets no fsGroup
ROWS = 200  # rows a Backup's generation adds
TERMINAL = (COMPLETED, FAILED)


class ChaosError(Exception):
    """The driver itself could not go on (not an invariant violation)."""


def call(fn: Callable[..., T], *args: Any, timeout: float = 180, **kw: Any) -> T:
    """``fn(*args, **kw)`` against the API server, retried while it is down or answers 5xx/429
    (the run stops it on purpose); other API errors are raised at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn(*args, _request_timeout=20, **kw)
        except ApiException as e:
            if e.status and e.status < 500 and e.status != 429:
                raise
            err: Exception = e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            err = e
        if time.monotonic() > deadline:
            raise ChaosError(f"the API server did not answer for {timeout:.0f}s: {err}") from err
        time.sleep(1)


def create(fn: Callable[..., Any], *args: Any) -> None:
    """Create an object; one that exists already (an answer lost in an outage) is fine."""
    try:
        call(fn, *args)
    except ApiException as e:
        if e.status != 409:
            raise


class Pg:
    """The stack's PostgreSQL through psql, retried while it restarts."""

    def __init__(self, env: dict[str, str]) -> None:
        self.psql = os.path.join(env["NIGHTJAR_PG_BINDIR"], "psql")
        self.admin = env["NIGHTJAR_PG_DSN"]

    def dsn(self, db: str) -> str:
        return self.admin.rsplit("/", 1)[0] + f"/{db}"

    def run(self, db: str, sql: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while True:
            res = subprocess.run(
                [self.psql, self.dsn(db), "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
            )
            if res.returncode == 0:
                return res.stdout.strip()
            # psql exits 2 when the connection failed or broke (a restart), 3 on an SQL error.
            if res.returncode != 2 or time.monotonic() > deadline:
                raise ChaosError(f"psql on {db} failed ({res.returncode}): {res.stderr.strip()}")
            time.sleep(1)

    def digest(self, db: str) -> str:
        """Rows of ``items`` in ``db``: their count and an md5 of all of them in id order."""
        return self.run(
            db,
            "select count(*) || ':' || coalesce(md5(string_agg(i::text, '|' order by i.id)), '')"
            " from items i",
        )


def tree_digest(root: Path) -> str:
    """Everything under ``root``: paths, kinds, file contents and symlink targets, as one sha256."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                h.update(f"l {rel} {os.readlink(p)}\n".encode())
            elif p.is_dir():
                h.update(f"d {rel}\n".encode())
            else:
                h.update(f"f {rel} {hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def give_to_agent(path: Path) -> None:
    """The agent (a non-root uid) may replace everything under ``path`` (written here as root)."""
    if os.geteuid() != 0:
        return
    os.chown(path, AGENT_UID, AGENT_UID)
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), AGENT_UID, AGENT_UID, follow_symlinks=False)


@dataclass
class Kube:
    core: Any
    custom: Any
    batch: Any


@dataclass
class Pending:
    """A Restore the lane stopped waiting for: judged once the run has settled."""

    name: str
    backup: str
    expected: Content
    before: Content


@dataclass
class Lane:
    """One namespace's sequential workload. ``log`` and ``count`` are shared with the run."""

    index: int
    tag: str
    kube: Kube
    pg: Pg
    env: dict[str, str]
    rng: random.Random
    log: Callable[[str], None]
    count: Callable[[str], None]
    op_timeout: float = 240
    gen: int = 0
    restores: int = 0
    expected: dict[str, Content] = field(default_factory=dict)  # Backup name -> what it must hold
    completed: list[str] = field(default_factory=list)
    expired: set[str] = field(default_factory=set)
    seen_restores: list[RestoreSeen] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    stuck_backup: bool = False  # a Backup did not finish in time: the source is left alone
    files: Path = Path()
    target_files: Path = Path()
    errors: int = 0

    @property
    def ns(self) -> str:
        return f"chaos-{self.tag}-{self.index}"

    @property
    def db(self) -> str:
        return f"chaos_{self.tag}_{self.index}"

    @property
    def target_db(self) -> str:
        return f"{self.db}_t"

    @property
    def prefix(self) -> str:
        return f"chaos-{self.tag}"

    @property
    def replica_prefix(self) -> str:
        return f"chaos-{self.tag}-dr"

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        core = self.kube.core
        create(
            core.create_namespace, {"metadata": {"name": self.ns, "labels": {"nightjar.dev/chaos": "true"}}}
        )
        self._wait(
            "the default ServiceAccount",
            lambda: any(
                sa.metadata.name == "default"
                for sa in call(core.list_namespaced_service_account, self.ns).items
            ),
            60,
        )
        password = hashlib.sha256(f"{self.tag}{self.index}{time.time()}".encode()).hexdigest()[:24]
        role = self.db
        self.pg.run("postgres", f"drop database if exists {self.db} with (force)")
        self.pg.run("postgres", f"drop database if exists {self.target_db} with (force)")
        self.pg.run(
            "postgres",
            f"do $$ begin if not exists (select from pg_roles where rolname = '{role}') then "
            f"create role {role} login; end if; end $$; alter role {role} login password '{password}'",
        )
        for db in (self.db, self.target_db):
            self.pg.run("postgres", f"create database {db} owner {role}")
        self.pg.run(
            self.db,
            f"set role {role}; create table items (id int primary key, gen int not null, payload text);"  # noqa: S608
            " insert into items select g, 0, md5(g::text) from generate_series(1, 2000) g",
        )
        for secret, db in (("db", self.db), ("target-db", self.target_db)):
            data = {
                "host": self.env["NIGHTJAR_PG_HOST"],
                "port": self.env["NIGHTJAR_PG_PORT"],
                "dbname": db,
                "user": role,
                "password": password,
            }
            create(core.create_namespaced_secret, self.ns, {"metadata": {"name": secret}, "stringData": data})
        self.files = self._claim("files") / "docs"
        self.target_files = self._claim("target-files") / "docs"
        self.files.mkdir(parents=True, exist_ok=True)
        self.target_files.mkdir(parents=True, exist_ok=True)
        for i in range(20):
            d = self.files / f"{i % 4:02d}"
            d.mkdir(exist_ok=True)
            (d / f"doc-{i}.bin").write_bytes(self.rng.randbytes(256 * (i + 1)))
        (self.files / "common.txt").write_text("generation 0\n")
        give_to_agent(self.files.parent)
        give_to_agent(self.target_files.parent)
        self._storages()

    def _claim(self, name: str) -> Path:
        core = self.kube.core
        create(
            core.create_namespaced_persistent_volume_claim,
            self.ns,
            {
                "metadata": {"name": name},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            },
        )
        pvc = self._wait(
            f"PVC {self.ns}/{name} bound",
            lambda: (
                (c := call(core.read_namespaced_persistent_volume_claim, name, self.ns)).status.phase
                == "Bound"
                and c
            ),
            90,
        )
        pv = call(core.read_persistent_volume, pvc.spec.volume_name)
        return Path(pv.spec.host_path.path)

    def _storages(self) -> None:
        for name, pre, prefix, replicas in (
            ("dr", "NIGHTJAR_S3_REPLICA_", self.replica_prefix, []),
            ("s3", "NIGHTJAR_S3_", self.prefix, [{"name": "dr"}]),
        ):
            create(
                self.kube.core.create_namespaced_secret,
                self.ns,
                {
                    "metadata": {"name": f"{name}-creds"},
                    "stringData": {
                        "AWS_ACCESS_KEY_ID": self.env[f"{pre}ACCESS_KEY"],
                        "AWS_SECRET_ACCESS_KEY": self.env[f"{pre}SECRET_KEY"],
                    },
                },
            )
            spec: dict[str, Any] = {
                "endpoint": self.env[f"{pre}ENDPOINT"],
                "bucket": self.env[f"{pre}BUCKET_PLAIN"],
                "region": "us-east-1",
                "prefix": prefix,
                "credentials": {"secretName": f"{name}-creds"},
                "objectLock": {"mode": "None"},
                "jurisdiction": "EU",
            }
            if replicas:
                spec["replicas"] = replicas
            body = {
                "apiVersion": f"{G}/{V}",
                "kind": "BackupStorage",
                "metadata": {"name": name},
                "spec": spec,
            }
            create(self.kube.custom.create_namespaced_custom_object, G, V, self.ns, "backupstorages", body)
            self._wait(
                f"BackupStorage {self.ns}/{name} Ready",
                partial(self._ready, name),
                120,
            )

    # --- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            op = self.rng.choices(("backup", "restore", "expire"), weights=(5, 2, 1))[0]
            live = [b for b in self.completed if b not in self.expired]
            if op == "restore" and (not live or self.pending):
                op = "backup"
            if op == "expire" and len(live) < 3:
                op = "backup"
            if op == "backup" and self.stuck_backup:
                op = "restore" if live and not self.pending else "idle"
            try:
                if op == "backup":
                    self.backup()
                elif op == "restore":
                    self.restore(self.rng.choice(live))
                elif op == "expire":
                    self.expire(self.rng.choice(live[:-1]))  # never the newest: restores use it
                else:
                    stop.wait(5)
            except Exception as e:
                self.errors += 1
                self.count("driver errors (retried ops)")
                self.log(f"lane {self.index}: {op} failed in the driver: {type(e).__name__}: {e}")
                stop.wait(2)

    def backup(self) -> None:
        self.gen += 1
        k = self.gen
        name = f"b{k:03d}"
        self.pg.run(
            self.db,
            f"insert into items select g, {k}, md5(g::text || '{k}')"  # noqa: S608 - numbers of ours
            f" from generate_series({2000 + ROWS * k + 1}, {2000 + ROWS * (k + 1)}) g;"
            f" update items set gen = {k}, payload = md5(payload) where id % 7 = {k % 7}",
        )
        gen_dir = self.files / f"gen-{k:03d}"
        gen_dir.mkdir()
        for j in range(self.rng.randint(1, 4)):
            (gen_dir / f"f{j}.bin").write_bytes(self.rng.randbytes(self.rng.randint(100, 60_000)))
        (self.files / "common.txt").write_text(f"generation {k}\n")
        shutil.rmtree(self.files / f"gen-{k - 3:03d}", ignore_errors=True)
        give_to_agent(self.files)
        self.expected[name] = Content(self.pg.digest(self.db), tree_digest(self.files))
        body = {
            "apiVersion": f"{G}/{V}",
            "kind": "Backup",
            "metadata": {"name": name, "labels": {"nightjar.dev/chaos": self.tag}},
            "spec": {
                "storageRef": {"name": "s3"},
                "source": {
                    "database": {"secretRef": {"name": "db"}},
                    "files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}},
                },
                "comment": f"chaos generation {k}",
            },
        }
        t = time.monotonic()
        create(self.kube.custom.create_namespaced_custom_object, G, V, self.ns, "backups", body)
        self.count("backups created")
        st = self._wait_status("backups", name, self.op_timeout)
        phase = st.get("phase", "")
        if phase not in TERMINAL:
            self.stuck_backup = True
            self.log(f"lane {self.index}: backup {name} still {phase or '-'} after {self.op_timeout:.0f}s")
            return
        self.count(f"backups {phase}")
        if phase == COMPLETED:
            self.completed.append(name)
        msg = "" if phase == COMPLETED else f": {st.get('message', '')}"
        self.log(f"lane {self.index}: backup {name} {phase} ({time.monotonic() - t:.0f}s){msg}")

    def restore(self, backup: str) -> None:
        self.restores += 1
        n = self.restores
        name = f"r{n:03d}"
        # The target before: other rows and files than any Backup holds.
        self.pg.run(
            self.target_db,
            f"set role {self.db}; drop table if exists items; create table items (id int primary key, gen int"  # noqa: S608
            f" not null, payload text); insert into items values (1, -1, 'stale {n}')",
        )
        shutil.rmtree(self.target_files, ignore_errors=True)
        (self.target_files / "stale").mkdir(parents=True)
        (self.target_files / "stale" / f"before-{n}.txt").write_text(f"stale {n}\n")
        give_to_agent(self.target_files)
        before = self._target()
        body = {
            "apiVersion": f"{G}/{V}",
            "kind": "Restore",
            "metadata": {"name": name, "labels": {"nightjar.dev/chaos": self.tag}},
            "spec": {
                "backupRef": {"name": backup},
                "target": {
                    "database": {"secretRef": {"name": "target-db"}},
                    "files": {"persistentVolumeClaim": {"claimName": "target-files", "path": "docs"}},
                },
                "contents": "Full",
            },
        }
        t = time.monotonic()
        create(self.kube.custom.create_namespaced_custom_object, G, V, self.ns, "restores", body)
        self.count("restores created")
        st = self._wait_status("restores", name, self.op_timeout)
        if st.get("phase") not in TERMINAL:
            self.pending.append(Pending(name, backup, self.expected[backup], before))
            self.log(f"lane {self.index}: restore {name} still {st.get('phase') or '-'}; judged at the end")
            return
        self.judge(Pending(name, backup, self.expected[backup], before), st)
        self.log(
            f"lane {self.index}: restore {name} of {backup} {st['phase']}"
            f" ({time.monotonic() - t:.0f}s) {st.get('targetState', '')}"
        )

    def judge(self, p: Pending, st: dict[str, Any]) -> None:
        phase = st.get("phase", "")
        self.count(f"restores {phase or 'unfinished'}")
        self.seen_restores.append(
            RestoreSeen(
                ref=f"{self.ns}/{p.name}",
                backup=p.backup,
                phase=phase,
                target_state=st.get("targetState", ""),
                message=st.get("message", ""),
                expected=p.expected,
                before=p.before,
                after=self._target(),
            )
        )

    def expire(self, backup: str) -> None:
        past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        call(
            self.kube.custom.patch_namespaced_custom_object,
            G,
            V,
            self.ns,
            "backups",
            backup,
            {"metadata": {"annotations": {"nightjar.dev/expires-at": past}}},
        )
        self.expired.add(backup)
        self.count("backups expired (for GC)")
        self.log(f"lane {self.index}: backup {backup} expired: GC must delete it")

    # --- helpers --------------------------------------------------------------------------

    def _target(self) -> Content:
        try:
            db = self.pg.digest(self.target_db)
        except ChaosError as e:
            db = f"unreadable: {e}"
        return Content(db, tree_digest(self.target_files))

    def _ready(self, storage: str) -> bool:
        return _phase(self._get("backupstorages", storage)) == "Ready"

    def _get(self, plural: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = call(self.kube.custom.get_namespaced_custom_object, G, V, self.ns, plural, name)
        return obj

    def _wait_status(self, plural: str, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                st = self._get(plural, name).get("status") or {}
            except ChaosError:
                continue
            if st.get("phase") in TERMINAL:
                break
            time.sleep(1)
        return st

    def _wait(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = check()
                if got:
                    return got
            except ApiException as e:
                if e.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise ChaosError(f"{what}: not after {timeout:.0f}s")
            time.sleep(0.5)


def _phase(obj: dict[str, Any]) -> str:
    return str((obj.get("status") or {}).get("phase") or "")
