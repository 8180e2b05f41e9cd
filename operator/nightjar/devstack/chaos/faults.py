"""Injecting the run's faults into the local stack, and bringing every component back.

Processes are killed by their recorded pid (``Stack.kill``, ``Stack.stop_s3``) and started again
the way a developer would (``up`` restarts whatever died, on its ports and data; ``start_s3``);
an agent Pod is deleted with no grace period, as a node losing it would.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from nightjar.constants import LABEL_MANAGED_BY, MANAGED_BY
from nightjar.devstack.chaos.plan import Fault, FaultKind
from nightjar.devstack.chaos.workload import ChaosError
from nightjar.devstack.stack import Stack

#: A fault kind, and the recorded process it stops with which signal (None: not a process).
PROCESS = {
    FaultKind.OPERATOR_KILL: ("operator", signal.SIGKILL),
    FaultKind.APISERVER: ("kube-apiserver", signal.SIGKILL),  # SIGTERM drains for ~15 s
    # SIGINT is PostgreSQL's fast shutdown: sessions are cut, the server stops cleanly.
    FaultKind.POSTGRES: ("postgres", signal.SIGINT),
}
S3 = {FaultKind.S3_PRIMARY: "primary", FaultKind.S3_REPLICA: "replica"}
AGENT_WAIT = 20.0  # how long a Pod-kill fault waits for an agent Pod to run


class Injector:
    def __init__(self, stack: Stack, core: Any, namespaces: list[str], log: Callable[[str], None]) -> None:
        self.stack, self.core, self.namespaces, self.log = stack, core, namespaces, log
        st = stack.status()[0]
        if st is None:
            raise ChaosError(f"no stack in {stack.dir}")
        self.node = st.node

    def inject(self, fault: Fault) -> str:
        """Break what ``fault`` says; returns what was hit ("" when there was nothing to hit)."""
        if fault.kind in PROCESS:
            name, sig = PROCESS[fault.kind]
            pid = self.stack.kill(name, sig)
            return f"{name} pid {pid}" if pid else ""
        if fault.kind in S3:
            self.stack.stop_s3(S3[fault.kind])
            return f"S3 server {S3[fault.kind]}"
        return self._kill_agent_pod(fault.pick)

    def recover(self, fault: Fault) -> None:
        if fault.kind in S3:
            self.stack.start_s3(S3[fault.kind])
        elif fault.kind in PROCESS:
            self.stack.up(with_operator=True, node=self.node)

    def heal(self, timeout: float = 180, fresh_controllers: bool = False) -> None:
        """Every component of the stack runs again (both S3 servers, all processes).

        ``fresh_controllers`` also restarts kube-controller-manager: after the API server was
        killed under it many times, its Job informer can stay behind what it wrote, and Kubernetes'
        job controller then refuses to sync those Jobs ("read version ... is not as new as written
        version", a rate-limited retry of up to ~16 min) — a Job whose Pod was killed gets no new
        Pod. That is the control plane's state, not the operator's: a restarted controller lists
        everything afresh."""
        if fresh_controllers:
            self.stack.kill("kube-controller-manager", signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                for which in S3.values():
                    self.stack.start_s3(which)
                self.stack.up(with_operator=True, node=self.node)
                _, _, dead = self.stack.status()
                if not dead:
                    return
                problem = f"still not running: {', '.join(p.name for p in dead)}"
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise ChaosError(f"the stack did not come back within {timeout:.0f}s: {problem}")
            self.log(f"healing the stack: {problem}; trying again")
            time.sleep(3)

    def _kill_agent_pod(self, pick: int) -> str:
        deadline = time.monotonic() + AGENT_WAIT
        while time.monotonic() < deadline:
            pods = sorted(
                (p.metadata.namespace, p.metadata.name)
                for ns in self.namespaces
                for p in self.core.list_namespaced_pod(
                    ns, label_selector=f"{LABEL_MANAGED_BY}={MANAGED_BY}", _request_timeout=10
                ).items
                if p.status.phase == "Running" and not p.metadata.deletion_timestamp
            )
            if pods:
                ns, name = pods[pick % len(pods)]
                self.core.delete_namespaced_pod(name, ns, grace_period_seconds=0, _request_timeout=10)
                return f"Pod {ns}/{name}"
            time.sleep(0.5)
        return ""
