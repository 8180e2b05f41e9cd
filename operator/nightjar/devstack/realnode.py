"""The real node: Debian's containerd and runc, the CNI bridge, and a kubelet registered to the
stack's kube-apiserver — what kind runs inside its node container, run on this host instead.

TEST/DEV ONLY. ``python -m nightjar.devstack up --node real`` (``make up NODE=real``) starts it in
place of the process node; ``../shared/docs/real-node.md`` explains each non-obvious setting.

Everything it makes on the host is named after the stack's state directory, so that stacks in two
directories (tests, the bench and CI clones run side by side on one machine) never meet:

- a veth pair holding the node address ``10.99.N.1/32``, and the CNI bridge for pods in
  ``10.244.N.0/24``: interface names carry a hash of the state directory; ``N`` starts from that
  hash and moves on past any /24 the host already uses. An interface of that name that the stack
  did not record is never reused: ``up`` stops and says how to remove it.
- the kubelet's cgroups, under a cgroup root of their own (``/nightjar-<hash>``) in every
  hierarchy, instead of the host-wide ``/kubepods``.
- containerd's config, root, state, socket and netns mounts, the kubelet's root and pod logs, the
  CNI config and IPAM data: all under ``<state>/node``.

``down`` asks the kubelet to stop every Pod (so each sandbox's network is torn down by CNI), stops
the kubelet and containerd by recorded pid, kills what is left in the node's cgroups and any
containerd shim of this stack, unmounts everything under the state directory, deletes the
interfaces and cgroups, and removes iptables rules for the pod range and the kubelet's log links.
:func:`leftovers` lists whatever is still there; a test asserts it is empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nightjar.devstack.stack import (
    KUBERNETES_SERVICE_IP,
    REPO_ROOT,
    StackError,
    _http_ok,
    _wait_for,
    binary,
    cache_dir,
)

NODE_NAME = "nightjar-node"
# The kubelet's ports on the node IP (fixed: one real node per stack, each on its own node IP).
KUBELET_PORT = 10250
KUBELET_HEALTHZ_PORT = 10248
PAUSE_IMAGE = "docker.io/local/pause:3.10"
# What `make image` (hack/build-image.sh) builds; each `up` imports it. The operator's Jobs run it.
PROJECT_IMAGE = "nightjar:dev"
PROJECT_IMAGE_TAR = REPO_ROOT / ".local" / "image" / "image.tar"
#: The image's id as containerd reports it (the digest of its config): a Pod's imageID.
PROJECT_IMAGE_ID = PROJECT_IMAGE_TAR.parent / "image.id"
#: The scratch PostgreSQL servers of restore drills `make image` builds, one per major
#: (images/scratch-postgres), each saved as nightjar-postgres-<major>.tar beside the project image.
SCRATCH_IMAGE = "nightjar-postgres:{major}"


def scratch_image_tars() -> list[Path]:
    return sorted(PROJECT_IMAGE_TAR.parent.glob("nightjar-postgres-*.tar"))


def scratch_majors() -> list[str]:
    """The majors of the scratch server images `make image` built."""
    return [t.stem.removeprefix("nightjar-postgres-") for t in scratch_image_tars()]


CNI_BIN_DIR = Path("/usr/lib/cni")
# A command (or a file) each package provides, and the Debian package.
PACKAGES = (
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("ctr", "containerd"),
    (str(CNI_BIN_DIR / "bridge"), "containernetworking-plugins"),
    ("iptables", "iptables"),
)
NODE_NET = "10.99.{n}.0/24"
POD_NET = "10.244.{n}.0/24"
# A unix socket path has at most 107 bytes; containerd adds ".ttrpc" to its own.
MAX_SOCKET_PATH = 100
CGROUP_FS = Path("/sys/fs/cgroup")
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # fixed in the kubelet
# Host-wide iptables chains every kubelet makes (in iptables and ip6tables), and those of the CNI
# firewall plugin: shared by all real nodes on the host, so removed by the last one to go down.
KUBELET_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY", "KUBE-FIREWALL")
CNI_FIREWALL_CHAINS = ("CNI-FORWARD", "CNI-ADMIN")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
SHIM_SOCKETS = Path("/run/containerd/s")
# The device manager's socket: a path fixed in the kubelet (not under --root-dir), shared by every
# kubelet on the host; each removes the others' on start (harmless: the stack has no device plugins).
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")

Spawn = Callable[[str, list[str]], "subprocess.Popen[bytes]"]


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise StackError(f"`{shlex.join(argv)}` failed (exit {res.returncode}): {res.stderr.strip()}")
    return res


# --- packages -------------------------------------------------------------------------------------


def _have(what: str) -> bool:
    return Path(what).exists() if what.startswith("/") else shutil.which(what) is not None


def ensure_packages(out: Callable[[str], None]) -> None:
    """Install Debian's containerd, runc, CNI plugins and iptables when missing (apt-get)."""
    missing = sorted({pkg for what, pkg in PACKAGES if not _have(what)})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise StackError(f"the real node needs {', '.join(missing)}: install them with your package manager")
    if os.geteuid() != 0:
        raise StackError(f"the real node needs root (and {', '.join(missing)}: apt-get install them)")
    out(f"  installing {' '.join(missing)} (apt-get)...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        res = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise StackError(f"`{shlex.join(argv)}` failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    still = [what for what, _ in PACKAGES if not _have(what)]
    if still:
        raise StackError(f"installed {' '.join(missing)} but {', '.join(still)} is still missing")


# --- names and addresses ---------------------------------------------------------------------------


def stack_key(state_dir: Path) -> str:
    """8 hex digits naming this stack's host objects (interfaces, cgroups)."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class NodeNet:
    """What the real node of one stack is called on the host; recorded in the stack's state."""

    key: str
    node_ip: str  # on host_if, /32
    pod_cidr: str  # the CNI bridge's range
    host_if: str  # veth end holding node_ip
    peer_if: str
    bridge: str  # made by the CNI bridge plugin at the first Pod
    cgroup_root: str  # the kubelet's cgroupRoot, e.g. /nightjar-0123abcd
    socket: str  # containerd's socket

    @property
    def pod_prefix(self) -> str:
        """The pod range's first three octets with a dot: what iptables rules for pods mention."""
        return self.pod_cidr.rsplit(".", 1)[0] + "."

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NodeNet:
        return cls(**{k: str(v) for k, v in raw.items() if k in cls.__dataclass_fields__})


def _links() -> set[str]:
    return {str(i["ifname"]) for i in json.loads(_run(["ip", "-j", "link", "show"]).stdout or "[]")}


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address in or a route to."""
    nets: list[ipaddress.IPv4Network] = []
    for iface in json.loads(_run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]"):
        for a in iface.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for r in json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"):
        dst = r.get("dst", "default")
        if dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def choose_net(state_dir: Path) -> NodeNet:
    """Names from the state directory's hash; the first free ``N`` from the hash on. Refuses an
    interface of this stack's names that exists already (the stack did not make it, or a stack
    there was never brought down: its state is gone, so nothing says it is ours to reuse)."""
    key = stack_key(state_dir)
    host_if, peer_if, bridge = f"nj{key}n", f"nj{key}p", f"nj{key}b"
    taken = _links() & {host_if, peer_if, bridge}
    if taken:
        cmds = "; ".join(f"ip link delete {name}" for name in sorted(taken))
        raise StackError(
            f"interface {', '.join(sorted(taken))} already exists and this stack did not record it "
            f"(a stack in {state_dir} that was not brought down?). Check nothing uses it, then: {cmds}"
        )
    used = _used_networks()
    start = int(key, 16) % 250
    for i in range(250):
        n = (start + i) % 250 + 1
        mine = [ipaddress.IPv4Network(NODE_NET.format(n=n)), ipaddress.IPv4Network(POD_NET.format(n=n))]
        if any(m.overlaps(u) for m in mine for u in used):
            continue
        sock = state_dir / "node" / "containerd.sock"
        if len(str(sock)) > MAX_SOCKET_PATH:
            sock = Path(f"/run/nightjar-node-{key}/containerd.sock")
        return NodeNet(
            key=key,
            node_ip=f"10.99.{n}.1",
            pod_cidr=POD_NET.format(n=n),
            host_if=host_if,
            peer_if=peer_if,
            bridge=bridge,
            cgroup_root=f"/nightjar-{key}",
            socket=str(sock),
        )
    raise StackError("no free 10.99.N.0/24 and 10.244.N.0/24 pair on this host for the node address")


# --- PKI -----------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    _run(["openssl", *args])


def _leaf(pki: Path, name: str, subject: str, ext: str) -> None:
    """An EC key and a certificate for ``subject`` signed by the stack's CA."""
    (pki / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(pki / f"{name}.key"), "-out", str(pki / f"{name}.csr"), "-subj", subject,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
        "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "365",
        "-out", str(pki / f"{name}.crt"), "-extfile", str(pki / f"{name}.ext"),
    )  # fmt: skip
    (pki / f"{name}.key").chmod(0o600)
    (pki / f"{name}.csr").unlink()
    (pki / f"{name}.ext").unlink()


