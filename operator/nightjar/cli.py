"""The ``nightjar`` command (also ``kubectl nightjar``): one binary for the operator, the agent
that Jobs run, and the user commands."""

from __future__ import annotations

from typing import Any

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


@main.group()
def schedule() -> None:
    """BackupSchedule helpers."""


@schedule.command("preview")
@click.argument("name", required=False)
@click.option("-f", "--filename", type=click.File("r"), help="A BackupSchedule YAML file (or - for stdin).")
@click.option("-n", "--namespace", default="default", show_default=True, help="Namespace of NAME.")
@click.option("--from", "start", default=None, help="First day (YYYY-MM-DD or RFC 3339, UTC); default today.")
@click.option("--days", default=14, show_default=True, type=click.IntRange(1, 3660))
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def schedule_preview(
    name: str | None, filename: Any, namespace: str, start: str | None, days: int, output: str
) -> None:
    """Print the planned slots of a schedule: time, tier, expiry and Backup name."""
    import datetime as dt
    import itertools
    import json

    import yaml

    from nightjar.domain.retention import format_time
    from nightjar.domain.schedule import Plan

    if filename is not None:
        doc = yaml.safe_load(filename)
        if not isinstance(doc, dict) or doc.get("kind") != "BackupSchedule":
            raise click.ClickException("the file does not hold a BackupSchedule")
    elif name:
        from kubernetes.client.rest import ApiException

        from nightjar.constants import GROUP, VERSION
        from nightjar.kube import Kube, load_client

        try:
            got = Kube(load_client()).get("backupschedules", namespace, name)
        except ApiException as e:
            raise click.ClickException(f"reading BackupSchedule {namespace}/{name}: {e.reason}") from e
        if got is None:
            raise click.ClickException(
                f'BackupSchedule "{name}" not found in namespace {namespace} ({GROUP}/{VERSION})'
            )
        doc = got
    else:
        raise click.UsageError("give a schedule NAME or -f FILE")
    meta = doc.get("metadata") or {}
    try:
        plan = Plan.from_spec(
            meta.get("namespace") or namespace, meta.get("name") or "schedule", doc.get("spec") or {}
        )
        begin = dt.datetime.fromisoformat(start.replace("Z", "+00:00")) if start else dt.datetime.now(dt.UTC)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    if begin.tzinfo is None:
        begin = begin.replace(tzinfo=dt.UTC)
    if start and len(start) == 10:
        begin = begin.replace(hour=0, minute=0, second=0, microsecond=0)
    end = begin + dt.timedelta(days=days)
    slots = list(itertools.takewhile(lambda s: s.time < end, plan.slots(begin)))
    if output == "json":
        for s in slots:
            click.echo(json.dumps(s.as_dict()))
        return
    click.echo(f"{'TIME':<21} {'TIER':<8} {'EXPIRES':<21} NAME")
    for s in slots:
        click.echo(f"{format_time(s.time):<21} {s.tier:<8} {format_time(s.expires):<21} {s.name}")
