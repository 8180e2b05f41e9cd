"""The process node: a stand-in for a kubelet that runs Pod containers as local processes.

TEST/DEV ONLY — not part of Nightjar the product. Production runs on real clusters, where
the kubelet runs the Jobs' containers from the image built by the Dockerfile.

It registers a Node, binds every pending Pod to it (there is no scheduler in the local
stack), and runs each container's command as a local process with the Pod's env resolved
(values, Secret/ConfigMap refs, envFrom, fieldRefs) and its volumes (hostPath, PVCs bound to
hostPath/local PVs, emptyDir, Secret, ConfigMap) mapped to local directories. Like the
ServiceAccount admission plugin and the kubelet together, it gives a Pod its service account's
token (bound to the Pod, refreshed at 80% of its lifetime), with ``ca.crt``, ``namespace`` and a
kubeconfig made of them in ``KUBECONFIG``; a Pod whose ServiceAccount does not exist does not
start. A container's environment is built from nothing, never inherited. It honours each
container's ``terminationMessagePath`` and reports Pod status with the real exit code, so the
real Job controller does retries, backoff limits and completion. Deleting a Pod kills its
processes (the whole process group), then finalises the deletion, as a kubelet does.

Limits (documented in docs/local-stack.md): images are not pulled — a container needs a
``command`` unless its image is a known one (``nightjar`` → the ``nightjar`` console script);
volume paths are rewritten in command/args/env rather than mounted; probes, resource limits
and security contexts are not enforced.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from nightjar.devstack import podspec

log = logging.getLogger("nightjar.processnode")

NODE_LABEL = "nightjar.dev/process-node"
RESTART_BACKOFF_START = 10.0
RESTART_BACKOFF_MAX = 300.0
TOKEN_RETRY_SECONDS = 10.0


class ServiceAccountError(podspec.ContainerConfigError):
    """The Pod's ServiceAccount is missing or its token cannot be had: the Pod does not start."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def _service_account_error(name: str, what: str, e: ApiException) -> ServiceAccountError:
    if e.status == 404:
        return ServiceAccountError(f'serviceaccount "{name}" not found', "ServiceAccountNotFound")
    detail = f"{e.status} {e.reason}"
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        detail += f": {json.loads(e.body)['message']}"
    return ServiceAccountError(f'serviceaccount "{name}": {what} failed ({detail})')