def make_pki(pki: Path, node_ip: str) -> None:
    """The CA the API server trusts for client certificates, and signed by it: the node's client
    identity (``system:node:<name>`` in ``system:nodes``, for the Node authorizer), the API server's
    client certificate towards the kubelet (``system:masters``: the kubelet's webhook authorizer
    asks the API server, whose RBAC lets masters do anything), and the kubelet's serving cert for
    the node address (the API server checks it against the same CA)."""
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"), "-days", "365",
        "-subj", "/CN=nightjar-local-ca",
    )  # fmt: skip
    (pki / "ca.key").chmod(0o600)
    client = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
    _leaf(pki, "node", f"/O=system:nodes/CN=system:node:{NODE_NAME}", client)
    _leaf(pki, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", client)
    _leaf(
        pki,
        "kubelet",
        f"/CN={NODE_NAME}",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        f"subjectAltName=IP:{node_ip},DNS:{NODE_NAME}\n",
    )


def apiserver_args(pki: Path) -> list[str]:
    """What the API server needs for a real node: client certificates, the Node authorizer and
    NodeRestriction, the ServiceAccount admission plugin (the kubelet mounts the tokens it
    projects), and how to reach the kubelet (``kubectl logs``/``exec``)."""
    return [
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
        "--kubelet-preferred-address-types=InternalIP",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        # The kubernetes Service's Endpoints at the advertise address (the node IP), as on a cluster.
        "--endpoint-reconciler-type=lease",
    ]


# --- start ---------------------------------------------------------------------------------------


def make_interfaces(net: NodeNet, record: Callable[[str], None]) -> None:
    """The veth pair holding the node IP (before anything else starts: the stack's servers listen
    on it), and forwarding on, for the pods behind the bridge."""
    _run(["ip", "link", "add", net.host_if, "type", "veth", "peer", "name", net.peer_if])
    record("veth")
    _run(["ip", "addr", "add", f"{net.node_ip}/32", "dev", net.host_if])
    _run(["ip", "link", "set", net.host_if, "up"])
    _run(["ip", "link", "set", net.peer_if, "up"])
    # Pods reach the node address through the bridge: the host must forward.
    if IP_FORWARD.read_text().strip() != "1":
        record("ip_forward")
        IP_FORWARD.write_text("1\n")


class RealNode:
    """Starts the node of the stack in ``state_dir`` (``net`` says what it is called on the host)."""

    def __init__(self, state_dir: Path, net: NodeNet, out: Callable[[str], None] = print) -> None:
        self.dir = state_dir
        self.net = net
        self.out = out
        self.node_dir = state_dir / "node"
        self.logs = state_dir / "logs"

    def start(self, spawn: Spawn, kubeconfig: Path, record: Callable[[str], None]) -> None:
        """Cgroup root, containerd (with the pause image), CNI, the route to the API server,
        kubelet; returns once the Node is Ready. The interfaces are made first, by
        :func:`make_interfaces` (the stack's servers listen on the node IP). ``record(what)`` is
        told of each host object as it is made, so ``down`` removes exactly those even when a
        later step fails."""
        self.node_dir.mkdir(parents=True, exist_ok=True)
        self._cgroup_root(record)
        t = time.monotonic()
        self._containerd(spawn)
        self.out(f"  containerd               {self.net.socket} ({time.monotonic() - t:.1f}s)")
        t = time.monotonic()
        for tar in self._images():
            self.import_image(tar)
        self.out(f"  images                   imported in {time.monotonic() - t:.1f}s")
        self._cni()
        self._route_kubernetes_service(kubeconfig)
        t = time.monotonic()
        self._kubelet(spawn, kubeconfig)
        self.out(
            f"  kubelet                  {NODE_NAME} Ready in {time.monotonic() - t:.1f}s "
            f"(node IP {self.net.node_ip}, pods {self.net.pod_cidr})"
        )

    def restart_containerd(self, spawn: Spawn) -> None:
        """containerd again, on its recorded root, state and socket: its images, and the shims of
        the containers that outlived it, are still there."""
        t = time.monotonic()
        self._containerd(spawn)
        self.out(f"  containerd               {self.net.socket} ({time.monotonic() - t:.1f}s)")

    def restart_kubelet(self, spawn: Spawn, kubeconfig: Path) -> None:
        """The kubelet again (its root dir, certificates and the Pods it ran are kept)."""
        t = time.monotonic()
        self._kubelet(spawn, kubeconfig)
        self.out(f"  kubelet                  {NODE_NAME} Ready in {time.monotonic() - t:.1f}s")

    def _route_kubernetes_service(self, kubeconfig: Path) -> None:
        """What kube-proxy would do for the one Service Pods need: the kubelet gives every Pod
        ``KUBERNETES_SERVICE_HOST``/``_PORT`` = the ``kubernetes`` Service's ClusterIP, port 443,
        whose Endpoints the API server keeps at its advertise address (the node IP). A DNAT rule
        for this node's pod range sends it there; the API server's serving cert covers the
        ClusterIP. (No kube-proxy: it is not among the binaries the stack builds, and one rule
        is all it would add here.) The rule names the pod range, so ``down`` removes it with
        the node's other rules."""
        server = json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        api = server.removeprefix("https://")
        _run(
            [
                "iptables", "-t", "nat", "-A", "PREROUTING", "-s", self.net.pod_cidr,
                "-d", f"{KUBERNETES_SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
                "-j", "DNAT", "--to-destination", api,
            ]
        )  # fmt: skip

    def _cgroup_root(self, record: Callable[[str], None]) -> None:
        """The kubelet wants its cgroupRoot to exist in every hierarchy; a new cpuset cgroup starts
        with no CPUs and no memory nodes, so it gets its parent's."""
        record("cgroups")
        for hier in cgroup_hierarchies():
            d = hier / self.net.cgroup_root.lstrip("/")
            d.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (d / f).exists() and not (d / f).read_text().strip():
                    (d / f).write_text((hier / f).read_text())

    def _containerd(self, spawn: Spawn) -> None:
        root, state = self.node_dir / "containerd" / "root", self.node_dir / "containerd" / "state"
        for d in (root, state, Path(self.net.socket).parent, self.node_dir / "cni" / "net.d"):
            d.mkdir(parents=True, exist_ok=True)
        q = json.dumps  # a TOML basic string is a JSON string for these values
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = {q(str(root))}
state = {q(str(state))}
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = {q(self.net.socket)}
[plugins."io.containerd.internal.v1.opt"]
  path = {q(str(self.node_dir / "containerd" / "opt"))}
{cri}]
  # The VM lacks CAP_SYS_RESOURCE: without it every sandbox fails (runc cannot lower oom_score_adj).
  restrict_oom_score_adj = true
  sandbox_image = {q(PAUSE_IMAGE)}
  # The pods' network namespaces are mounted under containerd's state, not /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = {q(str(self.node_dir / "runc"))}
{cri}.cni]
  bin_dir = {q(str(CNI_BIN_DIR))}
  conf_dir = {q(str(self.node_dir / "cni" / "net.d"))}
