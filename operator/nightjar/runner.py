"""Start kopf with Nightjar's handlers and settings: metrics, logging, scope, leader election."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import kopf

from nightjar import handlers, metrics

log = logging.getLogger("nightjar")


class RetryIsAWarning(logging.Filter):
    """kopf logs a handler's TemporaryError at ERROR and posts it as an ``Error`` Event. For
    Nightjar a retry is a wait it states in the resource's status (a scratch server starting,
    storage unreachable for now), so it becomes a WARNING (a ``Warning`` Event); a handler that
    fails for good stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and " failed temporarily" in record.getMessage():
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
        return True


@dataclass(frozen=True)
class LeaderOptions:
    namespace: str
    name: str = "nightjar-operator"


def run_operator(
    namespaces: list[str],
    verbose: bool = False,
    json_logs: bool = False,
    metrics_port: int = 0,
    metrics_address: str = "0.0.0.0",  # noqa: S104  (in a Pod: Prometheus scrapes the Pod's IP)
    leader: LeaderOptions | None = None,
) -> None:
    """Run until interrupted. ``namespaces`` empty means every namespace.

    With ``leader``, the process first waits to hold the Lease (metrics are served meanwhile, so
    a standby is visibly alive), then runs; it exits when it loses the Lease and releases it on a
    clean stop.
    """
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.PLAIN)
    logging.getLogger("nightjar").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("kopf.objects").addFilter(RetryIsAWarning())
    handlers.set_scope(namespaces)
    if metrics_port:
        metrics.start_server(metrics_port, metrics_address)
        log.info("metrics at http://%s:%d/metrics", metrics_address, metrics_port)
    elector = None
    metrics.leader(leader is None)  # a standby says 0 until it holds the Lease
    if leader is not None:
        from nightjar.kube import load_client
        from nightjar.leader import LeaderElector

        elector = LeaderElector(load_client(), namespace=leader.namespace, name=leader.name)
        log.info("leader election: lease %s/%s as %s", leader.namespace, leader.name, elector.me)
        elector.acquire()
        metrics.leader(True)  # it exits when it loses the Lease: no way back to 0 but a new process
        elector.start_renewing()
    try:
        asyncio.run(
            kopf.operator(
                clusterwide=not namespaces,
                namespaces=namespaces,
                standalone=True,  # no kopf peering: the Lease above decides who acts
            )
        )
    finally:
        if elector is not None:
            elector.release()
