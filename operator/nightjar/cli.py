"""The ``nightjar`` command (also ``kubectl nightjar``): one binary for the operator, the agent
that Jobs run, and the user commands."""

from __future__ import annotations

import click

from nightjar import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nightjar")
def main() -> None:
    """Nightjar: backups and restores of PostgreSQL databases and file documents to S3."""


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--all-namespaces", "-A", is_flag=True, help="Watch every namespace (the default).")
@click.option(
    "--namespace", "-n", "namespaces", multiple=True, help="Watch only these namespaces (repeatable)."
)
@click.option("--verbose", is_flag=True, help="Debug logging.")
def operator(all_namespaces: bool, namespaces: tuple[str, ...], verbose: bool) -> None:
    """Run the Kubernetes operator (uses KUBECONFIG, or the in-cluster service account)."""
    from nightjar.runner import run_operator

    run_operator(namespaces=list(namespaces), verbose=verbose)


@main.group()
def agent() -> None:
    """What the operator's Jobs run inside the cluster (not meant to be run by hand)."""


def _register_agent_commands() -> None:
    from nightjar.agent.cli import register

    register(agent)


_register_agent_commands()