"""
        cfg = self.node_dir / "containerd" / "config.toml"
        cfg.write_text(config)
        proc = spawn("containerd", ["/usr/bin/containerd", "--config", str(cfg)])
        ctr = self.ctr_argv()

        def ready() -> bool:
            return subprocess.run([*ctr, "version"], capture_output=True, check=False).returncode == 0

        _wait_for("containerd", ready, 30, proc, self.logs / "containerd.log")

    def ctr_argv(self) -> list[str]:
        return ["ctr", "-a", self.net.socket, "-n", "k8s.io"]

    def _images(self) -> list[Path]:
        """The pause image (cached by hack/build-image.sh, built by it when missing) and, when
        ``make image`` has built it, the project image."""
        pause = pause_tarball()
        if pause is None:
            self.out("  pause image              not cached: building it (hack/build-image.sh --pause-only)")
            res = subprocess.run(
                [str(REPO_ROOT / "hack" / "build-image.sh"), "--pause-only"],
                capture_output=True,
                text=True,
                check=False,
            )
            pause = pause_tarball()
            if res.returncode != 0 or pause is None:
                raise StackError(f"building the pause image failed:\n{res.stderr[-3000:]}")
        images = [pause]
        if PROJECT_IMAGE_TAR.is_file():
            images.append(PROJECT_IMAGE_TAR)
        images += scratch_image_tars()
        return images

    def import_image(self, tar: Path) -> None:
        """Import a ``docker save`` tarball into the node's containerd (namespace k8s.io)."""
        res = subprocess.run(
            [*self.ctr_argv(), "images", "import", str(tar)], capture_output=True, check=False
        )
        if res.returncode != 0:
            raise StackError(f"importing {tar} into containerd failed: {res.stderr.decode(errors='replace')}")

    def _cni(self) -> None:
        n = self.net
        conflist = {
            "cniVersion": "1.0.0",
            "name": f"nightjar-{n.key}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": n.bridge,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": n.pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.node_dir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
                # dockerd (make image) sets the FORWARD policy to DROP; this lets pod traffic through.
                {"type": "firewall", "backend": "iptables"},
            ],
        }
        (self.node_dir / "cni" / "net.d" / "10-nightjar.conflist").write_text(json.dumps(conflist, indent=2))

    def _kubelet(self, spawn: Spawn, kubeconfig: Path) -> None:
        pki, n = self.dir / "pki", self.net
        admin = json.loads(kubeconfig.read_text())
        node_kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": admin["clusters"],
            "users": [
                {
                    "name": f"system:node:{NODE_NAME}",
                    "user": {
                        "client-certificate": str(pki / "node.crt"),
                        "client-key": str(pki / "node.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "node",
                    "context": {"cluster": admin["clusters"][0]["name"], "user": f"system:node:{NODE_NAME}"},
                }
            ],
            "current-context": "node",
        }
        kdir = self.node_dir / "kubelet"
        kdir.mkdir(parents=True, exist_ok=True)
        kc = kdir / "kubeconfig"
        kc.write_text(json.dumps(node_kubeconfig, indent=2))
        kc.chmod(0o600)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # kubelet 1.36 refuses cgroup v1 hosts without it
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": n.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{n.socket}",
            "address": n.node_ip,  # not loopback: the kubelet rejects a loopback node IP
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": n.node_ip,
            "healthzPort": KUBELET_HEALTHZ_PORT,
            "tlsCertFile": str(pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "failSwapOn": False,
            "evictionHard": {
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "memory.available": "100Mi",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "podLogsDir": str(self.node_dir / "pod-logs"),
            "resolvConf": "/etc/resolv.conf",
            "registerNode": True,
        }
        cfg = kdir / "config.json"
        cfg.write_text(json.dumps(config, indent=2))
        proc = spawn(
            "kubelet",
            [
                str(binary("kubernetes", "kubelet")),
                f"--config={cfg}",
                f"--kubeconfig={kc}",
                f"--root-dir={kdir / 'root'}",
                f"--cert-dir={kdir / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={n.node_ip}",
                "--node-labels=nightjar.dev/real-node=true",
                "--v=1",
            ],
        )
        from kubernetes import client
        from kubernetes import config as kconfig

        api = client.CoreV1Api(kconfig.new_client_from_config(str(kubeconfig)))

        def ready() -> bool:
            # Its own health first: a restarted kubelet's Node may still read Ready from before.
            if not _http_ok(f"http://{n.node_ip}:{KUBELET_HEALTHZ_PORT}/healthz"):
                return False
            node = api.read_node(NODE_NAME)
            return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

        try:
            _wait_for(f"kubelet (node {NODE_NAME} Ready)", ready, 60, proc, self.logs / "kubelet.log")
        except StackError as e:
            # The log rarely says why the node is not Ready; its Ready condition does.
            why = ""
            with contextlib.suppress(Exception):
                conds = api.read_node(NODE_NAME).status.conditions or []
                why = "".join(
                    f"\nNode condition Ready: {c.reason}: {c.message}" for c in conds if c.type == "Ready"
                )
            raise StackError(f"{e}{why}") from None


def pause_tarball() -> Path | None:
    """The pause image hack/build-image.sh cached (the newest, if recipes changed)."""
    found = sorted((cache_dir() / "images").glob("local_pause_3.10-*.tar"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# --- a scheduler's one job -------------------------------------------------------------------------


def bind_pods(api: Any, node: str, stop: Callable[[], bool] = lambda: False) -> None:
    """Bind every Pod that waits for the default scheduler to ``node`` (the stack has no
    kube-scheduler and one node). Runs until ``stop()``."""
    from kubernetes import client, watch
    from kubernetes.client.rest import ApiException

    selector = "spec.nodeName=,status.phase=Pending"

    def bind(pod: Any) -> None:
        meta = pod.metadata
        if (
            meta.deletion_timestamp is not None
            or (pod.spec.scheduler_name or "default-scheduler") != "default-scheduler"
        ):
            return
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=meta.name, namespace=meta.namespace),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=node),
        )
        with contextlib.suppress(ApiException):
            # _preload_content=False: the client cannot parse the Status this returns.
            api.create_namespaced_pod_binding(meta.name, meta.namespace, body, _preload_content=False)

    while not stop():
        try:
            pods = api.list_pod_for_all_namespaces(field_selector=selector)
            for pod in pods.items:
                bind(pod)
            for ev in watch.Watch().stream(
                api.list_pod_for_all_namespaces,
                field_selector=selector,
                resource_version=pods.metadata.resource_version,
                timeout_seconds=60,
            ):
                if ev["type"] in ("ADDED", "MODIFIED"):
                    bind(ev["object"])
                if stop():
                    return
        except Exception:  # the API server restarting, a 410: list again
            time.sleep(1)


# --- down ----------------------------------------------------------------------------------------


def cgroup_hierarchies() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers, name=systemd, the unified one)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, post = line.split(" - ", 1)
        if post.split()[0] in ("cgroup", "cgroup2"):
            out.append(Path(_unescape(pre.split()[4])))
    return out


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _mounts_under(roots: list[Path]) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = _unescape(line.split()[4])
        if any(mp == str(r) or mp.startswith(f"{r}/") for r in roots):
            found.append(mp)
    return found