def _write_atomic(path: Path, data: str | bytes, mode: int) -> None:
    """Readers (a client re-reading its token) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _cluster_ca(api: client.CoreV1Api, work_dir: Path) -> bytes | None:
    """The CA the node itself trusts for the API server: the kubeconfig's
    ``certificate-authority-data`` (the client keeps it in a file), else the stack's PKI."""
    candidates = [
        getattr(getattr(getattr(api, "api_client", None), "configuration", None), "ssl_ca_cert", None),
        work_dir.parent / "pki" / "apiserver" / "apiserver.crt",
    ]
    for c in candidates:
        if c:
            with contextlib.suppress(OSError):
                return Path(c).read_bytes()
    return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProcessNode:
    """Registers the Node, binds Pods and supervises one :class:`PodRunner` per Pod."""

    def __init__(
        self,
        api: client.CoreV1Api,
        name: str,
        work_dir: Path,
        entrypoints: Mapping[str, list[str]],
        api_host: str,
        api_port: int,
    ) -> None:
        self.api = api
        self.name = name
        self.work_dir = work_dir
        self.entrypoints = dict(entrypoints)
        self.api_host = api_host
        self.api_port = api_port
        configured = getattr(getattr(getattr(api, "api_client", None), "configuration", None), "host", None)
        self.api_server = str(configured) if configured else f"https://{api_host}:{api_port}"
        self.ca_cert = _cluster_ca(api, work_dir)
        # On a host that is itself a Pod, the in-cluster path holds *its* token: a client that
        # saw KUBERNETES_SERVICE_HOST would use it (against our API server) instead of KUBECONFIG.
        self.host_has_incluster_token = Path(podspec.SERVICE_ACCOUNT_MOUNT_PATH, "token").exists()
        self.runners: dict[str, PodRunner] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        (work_dir / "pids").mkdir(parents=True, exist_ok=True)
        (work_dir / "pods").mkdir(parents=True, exist_ok=True)
        (work_dir / "logs").mkdir(parents=True, exist_ok=True)

    # --- the Node -----------------------------------------------------------------------

    def _node_status(self) -> dict[str, Any]:
        mem_kib = 0
        with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{mem_kib}Ki", "pods": "250"}
        now = _now()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "ProcessNodeReady",
                    "message": "Nightjar test/dev process node: runs containers as local processes",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "nodeInfo": {
                "machineID": "nightjar-process-node",
                "systemUUID": "nightjar-process-node",
                "bootID": str(os.getpid()),
                "kernelVersion": platform.release(),
                "osImage": "local processes",
                "containerRuntimeVersion": "nightjar-process-node://0.1.0",
                "kubeletVersion": "v0.0.0-process-node",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def register(self) -> None:
        body = {
            "metadata": {
                "name": self.name,
                "labels": {
                    NODE_LABEL: "true",
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
                "annotations": {"nightjar.dev/description": "test/dev process node, not a kubelet"},
            }
        }
        try:
            self.api.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        self.api.patch_node_status(self.name, {"status": self._node_status()})
        log.info("node %s registered", self.name)

    def _heartbeat(self) -> None:
        while not self.stopping.wait(20):
            try:
                self.api.patch_node_status(self.name, {"status": self._node_status()})
            except Exception:
                log.exception("node heartbeat failed")

    # --- Pods ---------------------------------------------------------------------------

    def _bind(self, pod: client.V1Pod) -> None:
        meta = pod.metadata
        binding = client.V1Binding(
            metadata=client.V1ObjectMeta(name=meta.name, namespace=meta.namespace),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=self.name),
        )
        try:
            # _preload_content=False: the client fails to parse the Status this returns
            # (kubernetes-client/python#547, #825).
            self.api.create_namespaced_pod_binding(meta.name, meta.namespace, binding, _preload_content=False)
            log.info("bound %s/%s", meta.namespace, meta.name)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("binding %s/%s failed: %s", meta.namespace, meta.name, e.reason)

    def handle(self, event_type: str, pod: client.V1Pod) -> None:
        meta, spec = pod.metadata, pod.spec
        uid = meta.uid
        if event_type == "DELETED":
            runner = self.runners.pop(uid, None)
            if runner:
                threading.Thread(target=runner.kill, daemon=True).start()
            return
        if not spec.node_name:
            if (
                meta.deletion_timestamp is None
                and (spec.scheduler_name or "default-scheduler") == "default-scheduler"
            ):
                self._bind(pod)
            return
        if spec.node_name != self.name:
            return
        with self.lock:
            runner = self.runners.get(uid)
            if meta.deletion_timestamp is not None:
                if runner is None:
                    runner = PodRunner(self, pod)
                    self.runners[uid] = runner
                runner.request_deletion(pod)
                return
            if runner is None and pod.status.phase not in ("Succeeded", "Failed"):
                runner = PodRunner(self, pod)
                self.runners[uid] = runner
                runner.start()

    def _adopt_on_start(self) -> None:
        """Pods left Running by a previous node process have lost their processes."""
        pods = self.api.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.name}").items
        for pod in pods:
            if pod.status.phase in ("Succeeded", "Failed") or pod.metadata.deletion_timestamp:
                continue
            if pod.status.phase == "Running" and pod.spec.restart_policy != "Always":
                log.info(
                    "pod %s/%s lost its processes in a node restart",
                    pod.metadata.namespace,
                    pod.metadata.name,
                )
                with contextlib.suppress(ApiException):
                    self.api.patch_namespaced_pod_status(
                        pod.metadata.name,
                        pod.metadata.namespace,
                        {
                            "status": {
                                "phase": "Failed",
                                "reason": "NodeRestarted",
                                "message": "the process node restarted while the pod ran",
                            }
                        },
                    )

    def run(self) -> None:
        self.register()
        self._adopt_on_start()
        threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat").start()
        rv = ""
        while not self.stopping.is_set():
            try:
                if not rv:
                    pods = self.api.list_pod_for_all_namespaces()
                    rv = pods.metadata.resource_version
                    for pod in pods.items:
                        self.handle("ADDED", pod)
                w = watch.Watch()
                for ev in w.stream(
                    self.api.list_pod_for_all_namespaces,
                    resource_version=rv,
                    timeout_seconds=60,
                    allow_watch_bookmarks=True,
                ):
                    if self.stopping.is_set():
                        break
                    obj = ev["object"]
                    if ev["type"] == "BOOKMARK":
                        rv = (
                            obj["metadata"]["resourceVersion"]
                            if isinstance(obj, dict)
                            else obj.metadata.resource_version
                        )
                        continue
                    if ev["type"] == "ERROR":
                        rv = ""
                        break
                    rv = obj.metadata.resource_version
                    try:
                        self.handle(ev["type"], obj)
                    except Exception:
                        log.exception("handling pod %s/%s failed", obj.metadata.namespace, obj.metadata.name)
            except ApiException as e:
                if e.status == 410:
                    rv = ""
                    continue
                log.warning("watch failed: %s; retrying", e.reason)
                time.sleep(1)
            except Exception:
                if self.stopping.is_set():
                    break
                log.exception("watch failed; retrying")
                time.sleep(1)

    def shutdown(self) -> None:
        """Kill every process this node started (the stack is going down)."""
        self.stopping.set()
        with self.lock:
            runners = list(self.runners.values())
        for r in runners:
            r.kill(grace=2.0, report=False)


