"""The local stack: real etcd, kube-apiserver, kube-controller-manager, process node, MinIO and
PostgreSQL as local processes on loopback, plus the Nightjar operator. With ``node="real"``
(``up --node real``) a real kubelet with containerd replaces the process node (see ``realnode``).

TEST/DEV ONLY. ``make up`` / ``make down`` and the test suite drive this module. Every process
is started detached with its pid recorded under ``<state>/pids``; ``down`` stops exactly those
pids (checking each still runs the binary it recorded, so a recycled pid is never signalled),
then any container process the process node left behind. ``up`` on a recorded stack starts again
only what died, on its recorded ports, keys, PKI and data (``restart_plan``); what cannot restart in
place (another node kind, a record or file that is gone) is never wiped: the user is asked to run
``down`` then ``up``. ``restart_operator`` (``devstack restart``, ``make restart``) restarts the
operator alone.

State layout (``<state>`` is ``.local`` for ``make up``, ``.local/test`` for ``make test``):
``kubeconfig``, ``env`` (shell ``export`` lines), ``state.json``, ``logs/``, ``pids/``,
``pki/``, ``etcd/``, ``s3/``, ``s3-replica/``, ``node/``; PostgreSQL's data dir lives in a temp dir
owned by a non-root user (the server refuses to run as root).

Two independent S3 servers (MinIO) run: the primary and a replica, each with its own port, data dir
and root keys (see ``S3_SERVERS``). ``stop_s3``/``start_s3`` stop one and start it again on the same
port, data dir and keys, so tests can take a storage location down and bring it back.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nightjar.storage.objects import S3Store

REPO_ROOT = Path(__file__).resolve().parents[3]
CONTROLLERS = ",".join(
    [
        "job-controller",
        "cronjob-controller",
        "garbage-collector-controller",
        "namespace-controller",
        "ttl-after-finished-controller",
        "deployment-controller",
        "replicaset-controller",
        "statefulset-controller",
        "persistentvolume-binder-controller",
        # They take the kubernetes.io/pvc-protection and pv-protection finalizers (which the API
        # server's admission adds) off unused claims and unbound volumes: without them a namespace
        # holding a PVC never finishes deleting.
        "persistentvolumeclaim-protection-controller",
        "persistentvolume-protection-controller",
        "serviceaccount-controller",
        "pod-garbage-collector-controller",
        "root-ca-certificate-publisher-controller",
    ]
)
ADMIN_TOKEN_USER = "nightjar-admin"  # noqa: S105 - a user name, not a secret
BUCKET_LOCKED = "nightjar-locked"
BUCKET_PLAIN = "nightjar-plain"
NODE_NAME = "nightjar-process-node"
# What runs the Pods: "process" (the process node) or "real" (containerd and a kubelet).
NODE_KINDS = ("process", "real")
S3_REGION = "us-east-1"
# The API server's Service range; its first address is the ``kubernetes`` Service's ClusterIP,
# which the kubelet gives every Pod as KUBERNETES_SERVICE_HOST (port 443).
SERVICE_CIDR = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class S3Server:
    """One of the stack's MinIO servers: what tells it apart from the other."""

    which: str  # "primary" | "replica": the name the CLI and the tests use
    proc: str  # process name in state.json, logs/<proc>.log, pids/<proc>.pid
    data: str  # data dir under <state>
    port_key: str  # key in State.ports
    env_prefix: str  # prefix of its lines in <state>/env
    bucket_locked: str
    bucket_plain: str

    def env(self, host: str, port: int, access_key: str, secret_key: str) -> dict[str, str]:
        """Its lines of ``<state>/env``."""
        p = self.env_prefix
        return {
            f"{p}ENDPOINT": f"http://{host}:{port}",
            f"{p}REGION": S3_REGION,
            f"{p}ACCESS_KEY": access_key,
            f"{p}SECRET_KEY": secret_key,
            f"{p}BUCKET_LOCKED": self.bucket_locked,
            f"{p}BUCKET_PLAIN": self.bucket_plain,
        }


S3_SERVERS = {
    s.which: s
    for s in (
        S3Server("primary", "minio", "s3", "s3", "NIGHTJAR_S3_", BUCKET_LOCKED, BUCKET_PLAIN),
        S3Server(
            "replica",
            "minio-replica",
            "s3-replica",
            "s3_replica",
            "NIGHTJAR_S3_REPLICA_",
            "nightjar-replica-locked",
            "nightjar-replica-plain",
        ),
    )
}


class StackError(Exception):
    """Something the user must fix; the message says what."""


def versions() -> dict[str, str]:
    """The pinned versions, from hack/versions.env (the one place they are set)."""
    out: dict[str, str] = {}
    for raw in (REPO_ROOT / "hack" / "versions.env").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def cache_dir() -> Path:
    base = os.environ.get("NIGHTJAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nightjar"
    )
    return Path(base)


def binary(component: str, name: str) -> Path:
    v = versions()
    key = {
        "kubernetes": "KUBERNETES_VERSION",
        "etcd": "ETCD_VERSION",
        "minio": "MINIO_VERSION",
        "helm": "HELM_VERSION",
        "prometheus": "PROMETHEUS_VERSION",
    }[component]
    version = v[key] + (
        f"+{v['KUBERNETES_BUILD']}" if component == "kubernetes" and v.get("KUBERNETES_BUILD") else ""
    )
    p = cache_dir() / "bin" / f"{component}-{version}" / name
    if not p.is_file():
        raise StackError(f"{p} is missing: run `make binaries` (hack/build-binaries.sh) to build it")
    return p