def _node_roots(state_dir: Path, net: NodeNet) -> list[Path]:
    roots = [state_dir]
    sock_dir = Path(net.socket).parent
    if not sock_dir.is_relative_to(state_dir):
        roots.append(sock_dir)
    return roots


def _cgroup_dirs(net: NodeNet) -> Iterator[Path]:
    for hier in cgroup_hierarchies():
        d = hier / net.cgroup_root.lstrip("/")
        if d.is_dir():
            yield d


def _cgroup_pids(net: NodeNet) -> set[int]:
    pids: set[int] = set()
    for top in _cgroup_dirs(net):
        for dirpath, _dirs, _files in os.walk(top):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split())
    return pids


def _shims(net: NodeNet) -> dict[int, Path]:
    """containerd shims of this stack (they name its containerd socket on their command line), each
    with the socket it listens on: containerd 1.6 puts it in /run/containerd/s/, named by a hash
    of the containerd socket, namespace and id, and a killed shim leaves it there."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            argv = (d / "cmdline").read_bytes().decode().split("\0")
            if argv and "containerd-shim" in argv[0] and net.socket in argv:
                ns, cid = argv[argv.index("-namespace") + 1], argv[argv.index("-id") + 1]
                digest = hashlib.sha256(os.path.join(net.socket, ns, cid).encode()).hexdigest()
                found[int(d.name)] = SHIM_SOCKETS / digest
    return found


def drain(kubeconfig: Path, timeout: float = 30) -> None:
    """Delete every Pod on the node and wait until the kubelet has stopped them all, as it does on a
    real node: each sandbox's network is then torn down by CNI. Best effort: ``down`` cleans up
    after a kubelet that could not."""
    from kubernetes import client
    from kubernetes import config as kconfig

    api = client.CoreV1Api(kconfig.new_client_from_config(str(kubeconfig)))
    selector = f"spec.nodeName={NODE_NAME}"
    for pod in api.list_pod_for_all_namespaces(field_selector=selector).items:
        with contextlib.suppress(Exception):
            api.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not api.list_pod_for_all_namespaces(field_selector=selector).items:
            return
        time.sleep(0.5)


def kill_containers(net: NodeNet) -> None:
    """SIGKILL every process in the node's cgroups (containers whose kubelet is gone) and every
    shim of this stack's containerd."""
    sockets: set[Path] = set()
    for _ in range(20):
        shims = _shims(net)
        sockets.update(shims.values())
        pids = _cgroup_pids(net) | set(shims)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for sock in sockets:
        sock.unlink(missing_ok=True)


