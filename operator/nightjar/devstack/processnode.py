"""The process node: a stand-in for a kubelet that runs Pod containers as local processes.

TEST/DEV ONLY — not part of Nightjar the product. Production runs on real clusters, where
the kubelet runs the Jobs' containers from the image built by the Dockerfile.

It registers a Node, binds every pending Pod to it (there is no scheduler in the local
stack), and runs each container's command as a local process with the Pod's env resolved
(values, Secret/ConfigMap refs, envFrom, fieldRefs) and its volumes (hostPath, PVCs bound to
hostPath/local PVs, emptyDir, Secret, ConfigMap) mapped to local directories. It honours each
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
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": int(src.get("expirationSeconds") or 3600),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid},
        }
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
        env = podspec.resolve_env(self.pod, container, self._lookups())
        argv = podspec.argv(container, env, self.node.entrypoints, rewrite=pmap.rewrite)
        env = {k: pmap.rewrite(v) for k, v in env.items()}
        base = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(cdir),
            "HOSTNAME": self.name,
            "LANG": "C.UTF-8",
            "KUBERNETES_SERVICE_HOST": self.node.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.node.api_port),
        }
        workdir = pmap.rewrite(container["workingDir"]) if container.get("workingDir") else str(cdir)
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return argv, {**base, **env}, workdir, term_local

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
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        self.pod["status"] = status
        try:
            self.api.patch_namespaced_pod_status(self.name, self.namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:
                log.warning("status of %s/%s: %s", self.namespace, self.name, e.reason)

    def _config_error(self, err: Exception) -> None:
        """Report CreateContainerConfigError on every container not yet started, and wait."""
        for c in self.pod["spec"]["containers"]:
            if c["name"] not in self.statuses:
                self.statuses[c["name"]] = self._status_entry(
                    c, {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
                )
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
        # Volumes and env resolve before anything starts; a missing Secret keeps the Pod
        # Pending with CreateContainerConfigError until it appears, as with a kubelet.
        while True:
            if self.killed.is_set():
                return
            try:
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
        if deadline_at is not None:
            while any(t.is_alive() for t in threads):
                if time.monotonic() >= deadline_at:
                    self.kill(grace=5.0)
                    self._report(
                        "Failed",
                        reason="DeadlineExceeded",
                        message="Pod was active on the node longer than the specified deadline",
                    )
                    return
                time.sleep(0.5)
        for t in threads:
            t.join()
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
