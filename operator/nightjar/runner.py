"""Start kopf with Nightjar's handlers and settings."""

from __future__ import annotations

import asyncio
import logging

import kopf

from nightjar import handlers  # noqa: F401  (registers the handlers with kopf)


def run_operator(namespaces: list[str], verbose: bool = False) -> None:
    """Run until interrupted. ``namespaces`` empty means every namespace."""
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("nightjar").setLevel(logging.DEBUG if verbose else logging.INFO)
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
        )
    )