def cleanup(state_dir: Path, net: NodeNet, made: list[str]) -> None:
    """Undo on the host what the node made (after its processes are stopped)."""
    kill_containers(net)
    roots = _node_roots(state_dir, net)
    # Deepest first; a lazy unmount for whatever is still busy.
    for mp in sorted(set(_mounts_under(roots)), key=lambda p: p.count("/"), reverse=True):
        if _run(["umount", mp], check=False).returncode != 0:
            _run(["umount", "-l", mp], check=False)
    if "veth" in made and net.host_if in _links():
        _run(["ip", "link", "delete", net.host_if], check=False)
    if net.bridge in _links():  # the name is this stack's: only its CNI config made it
        _run(["ip", "link", "delete", net.bridge], check=False)
    _remove_iptables_rules(net)
    if "cgroups" in made:
        for top in _cgroup_dirs(net):
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
    for link in _log_links(state_dir):
        link.unlink(missing_ok=True)
    for r in roots[1:]:
        shutil.rmtree(r, ignore_errors=True)
    if not other_kubelets():
        _remove_shared_chains()
        if "ip_forward" in made:
            IP_FORWARD.write_text("0\n")
        DEVICE_PLUGIN_SOCKET.unlink(missing_ok=True)
        for d in (DEVICE_PLUGIN_SOCKET.parent, DEVICE_PLUGIN_SOCKET.parent.parent):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty: never a host kubelet's data


