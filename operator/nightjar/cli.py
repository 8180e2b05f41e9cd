"""The ``nightjar`` command (also ``kubectl nightjar``): one binary for the operator, the agent
that Jobs run, and the user commands.

User commands take the namespace from ``-n``, else from the kubeconfig's current context, else
``default``, like kubectl. Their work lives in ``nightjar.transfer``; this module only parses
options and turns failures into one clear line and exit code 1. Progress goes to stderr (a bar
on a terminal), results to stdout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from nightjar import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nightjar")
def main() -> None:
    """Nightjar: backups and restores of PostgreSQL databases and file documents to S3."""


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--all-namespaces", "-A", is_flag=True, help="Watch every namespace (the default).")
@click.option(
    "--namespace",
    "-n",
    "namespaces",
    multiple=True,
    envvar="NIGHTJAR_WATCH_NAMESPACES",
    help="Watch only these namespaces (repeatable; env NIGHTJAR_WATCH_NAMESPACES, space-separated).",
)
@click.option("--verbose", is_flag=True, help="Debug logging.")
@click.option(
    "--log-format",
    type=click.Choice(["plain", "json"]),
    default="plain",
    show_default=True,
    envvar="NIGHTJAR_LOG_FORMAT",
    help="json: one JSON object a line (for log shippers).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    envvar="NIGHTJAR_METRICS_PORT",
    help="Serve Prometheus metrics at :PORT/metrics (0: off).",
)
@click.option(
    "--metrics-address",
    default="0.0.0.0",  # noqa: S104  (in a Pod: Prometheus scrapes the Pod's IP)
    show_default=True,
    envvar="NIGHTJAR_METRICS_ADDRESS",
)
@click.option(
    "--leader-elect/--no-leader-elect",
    default=False,
    envvar="NIGHTJAR_LEADER_ELECT",
    help="Run only while holding a Lease, so several replicas are safe (one acts, the others wait).",
)
@click.option(
    "--leader-election-namespace",
    envvar="POD_NAMESPACE",
    default=None,
    help="Namespace of the Lease (default: the Pod's, env POD_NAMESPACE).",
)
@click.option("--leader-election-name", default="nightjar-operator", show_default=True)
def operator(
    all_namespaces: bool,
    namespaces: tuple[str, ...],
    verbose: bool,
    log_format: str,
    metrics_port: int,
    metrics_address: str,
    leader_elect: bool,
    leader_election_namespace: str | None,
    leader_election_name: str,
) -> None:
    """Run the Kubernetes operator (uses KUBECONFIG, or the in-cluster service account)."""
    from nightjar.runner import LeaderOptions, run_operator

    if all_namespaces and namespaces:
        raise click.UsageError("--all-namespaces and --namespace exclude each other")
    if leader_elect and not leader_election_namespace:
        raise click.UsageError("--leader-elect needs --leader-election-namespace (or env POD_NAMESPACE)")
    # Bad configuration stops the start with one clear line, before any watch begins.
    from nightjar.config import OperatorConfig
    from nightjar.domain.residency import PolicyError
    from nightjar.domain.residency import load as load_policy

    try:
        load_policy(OperatorConfig.from_env().residency_policy_file)
    except (ValueError, PolicyError) as e:
        raise click.ClickException(str(e)) from e
    run_operator(
        namespaces=[n for ns in namespaces for n in ns.replace(",", " ").split()],
        verbose=verbose,
        json_logs=log_format == "json",
        metrics_port=metrics_port,
        metrics_address=metrics_address,
        leader=LeaderOptions(leader_election_namespace or "", leader_election_name) if leader_elect else None,
    )


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
@click.option("-n", "--namespace", default=None, help="Namespace of NAME (default: the current context's).")
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
        from nightjar.transfer.cluster import current_namespace

        namespace = namespace or current_namespace()

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
            meta.get("namespace") or namespace or "default",
            meta.get("name") or "schedule",
            doc.get("spec") or {},
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


# --- user commands: errors, namespace ------------------------------------------------------------


@contextlib.contextmanager
def _failures() -> Iterator[None]:
    """Turn every expected failure into ``Error: <one line>`` and exit code 1 (never a secret:
    the messages come from our own errors, the API server's sentences and describe_error)."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    from nightjar.archive import ArchiveError
    from nightjar.storage.errors import IntegrityError
    from nightjar.storage.objects import StorageError, describe_error, is_backend_error
    from nightjar.transfer import CommandError
    from nightjar.transfer.cluster import api_message
    from nightjar.transfer.upload import UploadFailed

    try:
        yield
    except (CommandError, UploadFailed, IntegrityError, StorageError) as e:
        raise click.ClickException(str(e)) from e
    except ArchiveError as e:
        raise click.ClickException(f"not a valid archive: {e}") from e
    except ApiException as e:
        raise click.ClickException(f"Kubernetes API: {api_message(e)}") from e
    except HTTPError as e:
        raise click.ClickException(f"cannot reach the Kubernetes API server: {e}") from e
    except OSError as e:  # the local file: missing, a directory, no space left, no permission
        raise click.ClickException(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from e
    except Exception as e:
        if is_backend_error(e):  # a storage client's failure that no StorageError wrapped
            raise click.ClickException(describe_error(e, "storage")) from e
        raise


def _namespace(namespace: str | None) -> str:
    from nightjar.transfer.cluster import current_namespace

    return namespace or current_namespace()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _CountingWriter:
    """Write-only stream that counts the bytes passing into ``out``."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


_NS_HELP = "Namespace (default: the current context's, else default)."


# --- download / upload ---------------------------------------------------------------------------


@main.command()
@click.argument("backup")
@click.option("-n", "--namespace", help=_NS_HELP)
@click.option(
    "--full",
    "what",
    flag_value="Full",
    default=True,
    help="A .tar.gz of .metadata, db/db.backup, tree/ (default).",
)
@click.option(
    "--database-only", "what", flag_value="DatabaseOnly", help="The bare pg_dump custom-format file."
)
@click.option(
    "--files-only", "what", flag_value="FilesOnly", help="A .tar.gz of tree/ only (cannot be uploaded)."
)
@click.option(
    "-o",
    "--output",
    help="File to write, or - for stdout. Default as Mendix names them: <backup>-<yyyymmddhhmm>.tar.gz, "
    "database-<backup>-<yyyymmddhhmm>.backup.",
)
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
def download(backup: str, namespace: str | None, what: str, output: str | None, force: bool) -> None:
    """Download a Completed backup as an archive in the Mendix format, streamed from storage.

    Every byte is checked against the snapshot's manifest on the way; a damaged snapshot stops
    the download with an error, and no partial file is left behind.
    """
    from nightjar.transfer import CommandError
    from nightjar.transfer import download as dl
    from nightjar.transfer.cluster import connect
    from nightjar.transfer.names import archive_filename
    from nightjar.transfer.progress import Bar

    with _failures():
        ns = _namespace(namespace)
        snap = dl.open_snapshot(connect(), ns, backup)
        if snap.note:
            click.echo(f"note: {snap.note}", err=True)
        target = output or archive_filename(snap.name, snap.created, what)
        label = f"{backup} ({what})"
        if target == "-":
            if sys.stdout.isatty():
                raise CommandError(
                    "refusing to write an archive to a terminal: redirect stdout, or give -o FILE"
                )
            out = _CountingWriter(sys.stdout.buffer)
            with Bar(label, snap.total(what)) as bar:
                written = dl.write(snap, what, out, bar)
            out.flush()
            where = "stdout"
        else:
            path = Path(target)
            if path.exists() and not force:
                raise CommandError(f"{path} exists: remove it, give --force, or choose another name with -o")
            part = path.with_name(path.name + ".part")
            try:
                with part.open("wb") as f, Bar(label, snap.total(what)) as bar:
                    out = _CountingWriter(f)
                    written = dl.write(snap, what, out, bar)
                os.replace(part, path)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            where = str(path)
    detail = f", {written.files} files" if what != "DatabaseOnly" else ""
    click.echo(
        f"Backup {ns}/{backup} ({what}{detail}): {out.count / 1e6:.2f} MB written to {where}", err=True
    )
    for note in written.notes:
        click.echo(f"note: {note}", err=True)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--storage", required=True, help="The BackupStorage to keep the snapshot in.")
@click.option("-n", "--namespace", help=_NS_HELP)
@click.option("--comment", default="", help="Comment of the Backup.")
@click.option("--name", help="Name of the Backup (default upload-<yyyymmddhhmmss>).")
@click.option("--no-wait", is_flag=True, help="Do not wait for the operator to verify the upload.")
@click.option("--timeout", default=300, show_default=True, help="Seconds to wait for the operator.")
def upload(
    file: str,
    storage: str,
    namespace: str | None,
    comment: str,
    name: str | None,
    no_wait: bool,
    timeout: int,
) -> None:
    """Upload a Full (.tar.gz) or Database-only (.backup) archive in the Mendix format as a new
    backup of type Uploaded (FILE - reads stdin).

    The archive is validated while it streams into storage (gzip and tar structure, .metadata,
    the dump's custom format); a bad, truncated or files-only archive is refused, and then
    nothing is left: no Backup, no objects in the bucket.
    """
    from nightjar.constants import GROUP, VERSION
    from nightjar.storage.objects import unreachable
    from nightjar.transfer import CommandError, cluster
    from nightjar.transfer.names import object_name
    from nightjar.transfer.progress import Bar, Follower, Ticking
    from nightjar.transfer.resources import follow
    from nightjar.transfer.upload import backup_body, store, summary_text

    with _failures():
        ns = _namespace(namespace)
        kube = cluster.connect()
        now = _now()
        name = name or object_name("upload", now)
        if kube.get(cluster.BACKUPS, ns, name) is not None:
            raise CommandError(f'Backup "{name}" already exists in namespace {ns}: choose another --name')
        st = cluster.storage(kube, ns, storage)
        refused = cluster.residency_refusal(kube, ns, storage)
        if refused:  # the operator's verdict: no data goes to this storage
            raise CommandError(f"storage {storage}: {refused}")
        into = st.target.store()
        down = unreachable(into)
        if down:
            raise CommandError(f"storage {storage}: {down}")
        if file == "-":
            src: Any = sys.stdin.buffer
            total = None
        else:
            path = Path(file)
            if not path.is_file():
                raise CommandError(f"{file}: no such file")
            src = path.open("rb")
            total = path.stat().st_size
        with src, Bar(f"uploading {Path(file).name if file != '-' else 'stdin'}", total) as bar:
            stored = store(
                into,
                st.target.prefix,
                Ticking(src, bar),
                keyring=st.keyring,
                namespace=ns,
                name=name,
                file_name=Path(file).name if file != "-" else "",
                now=now,
            )
        body = backup_body(name, ns, storage, stored, comment)
        try:
            kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, cluster.BACKUPS, body)
        except Exception as e:
            into.delete(stored.prefix)
            raise CommandError(
                f"creating Backup {name} failed ({cluster.api_message(e)}); the uploaded objects were deleted"
            ) from e
        click.echo(f"backup.nightjar.dev/{name} created: {summary_text(stored)}")
        if no_wait:
            return
        done = follow(kube, cluster.BACKUPS, ns, name, Follower(f"backup {name}"), timeout=timeout)
    _finish("backup", name, done)


def _finish(kind: str, name: str, obj: dict[str, Any]) -> None:
    st = obj.get("status") or {}
    if st.get("phase") != "Completed":
        raise click.ClickException(f"{kind} {name} {st.get('phase')}: {st.get('message') or 'no message'}")
    click.echo(f"{kind}.nightjar.dev/{name} Completed: {st.get('message') or ''}".rstrip(": "))


# --- verify (a restore drill) ---------------------------------------------------------------------


@main.command()
@click.argument("backup")
@click.option("-n", "--namespace", help=_NS_HELP)
@click.option(
    "--scratch-secret",
    default="",
    help="Secret of the scratch PostgreSQL server the drill restores into (a database Secret's shape; "
    "its role must be allowed to create databases). Default: an ephemeral server the operator runs "
    "for the drill and deletes afterwards.",
)
@click.option("--name", help="Name of the Verification (default verify-<backup>-<yyyymmddhhmmss>).")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Follow the drill with a progress bar and exit 1 unless it Passed (for CI and runbooks).",
)
@click.option("--timeout", default=None, type=float, help="Seconds to wait at most (default: no limit).")
def verify(
    backup: str,
    namespace: str | None,
    scratch_secret: str,
    name: str | None,
    wait: bool,
    timeout: float | None,
) -> None:
    """Prove BACKUP restores: a restore drill (Verification) into a temporary database on a scratch
    server, every table checked (exact row counts when the backup recorded them), the files read
    back by sha256; then the temporary database is dropped. Prints the measured restore time."""
    from kubernetes.client.rest import ApiException

    from nightjar.constants import API_VERSION, GROUP, VERIFICATIONS, VERSION
    from nightjar.transfer import CommandError, cluster
    from nightjar.transfer.names import object_name
    from nightjar.transfer.progress import Follower
    from nightjar.transfer.resources import follow, restore_progress

    with _failures():
        kube = cluster.connect()
        ns = _namespace(namespace)
        b = cluster.get_backup(kube, ns, backup)
        phase = (b.get("status") or {}).get("phase")
        if phase != "Completed":
            raise CommandError(
                f'Backup "{backup}" is {phase or "not started yet"}: only a Completed backup can be verified'
            )
        name = name or object_name(f"verify-{backup}", _now())
        spec: dict[str, Any] = {"backupName": backup}
        if scratch_secret:  # else the operator runs an ephemeral scratch server
            spec["scratch"] = {"database": {"secretRef": {"name": scratch_secret}}}
        body = {
            "apiVersion": API_VERSION,
            "kind": "Verification",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
        try:
            kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, VERIFICATIONS, body)
        except ApiException as e:
            if e.status == 404 and "could not find the requested resource" in cluster.api_message(e):
                raise CommandError(
                    "this cluster has no Verification resource type: install Nightjar's CRDs "
                    "(verifications.nightjar.dev)"
                ) from e
            raise
        click.echo(f"verification.nightjar.dev/{name} created in {ns}: restore drill of Backup {backup}")
        if not wait:
            return
        done = follow(
            kube,
            VERIFICATIONS,
            ns,
            name,
            Follower(f"verify {name}"),
            timeout=timeout,
            progress=restore_progress,
            terminal=("Passed", "Failed"),
        )
    st = done.get("status") or {}
    if st.get("phase") != "Passed":
        raise click.ClickException(
            f"verification {name} {st.get('phase')}: {st.get('message') or 'no message'}"
        )
    click.echo(f"verification.nightjar.dev/{name} Passed: {st.get('message') or ''}".rstrip(": "))


# --- backup create / list ------------------------------------------------------------------------


@main.group("backup")
def backup_group() -> None:
    """Create and list Backups (what `kubectl apply` of a Backup does, as a command)."""


@backup_group.command("create")
@click.argument("name", required=False)
@click.option("--storage", required=True, help="The BackupStorage to keep the snapshot in.")
@click.option("--database-secret", required=True, help="Secret with the database connection details.")
@click.option("--files-claim", help="PersistentVolumeClaim with the app's files.")
@click.option("--files-path", help="Directory inside the claim (default its root).")
@click.option("--app-name", help="The app's workload (gives the model version).")
@click.option("--app-kind", type=click.Choice(["Deployment", "StatefulSet"]), help="Default Deployment.")
@click.option("--database-only", is_flag=True, help="Back up the database only.")
@click.option("--comment", default="", help="Shown in backup list and kubectl get backups.")
@click.option("-n", "--namespace", help=_NS_HELP)
@click.option(
    "--wait", is_flag=True, help="Follow the backup until it is Completed (exit 0) or Failed (exit 1)."
)
def backup_create(
    name: str | None,
    storage: str,
    database_secret: str,
    files_claim: str | None,
    files_path: str | None,
    app_name: str | None,
    app_kind: str | None,
    database_only: bool,
    comment: str,
    namespace: str | None,
    wait: bool,
) -> None:
    """Take an on-demand backup (NAME default: <app-name or backup>-<yyyymmddhhmmss>)."""
    from nightjar.constants import GROUP, VERSION
    from nightjar.transfer import cluster
    from nightjar.transfer.names import object_name
    from nightjar.transfer.progress import Follower
    from nightjar.transfer.resources import backup_body, follow, source_spec

    with _failures():
        ns = _namespace(namespace)
        source = source_spec(
            db_secret=database_secret,
            files_claim=files_claim,
            files_path=files_path,
            app_kind=app_kind,
            app_name=app_name,
        )
        name = name or object_name(app_name or "backup", _now())
        body = backup_body(
            name, ns, storage=storage, source=source, database_only=database_only, comment=comment
        )
        kube = cluster.connect()
        kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, cluster.BACKUPS, body)
        click.echo(f"backup.nightjar.dev/{name} created")
        if not wait:
            return
        done = follow(kube, cluster.BACKUPS, ns, name, Follower(f"backup {name}"))
    _finish("backup", name, done)


@backup_group.command("list")
@click.option("-n", "--namespace", help=_NS_HELP)
@click.option("-A", "--all-namespaces", is_flag=True, help="Backups of every namespace.")
def backup_list(namespace: str | None, all_namespaces: bool) -> None:
    """List Backups like `kubectl get backups`."""
    from nightjar.transfer import cluster
    from nightjar.transfer.resources import BACKUP_COLUMNS, backup_row, list_backups, table

    with _failures():
        ns = None if all_namespaces else _namespace(namespace)
        items = list_backups(cluster.connect(), ns)
    if not items:
        click.echo(f"No backups found in namespace {ns}." if ns else "No backups found.", err=True)
        return
    header = ["NAMESPACE", *BACKUP_COLUMNS] if ns is None else BACKUP_COLUMNS
    click.echo(table(header, [backup_row(b, ns is None) for b in items]))


@main.group("keys")
def keys_group() -> None:
    """Client-side encryption keys of a BackupStorage (spec.encryption.keySecretRef)."""


@keys_group.command("status")
@click.option("--storage", required=True, help="The BackupStorage whose keys to check.")
@click.option("-n", "--namespace", help=_NS_HELP)
def keys_status(storage: str, namespace: str | None) -> None:
    """Which key ids the storage's live snapshots still need, and which its key Secret holds.

    Remove a key from the Secret only when no live snapshot needs it; exit code 1 when a
    snapshot needs a key the Secret does not hold."""
    from nightjar.transfer import cluster
    from nightjar.transfer import keys as keysmod
    from nightjar.transfer.resources import table

    with _failures():
        ns = _namespace(namespace)
        kube = cluster.connect()
        st = keysmod.status(kube, ns, cluster.storage(kube, ns, storage), storage)
    if st.secret:
        click.echo(f"BackupStorage {storage}: key Secret {st.secret}, current key id {st.current}")
    else:
        click.echo(f"BackupStorage {storage}: no encryption configured")
    click.echo(
        f"{st.snapshots} live snapshots ({st.unencrypted} unencrypted)"
        + (f"; {len(st.unreadable)} manifests unreadable" if st.unreadable else "")
    )
    rows = st.rows()
    if rows:
        click.echo(table(["KEY ID", "IN SECRET", "CURRENT", "SNAPSHOTS", "ADVICE"], rows))
    for line in st.unreadable:
        click.echo(f"unreadable: {line}", err=True)
    if any(r[1] == "MISSING" for r in rows):
        sys.exit(1)


# --- restore -----------------------------------------------------------------------------------


@main.command()
@click.argument("backup")
@click.option(
    "--to", "to_namespace", required=True, help="Namespace to restore into (the Restore lives there)."
)
@click.option("--from-namespace", help="Namespace of the Backup (default: the current context's).")
@click.option("--database-only", is_flag=True, help="Restore the database only; leave the files as they are.")
@click.option("--no-stop-app", is_flag=True, help="Do not scale the app to 0 while restoring.")
@click.option("--database-secret", help="Target database Secret (default: the Backup's own source's).")
@click.option(
    "--files-claim", help="Target files PersistentVolumeClaim (default: the Backup's own source's)."
)
@click.option("--files-path", help="Directory inside --files-claim.")
@click.option("--app-kind", type=click.Choice(["Deployment", "StatefulSet"]), help="Kind of --app-name.")
@click.option("--app-name", help="Target app workload (default: the Backup's own source's).")
@click.option("--name", help="Name of the Restore (default restore-<backup>-<yyyymmddhhmmss>).")
@click.option("--no-wait", is_flag=True, help="Create the Restore and return.")
def restore(
    backup: str,
    to_namespace: str,
    from_namespace: str | None,
    database_only: bool,
    no_stop_app: bool,
    database_secret: str | None,
    files_claim: str | None,
    files_path: str | None,
    app_kind: str | None,
    app_name: str | None,
    name: str | None,
    no_wait: bool,
) -> None:
    """Restore a Completed backup into NAMESPACE's database (and files) and follow it.

    Exits 0 when the Restore is Completed, 1 when it Failed (with its message). What is not given
    on the command line comes from the Backup's own source: the same Secret, claim and app names,
    looked up in the target namespace.
    """
    from kubernetes.client.rest import ApiException

    from nightjar.constants import GROUP, VERSION
    from nightjar.transfer import CommandError, cluster
    from nightjar.transfer.names import object_name
    from nightjar.transfer.progress import Follower
    from nightjar.transfer.resources import (
        describe_target,
        follow,
        restore_body,
        restore_progress,
        restore_target,
    )

    with _failures():
        kube = cluster.connect()
        from_ns = _namespace(from_namespace)
        b = cluster.get_backup(kube, from_ns, backup)
        phase = (b.get("status") or {}).get("phase")
        if phase != "Completed":
            raise CommandError(
                f'Backup "{backup}" is {phase or "not started yet"}: only a Completed backup can be restored'
            )
        target = restore_target(
            b,
            to_namespace=to_namespace,
            db_secret=database_secret,
            files_claim=files_claim,
            files_path=files_path,
            app_kind=app_kind,
            app_name=app_name,
            database_only=database_only,
        )
        name = name or object_name(f"restore-{backup}", _now())
        body = restore_body(
            name,
            to_namespace,
            backup_name=backup,
            backup_namespace=from_ns,
            target=target,
            database_only=database_only,
            stop_app=not no_stop_app,
        )
        try:
            kube.custom.create_namespaced_custom_object(GROUP, VERSION, to_namespace, cluster.RESTORES, body)
        except ApiException as e:
            if e.status == 404 and "could not find the requested resource" in cluster.api_message(e):
                raise CommandError(
                    "this cluster has no Restore resource type: install Nightjar's CRDs "
                    "(restores.nightjar.dev)"
                ) from e
            raise
        click.echo(
            f"restore.nightjar.dev/{name} created in {to_namespace}: Backup {from_ns}/{backup} into "
            f"{describe_target(to_namespace, target)}"
        )
        if no_wait:
            return
        done = follow(
            kube, cluster.RESTORES, to_namespace, name, Follower(f"restore {name}"), progress=restore_progress
        )
    _finish("restore", name, done)