class PodRunner:
    """Runs one Pod: init containers in order, then its containers, restarting per policy."""

    def __init__(self, node: ProcessNode, pod: client.V1Pod) -> None:
        self.node = node
        self.api = node.api
        self.pod = client.ApiClient().sanitize_for_serialization(pod)
        self.name = pod.metadata.name
        self.namespace = pod.metadata.namespace
        self.uid = pod.metadata.uid
        self.dir = node.work_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.statuses: dict[str, dict[str, Any]] = {}
        self.init_statuses: dict[str, dict[str, Any]] = {}
        self.restarts: dict[str, int] = {}
        self.killed = threading.Event()
        self.deleting = threading.Event()
        self.done = threading.Event()
        self.start_time = _now()
        self.lock = threading.Lock()
        # The automounted service account token: its directory (None: the Pod gets none),
        # when it was issued and expires (time.monotonic()), and when a failed refresh retries.
        self.sa_checked = False
        self.sa_dir: Path | None = None
        self.sa_issued = 0.0
        self.sa_expires = 0.0
        self.sa_retry_at = 0.0
        self.thread = threading.Thread(
            target=self._run, daemon=True, name=f"pod-{self.namespace}/{self.name}"
        )

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def request_deletion(self, pod: client.V1Pod) -> None:
        if self.deleting.is_set():
            return
        self.deleting.set()
        grace = pod.metadata.deletion_grace_period_seconds
        threading.Thread(
            target=self._finalize_deletion, args=(30.0 if grace is None else float(grace),), daemon=True
        ).start()

    def _finalize_deletion(self, grace: float) -> None:
        self.kill(grace=grace, report=True)
        with contextlib.suppress(ApiException):
            self.api.delete_namespaced_pod(
                self.name,
                self.namespace,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)
                ),
            )
        with self.node.lock:
            self.node.runners.pop(self.uid, None)

    def kill(self, grace: float = 0.0, report: bool = False) -> None:
        """SIGTERM every process group, SIGKILL what is left after ``grace`` seconds."""
        self.killed.set()
        with self.lock:
            procs = list(self.procs.items())
        for _, p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, p in procs:
            remaining = max(0.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=remaining)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        if threading.current_thread() is not self.thread:
            self.done.wait(timeout=10)
        if report and self.pod["status"].get("phase") not in ("Succeeded", "Failed"):
            self._report(phase="Failed", reason="Killed", message="the pod was deleted")

    # --- lookups ------------------------------------------------------------------------

    def _lookups(self) -> podspec.Lookups:
        def secret(name: str) -> dict[str, str] | None:
            try:
                s = self.api.read_namespaced_secret(name, self.namespace)
            except ApiException as e:
                if e.status == 404:
                    return None
                raise
            return {
                k: base64.b64decode(v).decode("utf-8", errors="replace") for k, v in (s.data or {}).items()
            }

        def config_map(name: str) -> dict[str, str] | None:
            try:
                c = self.api.read_namespaced_config_map(name, self.namespace)
            except ApiException as e:
                if e.status == 404:
                    return None
                raise
            return dict(c.data or {})

        return podspec.Lookups(secret=secret, config_map=config_map)

    def _volume_paths(self) -> dict[str, Path]:
        """Local directory of each volume of the Pod."""
        paths: dict[str, Path] = {}
        lookups = self._lookups()
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "emptyDir" in vol:
                p = self.dir / "volumes" / name
                p.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in vol:
                p = Path(vol["hostPath"]["path"])
                htype = vol["hostPath"].get("type") or ""
                if htype == "DirectoryOrCreate":
                    p.mkdir(parents=True, exist_ok=True)
                elif htype == "Directory" and not p.is_dir():
                    raise podspec.ContainerConfigError(f"hostPath {p} is not a directory")
            elif "persistentVolumeClaim" in vol:
                p = self._pvc_path(vol["persistentVolumeClaim"]["claimName"])
            elif "secret" in vol or "configMap" in vol:
                p = self.dir / "volumes" / name
                p.mkdir(parents=True, exist_ok=True)
                self._write_keys(p, name, vol, lookups)
            elif "projected" in vol:
                p = self.dir / "volumes" / name
                p.mkdir(parents=True, exist_ok=True)
                for src in vol["projected"].get("sources") or []:
                    if "serviceAccountToken" in src:
                        self._write_token(p, src["serviceAccountToken"])
                    elif "secret" in src or "configMap" in src:
                        self._write_keys(p, name, src, lookups)
                    else:
                        raise podspec.ContainerConfigError(
                            f"process node: projected source {sorted(src)} is not supported (volume {name})"
                        )
            else:
                kinds = sorted(k for k in vol if k != "name")
                raise podspec.ContainerConfigError(
                    f"process node: volume {name!r} of type {kinds} is not supported"
                )
            paths[name] = p
        return paths

    def _write_keys(self, p: Path, name: str, vol: dict[str, Any], lookups: podspec.Lookups) -> None:
        """A Secret or ConfigMap volume (or projected source): one file per key or listed item."""
        is_secret = "secret" in vol
        src = vol["secret"] if is_secret else vol["configMap"]
        ref = src.get("secretName") or src.get("name") if is_secret else src.get("name")
        data = (lookups.secret if is_secret else lookups.config_map)(str(ref))
        if data is None:
            if src.get("optional"):
                data = {}
            else:
                raise podspec.ContainerConfigError(
                    f'{"secret" if is_secret else "configmap"} "{ref}" not found (volume {name})'
                )
        items = src.get("items") or [{"key": k, "path": k} for k in data]
        for it in items:
            if it["key"] in data:
                target = p / it["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[it["key"]], encoding="utf-8")
                target.chmod(0o600 if is_secret else 0o644)

    def _write_token(self, p: Path, src: dict[str, Any]) -> None:
        """A bound service account token, as the kubelet gets it: TokenRequest for the Pod's
        service account, bound to the Pod (so it dies with it). Not refreshed: the process node
        runs short Jobs; the token lives ``expirationSeconds`` (default one hour)."""
        sa = podspec.service_account_name(self.pod)
        spec: dict[str, Any] = {"expirationSeconds": int(src.get("expirationSeconds") or 3600)}
        spec.update(self._token_binding())
        if src.get("audience"):
            spec["audiences"] = [src["audience"]]
        try:
            tr = self.api.create_namespaced_service_account_token(sa, self.namespace, {"spec": spec})
        except ApiException as e:
            raise podspec.ContainerConfigError(
                f'serviceaccount "{sa}": token request failed ({e.status} {e.reason})'
            ) from e
        target = p / src.get("path", "token")
        target.write_text(tr.status.token, encoding="utf-8")
        target.chmod(0o600)

    # --- service account automount -----------------------------------------------------

    def _token_binding(self) -> dict[str, Any]:
        """Bind a token to the Pod, as the kubelet does, so it dies with the Pod.

        The API server binds a token only to a Pod that names the same ServiceAccount. On a
        cluster the admission plugin fills in ``serviceAccountName: default``; here it is off, so
        a Pod that names none gets an unbound token of ``default`` (valid until it expires).
        """
        if not self.pod["spec"].get("serviceAccountName"):
            return {}
        return {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid}}

    def _setup_service_account(self) -> None:
        """What the ServiceAccount admission plugin and the kubelet do for a Pod.

        The ServiceAccount must exist (a cluster refuses the Pod otherwise); unless the Pod (or
        else the ServiceAccount) opts out, the Pod gets a token bound to it in a per-pod
        directory that stands for ``/var/run/secrets/kubernetes.io/serviceaccount``, for every
        container that mounts nothing of its own there.
        """
        name = podspec.service_account_name(self.pod)
        try:
            sa = self.api.read_namespaced_service_account(name, self.namespace)
        except ApiException as e:
            raise _service_account_error(name, "lookup", e) from e
        spec = self.pod["spec"]
        containers = [*(spec.get("initContainers") or []), *spec["containers"]]
        if podspec.automount_token(self.pod, client.ApiClient().sanitize_for_serialization(sa)) and not all(
            podspec.mounts_service_account_path(c) for c in containers
        ):
            if self.node.ca_cert is None:
                raise ServiceAccountError("process node: the cluster CA is unknown; cannot automount a token")
            self.sa_dir = self.dir / "serviceaccount"
            self._write_service_account(self.sa_dir, self.node.ca_cert)
        self.sa_checked = True

    def _write_service_account(self, d: Path, ca_cert: bytes) -> None:
        """TokenRequest as the kubelet makes it, then ``token``, ``ca.crt``, ``namespace`` and
        ``kubeconfig`` in ``d`` (all four rewritten on refresh, each atomically)."""
        name = podspec.service_account_name(self.pod)
        seconds = podspec.SERVICE_ACCOUNT_TOKEN_SECONDS
        body = {"spec": {"expirationSeconds": seconds, **self._token_binding()}}
        requested = time.monotonic()
        try:
            tr = self.api.create_namespaced_service_account_token(name, self.namespace, body)
        except ApiException as e:
            raise _service_account_error(name, "token request", e) from e
        lifetime = float(seconds)
        expires = getattr(tr.status, "expiration_timestamp", None)
        if isinstance(expires, dt.datetime):
            left = (expires - dt.datetime.now(dt.UTC)).total_seconds()
            lifetime = max(60.0, min(lifetime, left))
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = str(tr.status.token)
        _write_atomic(d / "token", token, 0o600)
        _write_atomic(d / "ca.crt", ca_cert, 0o644)
        _write_atomic(d / "namespace", self.namespace, 0o644)
        kubeconfig = podspec.service_account_kubeconfig(
            self.node.api_server, str(d / "ca.crt"), token, self.namespace, name
        )
        _write_atomic(d / "kubeconfig", json.dumps(kubeconfig, indent=2), 0o600)
        self.sa_issued, self.sa_expires = requested, requested + lifetime
        log.info(
            "token of serviceaccount %s/%s for pod %s written (refresh in %.0fs)",
            self.namespace,
            name,
            self.name,
            podspec.TOKEN_REFRESH_FRACTION * lifetime,
        )

    def _refresh_service_account(self) -> None:
        """Called from the supervision loop: a new token once 80% of the old one's life is gone."""
        now = time.monotonic()
        if (
            self.sa_dir is None
            or self.node.ca_cert is None
            or now < self.sa_retry_at
            or not podspec.token_refresh_due(self.sa_issued, self.sa_expires, now)
        ):
            return
        try:
            self._write_service_account(self.sa_dir, self.node.ca_cert)
        except (podspec.ContainerConfigError, ApiException, OSError) as e:
            self.sa_retry_at = now + TOKEN_RETRY_SECONDS
            log.warning("refreshing the token of pod %s/%s failed: %s", self.namespace, self.name, e)

    def _pvc_path(self, claim: str) -> Path:
        try:
            pvc = self.api.read_namespaced_persistent_volume_claim(claim, self.namespace)
        except ApiException as e:
            if e.status == 404:
                raise podspec.ContainerConfigError(f'persistentvolumeclaim "{claim}" not found') from e
            raise
        if pvc.status.phase != "Bound" or not pvc.spec.volume_name:
            raise podspec.ContainerConfigError(f'persistentvolumeclaim "{claim}" is not bound')
        pv = self.api.read_persistent_volume(pvc.spec.volume_name)
        if pv.spec.host_path is not None:
            p = Path(pv.spec.host_path.path)
        elif pv.spec.local is not None:
            p = Path(pv.spec.local.path)
        else:
            raise podspec.ContainerConfigError(
                f"process node: PV {pv.metadata.name} is neither hostPath nor local"
            )
        p.mkdir(parents=True, exist_ok=True)
        return p

    # --- running ------------------------------------------------------------------------

    def _prepare(
        self, container: dict[str, Any], volumes: Mapping[str, Path]
    ) -> tuple[list[str], dict[str, str], str, Path]:
        cname = container["name"]
        cdir = self.dir / "containers" / cname
        cdir.mkdir(parents=True, exist_ok=True)
        pmap = podspec.PathMap()
        for vm in container.get("volumeMounts") or []:
            if vm["name"] not in volumes:
                raise podspec.ContainerConfigError(f"volumeMount {vm['name']!r} names no volume of the pod")
            local = volumes[vm["name"]]
            if vm.get("subPath"):
                local = local / vm["subPath"]
                local.mkdir(parents=True, exist_ok=True)
            pmap.add(vm["mountPath"], str(local))
        term_path = container.get("terminationMessagePath") or podspec.DEFAULT_TERMINATION_MESSAGE_PATH
        term_local = cdir / "termination-log"
        term_local.unlink(missing_ok=True)
        term_local.touch()
        pmap.add(term_path, str(term_local))
        kubeconfig: str | None = None
        if self.sa_dir is not None and not podspec.mounts_service_account_path(container):
            pmap.add(podspec.SERVICE_ACCOUNT_MOUNT_PATH, str(self.sa_dir))
            kubeconfig = str(self.sa_dir / "kubeconfig")
        env = podspec.resolve_env(self.pod, container, self._lookups())
        argv = podspec.argv(container, env, self.node.entrypoints, rewrite=pmap.rewrite)
        env = {k: pmap.rewrite(v) for k, v in env.items()}
        # Built from nothing: the node's own environment (the admin KUBECONFIG) never leaks in.
        full_env = podspec.process_env(
            path=os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            home=str(cdir),
            hostname=self.name,
            api_host=self.node.api_host,
            api_port=self.node.api_port,
            pod_env=env,
            kubeconfig=kubeconfig,
            service_env=not (kubeconfig and self.node.host_has_incluster_token),
        )
        workdir = pmap.rewrite(container["workingDir"]) if container.get("workingDir") else str(cdir)
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return argv, full_env, workdir, term_local

    def _spawn(
        self, container: dict[str, Any], volumes: Mapping[str, Path]
    ) -> tuple[subprocess.Popen[bytes] | None, Path]:
        cname = container["name"]
        argv, env, workdir, term_local = self._prepare(container, volumes)
        logfile = self.node.work_dir / "logs" / f"{self.namespace}_{self.name}_{cname}.log"
        exe = shutil.which(argv[0], path=env["PATH"]) if "/" not in argv[0] else argv[0]
        started = _now()
        if exe is None or not os.access(exe, os.X_OK):
            self._set_terminated(
                container,
                128,
                "StartError",
                f'exec: "{argv[0]}": executable file not found in $PATH',
                started,
            )
            return None, term_local
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                [exe, *argv[1:]],
                env=env,
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (self.node.work_dir / "pids" / str(proc.pid)).write_text(f"{self.namespace}/{self.name}/{cname}\n")
        with self.lock:
            self.procs[cname] = proc
        log.info("started %s/%s[%s] pid %d: %s", self.namespace, self.name, cname, proc.pid, argv[0])
        return proc, term_local

    def _wait(
        self, container: dict[str, Any], proc: subprocess.Popen[bytes], term_local: Path, started: str
    ) -> int:
        code = proc.wait()
        (self.node.work_dir / "pids" / str(proc.pid)).unlink(missing_ok=True)
        if code < 0:
            code = 128 - code  # killed by a signal: the container runtime reports 128 + signal
        message = ""
        with contextlib.suppress(OSError):
            message = podspec.termination_message(term_local.read_bytes())
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            logfile = self.node.work_dir / "logs" / f"{self.namespace}_{self.name}_{container['name']}.log"
            with contextlib.suppress(OSError):
                message = podspec.termination_message(
                    logfile.read_bytes()[-podspec.TERMINATION_MESSAGE_LIMIT :]
                )
        self._set_terminated(container, code, "Completed" if code == 0 else "Error", message, started)
        return code

    def _status_entry(
        self, container: dict[str, Any], state: dict[str, Any], ready: bool = False
    ) -> dict[str, Any]:
        name = container["name"]
        return {
            "name": name,
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"process://{self.uid}/{name}",
            "ready": ready,
            "started": "running" in state,
            "restartCount": self.restarts.get(name, 0),
            "state": state,
        }

    def _set_terminated(
        self, container: dict[str, Any], code: int, reason: str, message: str, started: str
    ) -> None:
        term: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": _now(),
        }
        if message:
            term["message"] = message
        target = self.init_statuses if container.get("_init") else self.statuses
        target[container["name"]] = self._status_entry(container, {"terminated": term})

    def _report(self, phase: str, reason: str | None = None, message: str | None = None) -> None:
        containers = self.pod["spec"]["containers"]
        all_ready = phase == "Running" and all(
            self.statuses.get(c["name"], {}).get("ready") for c in containers
        )
        initialized = all(
            s["state"].get("terminated", {}).get("exitCode") == 0 for s in self.init_statuses.values()
        ) and len(self.init_statuses) == len(self.pod["spec"].get("initContainers") or [])
        now = _now()

        def cond(t: str, ok: bool) -> dict[str, Any]:
            return {"type": t, "status": "True" if ok else "False", "lastTransitionTime": now}

        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": [
                cond("PodScheduled", True),
                cond("Initialized", initialized),
                cond("ContainersReady", all_ready),
                cond("Ready", all_ready),
            ],
            "containerStatuses": [
                self.statuses.get(c["name"])
                or self._status_entry(
                    c, {"waiting": {"reason": "PodInitializing" if not initialized else "ContainerCreating"}}
                )
                for c in containers
            ],
        }
        if self.init_statuses:
            status["initContainerStatuses"] = list(self.init_statuses.values())
        # Always sent, null when unset: a patch would otherwise keep an earlier reason (say
        # ServiceAccountNotFound) on a Pod that has since started.
        status["reason"] = reason or None
        status["message"] = message or None
        self.pod["status"] = status
        try:
            self.api.patch_namespaced_pod_status(self.name, self.namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:
                log.warning("status of %s/%s: %s", self.namespace, self.name, e.reason)

    def _config_error(self, err: Exception) -> None:
        """Report CreateContainerConfigError on every container not yet started, and wait.

        A ServiceAccount problem is the Pod's, not a container's: the Pod's status says it too.
        """
        for c in self.pod["spec"]["containers"]:
            if c["name"] not in self.statuses:
                self.statuses[c["name"]] = self._status_entry(
                    c, {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
                )
        if isinstance(err, ServiceAccountError):
            self._report("Pending", reason=err.reason, message=str(err))
        else:
            self._report("Pending")
        for c in self.pod["spec"]["containers"]:
            if (
                self.statuses[c["name"]]["state"].get("waiting", {}).get("reason")
                == "CreateContainerConfigError"
            ):
                del self.statuses[c["name"]]

    def _run(self) -> None:
        try:
            self._run_pod()
        except Exception as e:
            log.exception("pod %s/%s crashed the runner", self.namespace, self.name)
            if not self.killed.is_set():
                self._report("Failed", reason="ProcessNodeError", message=str(e))
        finally:
            self.done.set()

    def _run_pod(self) -> None:
        spec = self.pod["spec"]
        policy = spec.get("restartPolicy") or "Always"
        deadline = spec.get("activeDeadlineSeconds")
        deadline_at = time.monotonic() + float(deadline) if deadline else None
        # The ServiceAccount, volumes and env resolve before anything starts; a missing
        # ServiceAccount or Secret keeps the Pod Pending with CreateContainerConfigError until it
        # appears, as with a kubelet.
        while True:
            if self.killed.is_set():
                return
            try:
                if not self.sa_checked:
                    self._setup_service_account()
                volumes = self._volume_paths()
                for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
                    self._prepare(c, volumes)
                break
            except podspec.ContainerConfigError as e:
                self._config_error(e)
                if self.killed.wait(2.0):
                    return

        for init in spec.get("initContainers") or []:
            c = {**init, "_init": True}
            while True:
                if self.killed.is_set():
                    return
                started = _now()
                self.init_statuses[c["name"]] = self._status_entry(c, {"running": {"startedAt": started}})
                self._report("Pending")
                proc, term = self._spawn(c, volumes)
                code = self._wait(c, proc, term, started) if proc else 128
                if code == 0:
                    break
                if policy == "Never":
                    self._report("Failed")
                    return
                self.restarts[c["name"]] = self.restarts.get(c["name"], 0) + 1
                if self.killed.wait(self._backoff(c["name"])):
                    return

        threads = []
        for c in spec["containers"]:
            t = threading.Thread(target=self._supervise, args=(c, volumes, policy), daemon=True)
            threads.append(t)
            t.start()
        # One supervision loop per Pod: the deadline and the token refresh, no timer threads.
        while alive := [t for t in threads if t.is_alive()]:
            if deadline_at is not None and time.monotonic() >= deadline_at:
                self.kill(grace=5.0)
                self._report(
                    "Failed",
                    reason="DeadlineExceeded",
                    message="Pod was active on the node longer than the specified deadline",
                )
                return
            if not self.killed.is_set():
                self._refresh_service_account()
            alive[0].join(timeout=0.5)
        if self.killed.is_set():
            return
        codes = [s["state"].get("terminated", {}).get("exitCode", 1) for s in self.statuses.values()]
        self._report("Succeeded" if all(c == 0 for c in codes) else "Failed")

    def _backoff(self, name: str) -> float:
        n = self.restarts.get(name, 1)
        return float(min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_START * 2.0 ** max(0, n - 1)))

    def _supervise(self, c: dict[str, Any], volumes: Mapping[str, Path], policy: str) -> None:
        while not self.killed.is_set():
            started = _now()
            try:
                proc, term = self._spawn(c, volumes)
            except podspec.ContainerConfigError as e:
                self._set_terminated(c, 128, "CreateContainerConfigError", str(e), started)
                proc, term = None, Path("/nonexistent")
            if proc is not None:
                self.statuses[c["name"]] = self._status_entry(
                    c, {"running": {"startedAt": started}}, ready=True
                )
                self._report("Running")
                code = self._wait(c, proc, term, started)
            else:
                code = 128
            if self.killed.is_set():
                return
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                return
            self.restarts[c["name"]] = self.restarts.get(c["name"], 0) + 1
            self._report("Running")
            if self.killed.wait(self._backoff(c["name"])):
                return