def _iptables_rules(net: NodeNet) -> list[tuple[str, str]]:
    """(table, ``-A ...`` line) of every iptables rule for this node's pods or bridge."""
    res = _run(["iptables-save"], check=False)
    table, found = "", []
    for line in res.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and (net.pod_prefix in line or net.bridge in line):
            found.append((table, line))
    return found


def _remove_iptables_rules(net: NodeNet) -> None:
    """Rules CNI leaves when a sandbox was not torn down (its chain, too, when it is a pod's own)."""
    chains: set[tuple[str, str]] = set()
    for table, line in _iptables_rules(net):
        argv = shlex.split(line)
        if "-j" in argv:
            target = argv[argv.index("-j") + 1]
            if target.startswith("CNI-") and target not in ("CNI-FORWARD", "CNI-ADMIN"):
                chains.add((table, target))
        _run(["iptables", "-t", table, "-D", *argv[1:]], check=False)
    for table, chain in chains:
        _run(["iptables", "-t", table, "-F", chain], check=False)
        _run(["iptables", "-t", table, "-X", chain], check=False)


def other_kubelets() -> list[int]:
    """Pids of kubelets running on this host (once this node's has stopped: other stacks')."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.path.basename(os.readlink(d / "exe")) == "kubelet":
                    found.append(int(d.name))
    return found


def _shared_chains() -> list[tuple[str, str, str]]:
    """(command, table, chain) of the kubelets' and the CNI firewall's host-wide chains that exist;
    the CNI firewall's only while they hold no rule for a pod."""
    found = []
    for cmd in ("iptables", "ip6tables"):
        table, chains, rules = "", [], []
        for line in _run([f"{cmd}-save"], check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                chains.append((table, line[1:].split()[0]))
            elif line.startswith("-A CNI-FORWARD ") or line.startswith("-A CNI-ADMIN "):
                rules.append(line)
        pods = [r for r in rules if "-j CNI-ADMIN" not in r]
        for table, chain in chains:
            if chain in KUBELET_CHAINS or (chain in CNI_FIREWALL_CHAINS and not pods):
                found.append((cmd, table, chain))
    return found


def _remove_shared_chains() -> None:
    """Jumps to the shared chains, then the chains (no other real node runs: nobody needs them;
    a kubelet started later makes them again)."""
    doomed = _shared_chains()
    names = {(cmd, table): {c for k, t, c in doomed if (k, t) == (cmd, table)} for cmd, table, _ in doomed}
    for (cmd, table), chains in names.items():
        for line in _run([f"{cmd}-save", "-t", table], check=False).stdout.splitlines():
            argv = shlex.split(line) if line.startswith("-A ") else []
            if "-j" in argv and argv[argv.index("-j") + 1] in chains:
                _run([cmd, "-t", table, "-D", *argv[1:]], check=False)
        for chain in chains:
            _run([cmd, "-t", table, "-F", chain], check=False)
        for chain in chains:
            _run([cmd, "-t", table, "-X", chain], check=False)


def _log_links(state_dir: Path) -> list[Path]:
    """The kubelet's links in /var/log/containers to its pods' logs under ``state_dir``."""
    if not CONTAINER_LOG_LINKS.is_dir():
        return []
    out = []
    for link in CONTAINER_LOG_LINKS.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(f"{state_dir}/"):
                out.append(link)
    return out


def leftovers(state_dir: Path, net: NodeNet) -> list[str]:
    """Everything of this node still on the host: processes, mounts, interfaces, addresses,
    cgroups, iptables rules, log links. Empty after ``down``."""
    left: list[str] = []
    roots = _node_roots(state_dir, net)
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes()
            stat = (d / "stat").read_text()
            if stat.rsplit(")", 1)[-1].split()[0] != "Z" and any(str(r).encode() in cmd for r in roots):
                shown = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
                left.append(f"process {d.name}: {shown}")
    left += [f"process {pid} in the node's cgroups" for pid in _cgroup_pids(net)]
    left += [f"mount {mp}" for mp in _mounts_under(roots)]
    left += [f"interface {name}" for name in sorted(_links() & {net.host_if, net.peer_if, net.bridge})]
    for iface in json.loads(_run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]"):
        for a in iface.get("addr_info", []):
            if a["local"] == net.node_ip or str(a["local"]).startswith(net.pod_prefix):
                left.append(f"address {a['local']} on {iface['ifname']}")
    left += [f"cgroup {d}" for d in _cgroup_dirs(net)]
    left += [f"iptables -t {table} {line}" for table, line in _iptables_rules(net)]
    left += [f"log link {link}" for link in _log_links(state_dir)]
    left += [f"directory {r}" for r in roots[1:] if r.exists()]
    if not other_kubelets():
        left += [f"{cmd} -t {table} chain {chain}" for cmd, table, chain in _shared_chains()]
        if DEVICE_PLUGIN_SOCKET.exists():
            left.append(f"socket {DEVICE_PLUGIN_SOCKET}")
    return left