def postgres_bindir() -> Path:
    base = Path("/usr/lib/postgresql")
    found = sorted(
        (p for p in base.glob("*/bin") if (p / "postgres").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise StackError("PostgreSQL server is not installed: apt-get install postgresql (make deps does it)")
    return found[-1]


def free_port(avoid: Iterable[int] = ()) -> int:
    """A port nothing listens on now and not in ``avoid`` (the ports already handed out, which may
    not listen yet); each component gets its own, so a busy port is never chosen."""
    taken = set(avoid)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            return port


@dataclass
class Proc:
    name: str
    pid: int
    exe: str


@dataclass
class State:
    dir: str
    procs: list[Proc] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    pg_datadir: str = ""
    # S3Server.which -> {"access_key": ..., "secret_key": ...}: set once by `up`, reused by start_s3.
    s3_keys: dict[str, dict[str, str]] = field(default_factory=dict)
    pg_password: str = ""
    # Processes stopped on purpose (`stop_s3`): not running, and not a broken stack either.
    stopped: list[str] = field(default_factory=list)
    node: str = "process"  # one of NODE_KINDS
    # The real node: its names on the host (realnode.NodeNet), and which host objects it made.
    real_node: dict[str, str] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def host(self) -> str:
        """Where the API server, PostgreSQL and the S3 servers are reached: loopback, or with the
        real node its node IP (an address the stack made), because Pods there live in network
        namespaces of their own, where 127.0.0.1 is the Pod itself."""
        return self.real_node["node_ip"] if self.node == "real" and self.real_node else LOOPBACK

    def save(self) -> None:
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        tmp.rename(self.path / "state.json")

    @classmethod
    def load(cls, state_dir: Path) -> State | None:
        f = state_dir / "state.json"
        if not f.is_file():
            return None
        raw = json.loads(f.read_text(encoding="utf-8"))
        raw["procs"] = [Proc(**p) for p in raw.get("procs", [])]
        # Fields an older stack recorded and this code no longer has are dropped, so `status` and
        # `down` still work on a stack that an earlier version started.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def s3_server(which: str) -> S3Server:
    try:
        return S3_SERVERS[which]
    except KeyError:
        raise StackError(f"no S3 server {which!r}: choose one of {', '.join(S3_SERVERS)}") from None


def _alive(p: Proc) -> bool:
    """True when ``p.pid`` runs and is still the program we started (not a recycled pid)."""
    try:
        exe = os.readlink(f"/proc/{p.pid}/exe")
        stat = Path(f"/proc/{p.pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return os.path.realpath(exe.removesuffix(" (deleted)")) == os.path.realpath(p.exe)


def _terminate(p: Proc, sig: signal.Signals, grace: float = 15) -> None:
    """Send ``sig`` to ``p``'s process group, SIGKILL it after ``grace`` seconds; return once it is
    gone (or 5 s after the SIGKILL)."""
    if not _alive(p):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)
    deadline = time.monotonic() + grace
    while _alive(p) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(p):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(p) and time.monotonic() < deadline:
            time.sleep(0.05)
    # Reap our own children so they do not linger as zombies.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(p.pid, os.WNOHANG)


def _refuses(host: str, port: int) -> bool:
    """Nothing accepts connections on ``host``:``port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # a listener still closing (its process just killed): not yet
        return False


def _wait_for(
    what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes] | None, logfile: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}; see {logfile}:\n{_tail(logfile)}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise StackError(f"{what} was not ready after {timeout:.0f}s; see {logfile}:\n{_tail(logfile)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _http_ok(url: str, ctx: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    req = urllib.request.Request(url)  # noqa: S310 - loopback URLs we built
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=2, context=ctx) as r:  # noqa: S310
        return bool(r.status == 200)


# The real node's processes, in start order.
REAL_NODE_PROCS = ("containerd", "kubelet", "pod-binder")
# Restarting the key restarts these too, after it: a kubelet whose containerd died is restarted
# with it, so it talks to the new one from the start.
RESTART_WITH = {"containerd": ("kubelet",)}
ASK_FRESH = (
    "run `make down`, then `make up` (python -m nightjar.devstack down / up --state {dir}): "
    "that starts over with empty data and new ports, keys and PKI"
)


def components(node: str, with_operator: bool) -> list[str]:
    """The processes of a stack with ``node``, in start order (the order ``up`` restarts them in)."""
    return [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "postgres",
        *(srv.proc for srv in S3_SERVERS.values()),
        *(REAL_NODE_PROCS if node == "real" else ("process-node",)),
        "provisioner",
        *(("operator",) if with_operator else ()),
    ]


def restart_plan(
    node: str, with_operator: bool, recorded: Iterable[str], alive: Iterable[str], stopped: Iterable[str]
) -> list[str]:
    """What ``up`` starts on a stack that is already there, in start order: each recorded process
    that no longer runs, what restarts with it (``RESTART_WITH``), the S3 servers stopped on purpose,
    and the operator (when asked for) and the provisioner when never started (a stack an earlier
    version started). Empty: the stack is up.

    Raises StackError when the record lacks one of the stack's processes (an ``up`` that was
    interrupted, or a stack of another layout): that is not restarted in place."""
    recorded_set, alive_set, stopped_set = set(recorded), set(alive), set(stopped)
    wanted = components(node, with_operator)
    missing = [n for n in wanted if n not in recorded_set | stopped_set]
    if [n for n in missing if n not in ("operator", "provisioner")]:
        raise StackError(f"the stack's record has no {', '.join(missing)}")
    todo = {n for n in recorded_set | stopped_set if n not in alive_set} | set(missing)
    for name, also in RESTART_WITH.items():
        if name in todo:
            todo.update(a for a in also if a in recorded_set)
    unknown = todo - set(components(node, True))
    if unknown:
        raise StackError(
            f"the stack's record has processes this version does not know: {', '.join(sorted(unknown))}"
        )
    return [n for n in components(node, True) if n in todo]


def restart_blockers(st: State, names: Iterable[str]) -> list[str]:
    """Why the processes ``names`` of the stack recorded in ``st`` cannot start again in place on
    their recorded ports, keys and data (files or records that are gone); empty when they can."""
    d, p = st.path, st.ports
    need_files = [d / "kubeconfig", *(d / "pki" / f for f in ("token", "tokens.csv", "sa.key", "sa.pub"))]
    need_files.append(d / "pki" / "apiserver" / "apiserver.crt")
    need_ports: list[str] = []
    problems: list[str] = []
    if st.node not in NODE_KINDS:
        problems.append(f"its node kind {st.node!r} is unknown")
    if st.node == "real":
        if not all(st.real_node.get(k) for k in ("node_ip", "pod_cidr", "host_if", "socket", "cgroup_root")):
            problems.append("its record of the real node is incomplete")
        need_files += [d / "pki" / f"{n}.crt" for n in ("ca", "node", "kubelet", "apiserver-kubelet-client")]
    for name in names:
        if name == "etcd":
            need_ports += ["etcd", "etcd_peer"]
            need_files.append(d / "etcd")
        elif name == "kube-apiserver":
            need_ports += ["apiserver", "etcd"]
        elif name == "kube-controller-manager":
            need_ports.append("controller_manager")
        elif name == "postgres":
            need_ports.append("postgres")
            if not st.pg_password:
                problems.append("its record has no PostgreSQL password")
            need_files.append(Path(st.pg_datadir or "/nonexistent-pg-datadir") / "data" / "PG_VERSION")
        elif name in {srv.proc for srv in S3_SERVERS.values()}:
            srv = next(s for s in S3_SERVERS.values() if s.proc == name)
            need_ports.append(srv.port_key)
            need_files.append(d / srv.data)
            if not {"access_key", "secret_key"} <= set(st.s3_keys.get(srv.which, {})):
                problems.append(f"its record has no keys for S3 server {srv.which}")
    problems += [f"its record has no port {k}" for k in dict.fromkeys(need_ports) if not p.get(k)]
    problems += [f"{f} is missing" for f in dict.fromkeys(need_files) if not f.exists()]
    return problems


def _port_free(host: str, port: int) -> bool:
    """Nothing holds ``host``:``port`` (a server about to listen there again can bind it). Raises
    OSError when ``host`` is no address of this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _kill_group_leftovers(p: Proc, timeout: float = 10) -> None:
    """``p`` died: kill what is left of its process group (PostgreSQL's backends hold its shared
    memory, and a new postmaster refuses to start beside them). Only when ``p.pid`` is no other
    process now: the kernel does not hand out a pid while a process group of that id lives, so then
    every member of group ``p.pid`` is one of ours."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(p.pid, os.WNOHANG)  # our own child (the tests start stacks in-process): reap it
    try:
        state = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        state = "gone"
    if state not in ("gone", "Z"):
        return  # the pid runs another program now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_members(p.pid):
        time.sleep(0.05)


def _group_members(pgid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields_ = (d / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if fields_[0] != "Z" and int(fields_[2]) == pgid:
                found.append(int(d.name))
    return found


class Stack:
    """Starts and stops the stack recorded in ``state_dir``."""

    def __init__(self, state_dir: Path, out: Callable[[str], None] = print) -> None:
        self.dir = state_dir.resolve()
        self.out = out

    # --- helpers ------------------------------------------------------------------------

    def _spawn(
        self,
        st: State,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        logfile = self.dir / "logs" / f"{name}.log"
        exe = os.path.realpath(argv[0])
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                user=user,
                cwd=cwd,
            )
        st.procs.append(Proc(name=name, pid=proc.pid, exe=exe))
        (self.dir / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")
        st.save()
        return proc

    def status(self) -> tuple[State | None, list[Proc], list[Proc]]:
        st = State.load(self.dir)
        if st is None:
            return None, [], []
        alive = [p for p in st.procs if _alive(p)]
        dead = [p for p in st.procs if not _alive(p)]
        return st, alive, dead

    # --- up -----------------------------------------------------------------------------

    def up(self, with_operator: bool = True, node: str = "process") -> State:
        if node not in NODE_KINDS:
            raise StackError(f"no node kind {node!r}: choose one of {', '.join(NODE_KINDS)}")
        if node == "real" and os.geteuid() != 0:
            raise StackError(
                "the real node needs root (it makes interfaces, cgroups and mounts): run as root, "
                "or use the process node (`--node process`, make NODE=process)"
            )
        st, alive, _dead = self.status()
        if st is not None:
            # A stack is recorded: what no longer runs starts again on its ports, keys and data.
            return self._resume(st, alive, with_operator, node)
        # Every `up` starts from empty data: the stack is for development and tests, and its
        # credentials are new each time.
        data = ("pids", "pki", "etcd", *(srv.data for srv in S3_SERVERS.values()), "node", "volumes")
        for sub in data:
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        for sub in ("logs", *data):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        st = State(dir=str(self.dir), node=node)
        st.save()
        try:
            if node == "real":
                from nightjar.devstack import realnode

                # Before anything starts: installing packages may take a minute.
                realnode.ensure_packages(self.out)
                st.real_node = realnode.choose_net(self.dir).to_dict()
                st.save()
                # First: the node IP is where the API server, PostgreSQL and MinIO listen.
                realnode.make_interfaces(realnode.NodeNet.from_dict(st.real_node), self._recorder(st))
            self._pki(st)
            self._etcd(st)
            self._apiserver(st)
            self._controller_manager(st)
            self._postgres(st)
            self._minio(st)
            self._write_env(st)
            if node == "real":
                self._real_node(st)
            else:
                self._process_node(st)
            self._provisioner(st)
            self._install_crds()
            if with_operator:
                self._operator(st)
        except BaseException:
            self.out("Start failed; stopping what was started.")
            self.down(quiet=True)
            raise
        return st

    def _resume(self, st: State, alive: list[Proc], with_operator: bool, node: str) -> State:
        """``up`` on a recorded stack: start each of its processes that died (and what must restart
        with it) again, in start order, on its recorded ports, keys, PKI and data; start the S3
        servers stopped on purpose again. What cannot restart in place is not wiped: the user is
        asked to run ``down`` then ``up``."""
        ask = ASK_FRESH.format(dir=self.dir)
        if st.node != node:
            raise StackError(
                f"the stack in {self.dir} runs the {st.node} node, not the {node} node: to switch, {ask}"
            )
        try:
            plan = restart_plan(
                node, with_operator, [p.name for p in st.procs], [p.name for p in alive], st.stopped
            )
        except StackError as e:
            raise StackError(f"the stack in {self.dir} cannot be restarted in place ({e}): {ask}") from None
        msg = f"The stack in {self.dir} is already up ({len(alive)} processes)"
        if not plan:
            self.out(f"{msg}; nothing changed.")
            return st
        problems = restart_blockers(st, plan)
        if problems:
            raise StackError(
                f"the stack in {self.dir} cannot be restarted in place ({'; '.join(problems)}): {ask}"
            )
        stopped = [srv for srv in S3_SERVERS.values() if srv.proc in st.stopped]
        if {srv.proc for srv in stopped} == set(plan):
            # A server stopped with `s3 stop` is part of the stack: `up` starts it again.
            for srv in stopped:
                self.start_s3(srv.which)
            self.out(f"{msg}; started the stopped S3 server {', '.join(s.which for s in stopped)} again.")
            return self._recorded()
        recorded = {p.name for p in st.procs}
        died = [n for n in plan if n in recorded and not any(p.name == n for p in alive)]
        self.out(f"Restarting in {self.dir} what no longer runs: {', '.join(plan)}.")
        t = time.monotonic()
        try:
            for name in plan:
                self._restart_one(st, name)
                if name == "etcd" and "kube-apiserver" not in plan:
                    # The API server reconnects to etcd by itself; it serves once it has.
                    self._wait_apiserver(st, None)
            self._write_env(st)
        except StackError as e:
            raise StackError(
                f"{e}\nRestarting in place failed; the rest of the stack still runs. Try `up` again, or {ask}"
            ) from None
        took = f"{time.monotonic() - t:.1f}s"
        if died:
            they = "it" if len(died) == 1 else "they"
            self.out(f"Restarted {', '.join(died)} ({they} had died); data kept ({took}).")
        for name in plan:
            causes = [d for d in died if name in RESTART_WITH.get(d, ())]
            if causes and name not in died:
                self.out(f"Restarted {name} too (with {', '.join(causes)}).")
        if stopped:
            self.out(f"Started the stopped S3 server {', '.join(s.which for s in stopped)} again.")
        for name in ("provisioner", "operator"):
            if name in plan and name not in recorded:
                self.out(f"Started the {name} (the stack ran without one).")
        return st

    def _restart_one(self, st: State, name: str) -> None:
        """Start process ``name`` of the stack again in its recorded place (ports, keys, data)."""
        for p in [p for p in st.procs if p.name == name]:
            if _alive(p):  # restarted with another one (RESTART_WITH)
                _terminate(p, signal.SIGTERM)
            elif name != "containerd":  # the containers' shims outlive containerd on purpose
                _kill_group_leftovers(p)
            st.procs.remove(p)
        st.save()
        host = {"etcd": LOOPBACK, "kube-controller-manager": LOOPBACK}.get(name, st.host)
        ports = {
            "etcd": ["etcd", "etcd_peer"],
            "kube-apiserver": ["apiserver"],
            "kube-controller-manager": ["controller_manager"],
            "postgres": ["postgres"],
            **{srv.proc: [srv.port_key] for srv in S3_SERVERS.values()},
        }.get(name, [])
        for key in ports:
            self._wait_port_free(name, host, st.ports[key])
        srv = next((s for s in S3_SERVERS.values() if s.proc == name), None)
        if name == "etcd":
            self._etcd(st)
        elif name == "kube-apiserver":
            self._apiserver(st)
        elif name == "kube-controller-manager":
            self._controller_manager(st)
        elif name == "postgres":
            self._postgres(st)
        elif srv is not None:
            self._start_s3(st, srv)
        elif name == "process-node":
            self._kill_node_leftovers()
            self._process_node(st)
        elif name in REAL_NODE_PROCS:
            self._restart_real_node_proc(st, name)
        elif name == "provisioner":
            self._provisioner(st)
        elif name == "operator":
            self._operator(st)
        else:  # restart_plan names only the processes above
            raise StackError(f"no way to restart {name}")

    def _restart_real_node_proc(self, st: State, name: str) -> None:
        from nightjar.devstack import realnode

        net = realnode.NodeNet.from_dict(st.real_node)

        def spawn(proc_name: str, argv: list[str]) -> subprocess.Popen[bytes]:
            return self._spawn(st, proc_name, argv)

        node = realnode.RealNode(self.dir, net, self.out)
        if name == "containerd":
            node.restart_containerd(spawn)
        elif name == "kubelet":
            self._wait_port_free(name, net.node_ip, realnode.KUBELET_PORT)
            node.restart_kubelet(spawn, self.dir / "kubeconfig")
        else:
            self._pod_binder(st)

    def _wait_port_free(self, name: str, host: str, port: int, timeout: float = 15) -> None:
        """The port ``name`` listened on is free again (a process just killed may hold it a moment
        longer); another program holding it blocks the restart in place."""
        deadline = time.monotonic() + timeout
        try:
            while not _port_free(host, port):
                if time.monotonic() > deadline:
                    raise StackError(f"{host}:{port}, the port of {name}, is held by another process")
                time.sleep(0.1)
        except OSError as e:
            raise StackError(f"{name} cannot listen on {host}:{port} again: {e}") from None

    def _pki(self, st: State) -> None:
        pki = self.dir / "pki"
        if shutil.which("openssl") is None:
            raise StackError("openssl is not installed: apt-get install openssl")
        subprocess.run(
            ["openssl", "genrsa", "-out", str(pki / "sa.key"), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")],
            check=True,
            capture_output=True,
        )
        token = secrets.token_hex(24)
        (pki / "token").write_text(token)
        (pki / "tokens.csv").write_text(f"{token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},system:masters\n")
        for f in ("sa.key", "token", "tokens.csv"):
            (pki / f).chmod(0o600)
        if st.node == "real":
            from nightjar.devstack import realnode

            realnode.make_pki(pki, st.real_node["node_ip"])

    def _etcd(self, st: State) -> None:
        # Recorded ports are kept: a restart in place listens where it did.
        client_port = st.ports.get("etcd") or free_port(st.ports.values())
        peer_port = st.ports.get("etcd_peer") or free_port([*st.ports.values(), client_port])
        st.ports.update(etcd=client_port, etcd_peer=peer_port)
        url, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        proc = self._spawn(
            st,
            "etcd",
            [
                str(binary("etcd", "etcd")),
                "--name=default",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        _wait_for("etcd", lambda: _http_ok(f"{url}/health"), 30, proc, self.dir / "logs" / "etcd.log")
        self.out(f"  etcd                     {url}")

    def _apiserver(self, st: State) -> None:
        port = st.ports.get("apiserver") or free_port(st.ports.values())
        st.ports["apiserver"] = port
        pki = self.dir / "pki"
        proc = self._spawn(
            st,
            "kube-apiserver",
            [
                str(binary("kubernetes", "kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{st.ports['etcd']}",
                # Its self-signed serving cert covers the bind and advertise addresses and the
                # kubernetes Service's ClusterIP (the names Pods use).
                f"--bind-address={st.host}",
                f"--advertise-address={st.host}",
                f"--secure-port={port}",
                f"--cert-dir={pki / 'apiserver'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                *self._apiserver_node_args(st),
            ],
        )
        base = self._wait_apiserver(st, proc)
        pki = self.dir / "pki"
        self._write_kubeconfig(base, pki / "apiserver" / "apiserver.crt", (pki / "token").read_text())
        self.out(f"  kube-apiserver           {base}")

    def _wait_apiserver(self, st: State, proc: subprocess.Popen[bytes] | None) -> str:
        """Wait until the API server answers /readyz; returns its URL."""
        pki = self.dir / "pki"
        token = (pki / "token").read_text()
        ca = pki / "apiserver" / "apiserver.crt"
        base = f"https://{st.host}:{st.ports['apiserver']}"

        def ready() -> bool:
            if not ca.is_file():
                return False
            ctx = ssl.create_default_context(cafile=str(ca))
            return _http_ok(f"{base}/readyz", ctx, token)

        _wait_for("kube-apiserver", ready, 90, proc, self.dir / "logs" / "kube-apiserver.log")
        return base

    def _apiserver_node_args(self, st: State) -> list[str]:
        if st.node != "real":
            # The process node gives Pods their tokens itself: no ServiceAccount admission. Its
            # Pods share the host's network and are told the API server's address directly.
            return [
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
            ]
        from nightjar.devstack import realnode

        return realnode.apiserver_args(self.dir / "pki")

    def _write_kubeconfig(self, server: str, ca: Path, token: str) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "nightjar-local",
                    "cluster": {
                        "server": server,
                        "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": ADMIN_TOKEN_USER, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "nightjar-local",
                    "context": {
                        "cluster": "nightjar-local",
                        "user": ADMIN_TOKEN_USER,
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "nightjar-local",
        }
        path = self.dir / "kubeconfig"
        path.write_text(json.dumps(cfg, indent=2))
        path.chmod(0o600)

    def _controller_manager(self, st: State) -> None:
        port = st.ports.get("controller_manager") or free_port(st.ports.values())
        st.ports["controller_manager"] = port
        proc = self._spawn(
            st,
            "kube-controller-manager",
            [
                str(binary("kubernetes", "kube-controller-manager")),
                f"--kubeconfig={self.dir / 'kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                # The real node: a Ready kubelet's node.kubernetes.io/not-ready taint removed, as on
                # every cluster.
                f"--controllers={CONTROLLERS}{',node-lifecycle-controller' if st.node == 'real' else ''}",
                f"--service-account-private-key-file={self.dir / 'pki' / 'sa.key'}",
                "--cluster-name=nightjar-local",
                f"--root-ca-file={self.dir / 'pki' / 'apiserver' / 'apiserver.crt'}",
            ],
        )
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # its self-signed health endpoint on loopback
        _wait_for(
            "kube-controller-manager",
            lambda: _http_ok(f"https://127.0.0.1:{port}/healthz", ctx),
            60,
            proc,
            self.dir / "logs" / "kube-controller-manager.log",
        )
        self.out("  kube-controller-manager  " + CONTROLLERS.replace(",", " "))

    def _postgres(self, st: State) -> None:
        """PostgreSQL on its recorded port and data dir when the stack has them (a restart in
        place), else on a new port and data dir made by initdb."""
        bindir = postgres_bindir()
        user = "postgres" if os.geteuid() == 0 else None
        initialised = bool(st.pg_datadir) and (Path(st.pg_datadir) / "data" / "PG_VERSION").is_file()
        datadir = Path(st.pg_datadir) if initialised else self._initdb(st, bindir, user)
        listen = [LOOPBACK] + ([st.real_node["node_ip"]] if st.node == "real" else [])
        port = st.ports.get("postgres") or free_port(st.ports.values())
        st.ports["postgres"] = port
        proc = self._spawn(
            st,
            "postgres",
            [
                str(bindir / "postgres"),
                "-D",
                str(datadir / "data"),
                "-p",
                str(port),
                "-k",
                str(datadir),
                "-c",
                f"listen_addresses={','.join(listen)}",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            user=user,
            cwd=datadir,
        )

        def ready() -> bool:
            return (
                subprocess.run(
                    [str(bindir / "pg_isready"), "-h", st.host, "-p", str(port)],
                    capture_output=True,
                    check=False,
                ).returncode
                == 0
            )

        _wait_for("postgres", ready, 60, proc, self.dir / "logs" / "postgres.log")
        where = " ".join(f"{a}:{port}" for a in listen)
        self.out(f"  postgres                 {where} ({bindir.parent.name}, data in {datadir})")

    def _initdb(self, st: State, bindir: Path, user: str | None) -> Path:
        """A new data dir (in a temp dir: owned by ``user``) with a new password; returns the dir."""
        if user:
            # PostgreSQL refuses to run as root: run it as the Debian package's `postgres` user.
            try:
                pw = pwd.getpwnam(user)
            except KeyError as e:
                raise StackError(
                    "running as root needs the `postgres` user (apt-get install postgresql)"
                ) from e
            datadir = Path(tempfile.mkdtemp(prefix="nightjar-pg-"))
            os.chown(datadir, pw.pw_uid, pw.pw_gid)
        else:
            datadir = Path(tempfile.mkdtemp(prefix="nightjar-pg-"))
        st.pg_datadir = str(datadir)
        st.pg_password = secrets.token_hex(16)
        st.save()
        pwfile = datadir / "pwfile"
        pwfile.write_text(st.pg_password + "\n")
        if user:
            shutil.chown(pwfile, user)
        pgdata = datadir / "data"
        res = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=peer",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            capture_output=True,
            user=user,
            check=False,
        )
        pwfile.unlink()
        if res.returncode != 0:
            raise StackError(f"initdb failed: {res.stderr.decode(errors='replace')}")
        if st.node == "real":
            # Pods connect from the pod range to the node IP; the host's own clients from the
            # node IP. initdb allowed loopback only.
            net = st.real_node
            with open(pgdata / "pg_hba.conf", "a", encoding="utf-8") as hba:
                for cidr in (f"{net['node_ip']}/32", net["pod_cidr"]):
                    hba.write(f"host all all {cidr} scram-sha-256\n")
        return datadir

    def _minio(self, st: State) -> None:
        """Every S3 server: all are started first, then each is waited for, so they start together."""
        started = []
        for srv in S3_SERVERS.values():
            st.ports[srv.port_key] = free_port(st.ports.values())
            st.s3_keys[srv.which] = {
                "access_key": "nightjar" + secrets.token_hex(4),
                "secret_key": secrets.token_hex(20),
            }
            started.append((srv, self._spawn_minio(st, srv)))
        for srv, proc in started:
            self._wait_minio(st, srv, proc)
            self.s3_store(srv.which, srv.bucket_locked, st).create_bucket(object_lock=True)
            self.s3_store(srv.which, srv.bucket_plain, st).create_bucket(versioned=False)
            self.out(
                f"  {srv.proc + ' (S3)':<24} {self._s3_url(st, srv)} buckets {srv.bucket_locked} "
                f"(Object Lock), {srv.bucket_plain}"
            )

    def _s3_url(self, st: State, srv: S3Server) -> str:
        return f"http://{st.host}:{st.ports[srv.port_key]}"

    def _spawn_minio(self, st: State, srv: S3Server) -> subprocess.Popen[bytes]:
        """Start ``srv`` on its recorded port, data dir and keys (the same each time it starts)."""
        keys = st.s3_keys[srv.which]
        return self._spawn(
            st,
            srv.proc,
            [
                str(binary("minio", "minio")),
                "server",
                "--quiet",
                "--address",
                f"{st.host}:{st.ports[srv.port_key]}",
                str(self.dir / srv.data),
            ],
            env={
                "MINIO_ROOT_USER": keys["access_key"],
                "MINIO_ROOT_PASSWORD": keys["secret_key"],
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
                "MINIO_CI_CD": "1",
            },
        )

    def _wait_minio(self, st: State, srv: S3Server, proc: subprocess.Popen[bytes]) -> None:
        """Until ``srv`` answers a signed request. Its health endpoint says ready before MinIO's
        IAM has loaded; until then a signed call (CreateBucket) fails with
        XMinioServerNotInitialized, after boto's own retries when the machine is busy."""
        url = self._s3_url(st, srv)
        client = self.s3_store(srv.which, srv.bucket_locked, st).s3

        def answers() -> bool:
            if not _http_ok(f"{url}/minio/health/ready"):
                return False
            client.list_buckets()
            return True

        _wait_for(srv.proc, answers, 60, proc, self.dir / "logs" / f"{srv.proc}.log")

    def s3_store(self, which: str, bucket: str, st: State | None = None) -> S3Store:
        """Bucket ``bucket`` of S3 server ``which``, with the server's root keys."""
        from nightjar.storage.objects import S3Target

        srv = s3_server(which)
        st = st or self._recorded()
        keys = st.s3_keys[srv.which]
        return S3Target(
            endpoint=self._s3_url(st, srv),
            bucket=bucket,
            region=S3_REGION,
            access_key=keys["access_key"],
            secret_key=keys["secret_key"],
        ).store()

    def _write_env(self, st: State) -> None:
        p = st.ports
        dsn = f"postgresql://postgres:{st.pg_password}@{st.host}:{p['postgres']}/postgres"
        lines = {
            "KUBECONFIG": str(self.dir / "kubeconfig"),
            "NIGHTJAR_STATE_DIR": str(self.dir),
            "NIGHTJAR_PG_HOST": st.host,
            "NIGHTJAR_PG_PORT": str(p["postgres"]),
            "NIGHTJAR_PG_USER": "postgres",
            "NIGHTJAR_PG_PASSWORD": st.pg_password,
            "NIGHTJAR_PG_DSN": dsn,
            "NIGHTJAR_PG_BINDIR": str(postgres_bindir()),
            "NIGHTJAR_KUBECTL": str(binary("kubernetes", "kubectl")),
            "NIGHTJAR_NODE": st.node,
        }
        if st.node == "real":
            lines["NIGHTJAR_NODE_IP"] = st.real_node["node_ip"]
            lines["NIGHTJAR_CONTAINERD_ADDRESS"] = st.real_node["socket"]
        for srv in S3_SERVERS.values():
            keys = st.s3_keys[srv.which]
            lines.update(srv.env(st.host, p[srv.port_key], keys["access_key"], keys["secret_key"]))
        if p.get("operator_metrics"):
            lines["NIGHTJAR_METRICS_URL"] = f"http://127.0.0.1:{p['operator_metrics']}/metrics"
        text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in lines.items())
        envf = self.dir / "env"
        envf.write_text(text)
        envf.chmod(0o600)

    def _process_node(self, st: State) -> None:
        proc = self._spawn(
            st,
            "process-node",
            [
                sys.executable,
                "-m",
                "nightjar.devstack",
                "node",
                "--state",
                str(self.dir),
            ],
        )
        from kubernetes import client, config

        api = client.CoreV1Api(config.new_client_from_config(str(self.dir / "kubeconfig")))

        def ready() -> bool:
            node = api.read_node(NODE_NAME)
            return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

        _wait_for("process node", ready, 30, proc, self.dir / "logs" / "process-node.log")
        self.out(f"  process node             {NODE_NAME} (test/dev stand-in for a kubelet)")

    def _real_node(self, st: State) -> None:
        from nightjar.devstack import realnode

        net = realnode.NodeNet.from_dict(st.real_node)

        def spawn(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
            return self._spawn(st, name, argv)

        realnode.RealNode(self.dir, net, self.out).start(spawn, self.dir / "kubeconfig", self._recorder(st))
        self._pod_binder(st)

    def _pod_binder(self, st: State) -> None:
        self._spawn(
            st,
            "pod-binder",
            [sys.executable, "-m", "nightjar.devstack", "bind", "--state", str(self.dir)],
        )
        self.out("  pod-binder               binds pending Pods to the node (the stack has no scheduler)")

    def _provisioner(self, st: State) -> None:
        """The default StorageClass and its provisioner of hostPath volumes under <state>/volumes."""
        from kubernetes import client, config

        from nightjar.devstack import provisioner

        proc = self._spawn(
            st,
            "provisioner",
            [sys.executable, "-m", "nightjar.devstack", "provision", "--state", str(self.dir)],
        )
        storage = client.StorageV1Api(config.new_client_from_config(str(self.dir / "kubeconfig")))
        _wait_for(
            "provisioner",
            lambda: bool(storage.read_storage_class(provisioner.CLASS_NAME)),
            30,
            proc,
            self.dir / "logs" / "provisioner.log",
        )
        self.out(
            f"  provisioner              default StorageClass {provisioner.CLASS_NAME}: "
            f"hostPath volumes in {self.dir / 'volumes'}"
        )

    @staticmethod
    def _recorder(st: State) -> Callable[[str], None]:
        """``record(what)``: the real node made host object ``what`` (``down`` removes it)."""

        def record(what: str) -> None:
            st.made.append(what)
            st.save()

        return record

    def _install_crds(self) -> None:
        from nightjar.devstack.crds import install_crds

        names = install_crds(self.dir / "kubeconfig", REPO_ROOT / "crds")
        self.out(f"  CRDs                     {', '.join(names) or '(none)'}")

    def _operator(self, st: State) -> None:
        exe = Path(sys.executable).with_name("nightjar")
        log = self.dir / "logs" / "operator.log"
        port = st.ports.get("operator_metrics") or free_port(st.ports.values())
        if st.ports.get("operator_metrics") != port:
            st.ports["operator_metrics"] = port
            st.save()
            self._write_env(st)
        start = log.stat().st_size if log.exists() else 0
        proc = self._spawn(
            st,
            "operator",
            # Through the interpreter, so the recorded binary is what /proc/<pid>/exe shows.
            [
                sys.executable,
                str(exe),
                "operator",
                "--all-namespaces",
                "--metrics-address=127.0.0.1",
                f"--metrics-port={port}",
            ],
            env={
                "KUBECONFIG": str(self.dir / "kubeconfig"),
                **self._agent_env(st),
                # Short sweeps so a developer (and the tests) see schedules and GC act quickly.
                "NIGHTJAR_SCHEDULER_INTERVAL_SECONDS": os.environ.get(
                    "NIGHTJAR_SCHEDULER_INTERVAL_SECONDS", "3"
                ),
                "NIGHTJAR_GC_INTERVAL_SECONDS": os.environ.get("NIGHTJAR_GC_INTERVAL_SECONDS", "5"),
                # Storage sync: each BackupStorage's bucket listed every 10 s, an attempt's
                # leftovers without a manifest deleted after 30 s (production: 15 min, 24 h).
                "NIGHTJAR_SYNC_INTERVAL_SECONDS": os.environ.get("NIGHTJAR_SYNC_INTERVAL_SECONDS", "10"),
                "NIGHTJAR_ORPHAN_GRACE_SECONDS": os.environ.get("NIGHTJAR_ORPHAN_GRACE_SECONDS", "30"),
                # Test-only hooks (nightjar.dev/test-verify-delay-seconds): never in a release.
                "NIGHTJAR_TEST_HOOKS": "1",
            },
        )

        def ready() -> bool:
            with open(log, "rb") as f:
                f.seek(start)
                return b"nightjar operator ready" in f.read()

        _wait_for("operator", ready, 60, proc, log)
        self.out(f"  operator                 log at {log}")

    def _agent_env(self, st: State) -> dict[str, str]:
        """How the operator's Jobs run here. On the real node: as containers of the image ``make
        image`` built and the node imported (never pulled: there is no registry). On the process
        node: as processes of this host, told where its pg_dump is."""
        if st.node == "real":
            from nightjar.devstack import realnode

            if not realnode.PROJECT_IMAGE_TAR.is_file():
                self.out(
                    f"  WARNING: no {realnode.PROJECT_IMAGE_TAR}: the operator's Jobs cannot start "
                    "(ErrImageNeverPull) until `make image` builds it and `up` imports it"
                )
            return {
                "NIGHTJAR_AGENT_IMAGE": realnode.PROJECT_IMAGE,
                "NIGHTJAR_AGENT_IMAGE_PULL_POLICY": "Never",
                # Restore drills without a scratch Secret: the scratch servers `make image` built.
                "NIGHTJAR_SCRATCH_IMAGE": realnode.SCRATCH_IMAGE,
                "NIGHTJAR_SCRATCH_MAJORS": " ".join(realnode.scratch_majors()),
                "NIGHTJAR_SCRATCH_IMAGE_PULL_POLICY": "Never",
            }
        return {"NIGHTJAR_AGENT_ENV_NIGHTJAR_PG_BINDIR": str(postgres_bindir())}

    def restart_operator(self) -> None:
        """Stop the operator (if it runs) and start a new one: what a crash and a restart look like.
        Only on a stack that runs one (not ``up --no-operator``) and whose other processes run."""
        st = self._recorded()
        if not any(p.name == "operator" for p in st.procs):
            raise StackError(
                f"the stack in {self.dir} runs no operator (it was started with --no-operator): "
                "`up` without --no-operator starts one"
            )
        down = [p.name for p in st.procs if p.name != "operator" and not _alive(p)]
        if down:
            raise StackError(
                f"{', '.join(down)} of the stack in {self.dir} no longer run: `up` restarts them "
                "(and the operator, if it died)"
            )
        for p in [p for p in st.procs if p.name == "operator"]:
            if _alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, 0)
            st.procs.remove(p)
        st.save()
        self._operator(st)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL, grace: float = 15) -> int:
        """Send ``sig`` to the process group of the stack's recorded process ``name`` (a crash, or a
        stop) and return once it is gone (SIGKILL after ``grace`` seconds); ``up`` starts it again
        on its recorded ports and data. Returns its pid, 0 when it did not run. For the fault-
        injection run (``chaos``); the S3 servers have ``stop_s3``, which ``status`` accepts."""
        st = self._recorded()
        for p in st.procs:
            if p.name == name and _alive(p):
                _terminate(p, sig, grace)
                return p.pid
        return 0

    # --- one S3 server down and up again -------------------------------------------------

    def stop_s3(self, which: str) -> None:
        """Kill S3 server ``which`` ("primary" or "replica"), as an outage would: its port refuses
        connections until ``start_s3``. The state records it as stopped on purpose, so ``status``
        does not call the stack broken and ``up`` starts it again."""
        srv = s3_server(which)
        st = self._recorded()
        procs = [p for p in st.procs if p.name == srv.proc]
        if not procs and srv.proc in st.stopped:
            self.out(f"S3 server {which} ({srv.proc}) is already stopped.")
            return
        if srv.which not in st.s3_keys:
            raise StackError(f"the stack in {self.dir} has no S3 server {which}: run `down`, then `up`")
        for p in procs:
            _terminate(p, signal.SIGKILL)
        # The pid reads as gone once its main thread has exited; the other threads may hold the
        # listening socket a moment longer.
        port = st.ports[srv.port_key]
        deadline = time.monotonic() + 15
        while not _refuses(st.host, port):
            if time.monotonic() > deadline:
                raise StackError(f"port {port} of {srv.proc} still accepts connections 15s after SIGKILL")
            time.sleep(0.05)
        st.procs = [p for p in st.procs if p.name != srv.proc]
        if srv.proc not in st.stopped:
            st.stopped.append(srv.proc)
        (self.dir / "pids" / f"{srv.proc}.pid").unlink(missing_ok=True)
        st.save()
        self.out(f"Stopped S3 server {which} ({srv.proc}, {self._s3_url(st, srv)}).")

    def start_s3(self, which: str) -> None:
        """Start S3 server ``which`` again on the same port, data dir and keys (objects and clients
        survive) and wait until it serves its buckets. Does nothing if it runs."""
        srv = s3_server(which)
        st = self._recorded()
        if any(p.name == srv.proc and _alive(p) for p in st.procs):
            self.out(f"S3 server {which} ({srv.proc}) is already running.")
            return
        if srv.which not in st.s3_keys or srv.port_key not in st.ports:
            raise StackError(f"the stack in {self.dir} has no S3 server {which}: run `down`, then `up`")
        self._start_s3(st, srv)
        self.out(f"Started S3 server {which} ({srv.proc}, {self._s3_url(st, srv)}) again.")

    def _start_s3(self, st: State, srv: S3Server) -> None:
        """Start ``srv`` on its recorded port, data dir and keys; wait until it serves its buckets."""
        # A record of it that died on its own is replaced; from here it is no longer stopped on
        # purpose: if it fails to start, `status` shows it as not running.
        st.procs = [p for p in st.procs if p.name != srv.proc]
        with contextlib.suppress(ValueError):
            st.stopped.remove(srv.proc)
        proc = self._spawn_minio(st, srv)
        try:
            self._wait_minio(st, srv, proc)
            buckets = [self.s3_store(srv.which, b, st) for b in (srv.bucket_locked, srv.bucket_plain)]

            def serving() -> bool:
                for bucket in buckets:
                    bucket.check()
                return True

            _wait_for(f"{srv.proc} buckets", serving, 30, proc, self.dir / "logs" / f"{srv.proc}.log")
        except BaseException:
            _terminate(next(p for p in st.procs if p.pid == proc.pid), signal.SIGKILL)
            raise

    def _recorded(self) -> State:
        st = State.load(self.dir)
        if st is None:
            raise StackError(f"no stack in {self.dir}: start one with `python -m nightjar.devstack up`")
        return st

    # --- down ---------------------------------------------------------------------------

    def down(self, quiet: bool = False) -> int:
        """Stop every recorded process (reverse start order); returns how many were running."""
        st = State.load(self.dir)
        if st is None:
            if not quiet:
                self.out(f"No stack recorded in {self.dir}; nothing to stop.")
            return 0
        stopped = 0
        if st.node == "real":
            stopped += self._stop_real_node(st)
        for p in reversed(st.procs):
            if not _alive(p):
                continue
            stopped += 1
            # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for clients to leave.
            _terminate(p, signal.SIGINT if p.name == "postgres" else signal.SIGTERM)
        self._kill_node_leftovers()
        if st.node == "real" and st.real_node:
            from nightjar.devstack import realnode

            net = realnode.NodeNet.from_dict(st.real_node)
            realnode.cleanup(self.dir, net, st.made)
            left = realnode.leftovers(self.dir, net)
            if left:
                self.out("The real node left these behind (remove them by hand):\n  " + "\n  ".join(left))
        if st.pg_datadir and Path(st.pg_datadir).name.startswith("nightjar-pg-"):
            shutil.rmtree(st.pg_datadir, ignore_errors=True)
        for sub in ("pids", "volumes"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        (self.dir / "state.json").unlink(missing_ok=True)
        (self.dir / "env").unlink(missing_ok=True)
        if not quiet:
            self.out(f"Stopped {stopped} processes of the stack in {self.dir}.")
        return stopped

    def _stop_real_node(self, st: State) -> int:
        """Before the rest of the stack: the kubelet stops every Pod while the API server still runs
        (so CNI tears each sandbox's network down), then the kubelet, what is left of the containers,
        and containerd stop. Returns how many of the node's processes were running."""
        from nightjar.devstack import realnode

        procs = {p.name: p for p in st.procs}
        stopped = 0
        binder = procs.get("pod-binder")
        if binder and _alive(binder):
            _terminate(binder, signal.SIGTERM)
            stopped += 1
        kubelet, api = procs.get("kubelet"), procs.get("kube-apiserver")
        if kubelet and api and _alive(kubelet) and _alive(api) and st.real_node:
            with contextlib.suppress(Exception):
                realnode.drain(self.dir / "kubeconfig")
        if kubelet and _alive(kubelet):
            _terminate(kubelet, signal.SIGTERM)
            stopped += 1
        if st.real_node:
            realnode.kill_containers(realnode.NodeNet.from_dict(st.real_node))
        containerd = procs.get("containerd")
        if containerd and _alive(containerd):
            _terminate(containerd, signal.SIGTERM)
            stopped += 1
        return stopped

    def _kill_node_leftovers(self) -> None:
        """Container processes whose node died without cleaning up (it records each pid)."""
        pids_dir = self.dir / "node" / "pids"
        if not pids_dir.is_dir():
            return
        for f in pids_dir.iterdir():
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                os.killpg(int(f.name), signal.SIGKILL)
            f.unlink(missing_ok=True)

    def usage(self) -> str:
        rel = os.path.relpath(self.dir, Path.cwd())
        return (
            "\nNightjar's local stack is up. Use it with:\n"
            f"  export KUBECONFIG=$PWD/{rel}/kubeconfig\n"
            "  kubectl get nodes,crds\n"
            "  kubectl get backups -A\n"
            f"  source {rel}/env   # S3 endpoints and keys (primary, replica), PostgreSQL DSN\n"
            f"  python -m nightjar.devstack s3 stop|start primary|replica --state {rel}\n"
            f"Logs: {rel}/logs/ (operator: {rel}/logs/operator.log). Stop it with: make down\n"
        )


def parse_env(path: Path) -> dict[str, str]:
    """Read back the ``export K=V`` lines of ``<state>/env``."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("export "):
            k, v = line[len("export ") :].split("=", 1)
            out[k] = shlex.split(v)[0] if v else ""
    return out


def describe(state: State | None, alive: list[Proc], dead: list[Proc]) -> str:
    if state is None:
        return "down"
    rows = []
    if state.node == "real" and state.real_node:
        n = state.real_node
        rows.append(
            f"  {'node (real)':<24} IP {n['node_ip']} on {n['host_if']}, pods {n['pod_cidr']} "
            f"on {n['bridge']}, cgroups {n['cgroup_root']}"
        )
    rows += [
        f"  {p.name:<24} pid {p.pid:<8} {'running' if p in alive else 'NOT RUNNING'}" for p in state.procs
    ]
    for srv in S3_SERVERS.values():
        if srv.proc in state.stopped:
            rows.append(f"  {srv.proc:<24} {'-':<12} stopped (`s3 start {srv.which}` or `up` starts it)")
    return "\n".join(rows)
