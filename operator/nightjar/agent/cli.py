"""``nightjar agent`` subcommands. Secrets come from the environment (set by the Job through
``secretKeyRef``), never from arguments; the result goes to the termination message file."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from nightjar.domain.retention import parse_time
from nightjar.storage.crypto import KeyProblem, KeyRing
from nightjar.storage.objects import S3Target

#: A termination message is cut at 4096 bytes by the kubelet.
RESULT_LIMIT = 4000
#: A restore's exit code when it failed without changing anything for a cause that may pass
#: (EX_TEMPFAIL): the restore Job gives it a new Pod (see ``nightjar.jobs.build_restore_job``).
RETRY_EXIT = 75


def write_result(path: str, result: dict[str, Any]) -> None:
    text = json.dumps(result, separators=(",", ":"))
    if len(text) > RESULT_LIMIT and "error" in result:
        text = json.dumps({"error": str(result["error"])[: RESULT_LIMIT - 20]})
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        click.echo(f"could not write the result to {path}: {e}", err=True)
    click.echo(text)


def _env(name: str) -> str:
    return os.environ.get(name, "")


def _storage(o: dict[str, Any], role: str = "") -> S3Target:
    """The storage the options name (``role`` "replica": the ``--replica-*`` ones), its key pair
    from the environment the Job filled from the Secret."""
    opt = f"{role}_" if role else ""
    env = "NIGHTJAR_REPLICA_S3" if role else "NIGHTJAR_S3"
    return S3Target(
        endpoint=o[f"{opt}endpoint"],
        bucket=o[f"{opt}bucket"],
        region=o[f"{opt}region"],
        access_key=_env(f"{env}_ACCESS_KEY_ID"),
        secret_key=_env(f"{env}_SECRET_ACCESS_KEY"),
        prefix=o[f"{opt}prefix"],
        ca_bundle=o[f"{opt}ca_file"],
        insecure=o[f"{opt}insecure"],
    )


@click.command("backup")
@click.option("--endpoint", required=True, help="S3 endpoint of the BackupStorage.")
@click.option("--bucket", required=True)
@click.option("--region", default="us-east-1", show_default=True)
@click.option("--prefix", default="")
@click.option("--ca-file", default=None, help="PEM CA bundle for the endpoint.")
@click.option("--insecure", is_flag=True, help="Do not verify the endpoint's certificate.")
@click.option("--lock-mode", type=click.Choice(["None", "Governance", "Compliance"]), default="None")
@click.option("--namespace", required=True)
@click.option("--backup-name", required=True)
@click.option("--backup-uid", required=True)
@click.option("--type", "backup_type", default="OnDemand")
@click.option("--source-id", required=True)
@click.option("--attempt", required=True, help="Unique id of this attempt (the Pod's uid).")
@click.option("--contents", type=click.Choice(["Full", "DatabaseOnly"]), default="Full")
@click.option("--expires", required=True, help="RFC 3339 expiry (Object Lock retention).")
@click.option("--files-dir", type=click.Path(path_type=Path), default=None)
@click.option("--files-s3-endpoint", default=None)
@click.option("--files-s3-bucket", default=None)
@click.option("--files-s3-prefix", default="")
@click.option("--files-s3-region", default="us-east-1")
@click.option("--previous-manifest", default="")
@click.option("--model-version", default="")
@click.option(
    "--record",
    default="",
    help="JSON: the Backup's spec and labels, kept in the manifest so the Backup can be re-created "
    "from the bucket (storage sync).",
)
@click.option(
    "--keys-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The encryption key Secret, mounted (files key-<id> and current): encrypt everything stored.",
)
@click.option("--compression-level", type=click.IntRange(1, 19), default=3, show_default=True)
@click.option(
    "--row-counts",
    is_flag=True,
    help="Count each table's rows in the dump's snapshot into the manifest (what a restore drill checks).",
)
@click.option(
    "--db-wait-seconds",
    type=click.FloatRange(0, 86400),
    default=300.0,
    show_default=True,
    help="How long to wait for a database or bucket that does not answer (restarting, failing over) "
    "before failing.",
)
@click.option("--result-file", default="/dev/termination-log", show_default=True)
def backup_cmd(**o: Any) -> None:
    """Take one snapshot: pg_dump plus files, into the bucket; result to --result-file."""
    from nightjar.agent.backup import BackupFailed, BackupRequest, DatabaseConn, run_backup

    started = time.monotonic()
    try:
        storage = _storage(o)
        if not storage.access_key or not storage.secret_key:
            raise BackupFailed("storage: the credentials Secret gave no access key pair")
        files_s3 = _files_s3(o)
        req = BackupRequest(
            storage=storage,
            namespace=o["namespace"],
            backup_name=o["backup_name"],
            backup_uid=o["backup_uid"],
            backup_type=o["backup_type"],
            source=o["source_id"],
            attempt=o["attempt"],
            contents=o["contents"],
            expires=parse_time(o["expires"]),
            lock_mode=o["lock_mode"],
            db=DatabaseConn.from_env(dict(os.environ)),
            files_dir=o["files_dir"],
            files_s3=files_s3,
            previous_manifest=o["previous_manifest"],
            model_version=o["model_version"],
            record=_record(o["record"]),
            pg_bindir=_env("NIGHTJAR_PG_BINDIR"),
            pg_root=_env("NIGHTJAR_PG_ROOT"),
            keyring=_keyring(o["keys_dir"], BackupFailed),
            compression_level=o["compression_level"],
            row_counts=o["row_counts"],
            db_wait_seconds=o["db_wait_seconds"],
        )
        result = run_backup(req)
    except BackupFailed as e:
        write_result(o["result_file"], {"error": str(e)})
        sys.exit(1)
    except Exception as e:  # an unexpected failure still ends with a message, not a traceback only
        write_result(o["result_file"], {"error": f"unexpected {type(e).__name__}: {e}"})
        raise
    result["durationSeconds"] = round(time.monotonic() - started, 3)
    write_result(o["result_file"], result)


def _record(raw: str) -> dict[str, Any]:
    from nightjar.agent.backup import BackupFailed

    if not raw:
        return {}
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise BackupFailed(f"--record is not JSON: {e}") from e
    if not isinstance(record, dict):
        raise BackupFailed("--record is not a JSON object")
    return record


def _keyring(path: Path | None, failure: Any) -> KeyRing | None:
    """The key ring from the mounted key Secret (its name in NIGHTJAR_KEY_SECRET, for messages)."""
    if path is None:
        return None
    try:
        return KeyRing.from_dir(path, _env("NIGHTJAR_KEY_SECRET") or path.name)
    except KeyProblem as e:
        raise failure(f"encryption: {e}") from e


def _files_s3(o: dict[str, Any]) -> S3Target | None:
    if not o["files_s3_bucket"]:
        return None
    return S3Target(
        endpoint=o["files_s3_endpoint"],
        bucket=o["files_s3_bucket"],
        region=o["files_s3_region"],
        prefix=o["files_s3_prefix"],
        access_key=_env("NIGHTJAR_FILES_S3_ACCESS_KEY_ID"),
        secret_key=_env("NIGHTJAR_FILES_S3_SECRET_ACCESS_KEY"),
    )


@click.command("restore")
@click.option("--endpoint", required=True, help="S3 endpoint of the BackupStorage.")
@click.option("--bucket", required=True)
@click.option("--region", default="us-east-1", show_default=True)
@click.option("--prefix", default="")
@click.option("--ca-file", default=None, help="PEM CA bundle for the endpoint.")
@click.option("--insecure", is_flag=True, help="Do not verify the endpoint's certificate.")
@click.option("--manifest-key", required=True, help="Key of the snapshot's manifest.")
@click.option("--manifest-sha256", default="", help="sha256 the manifest must have.")
@click.option("--contents", type=click.Choice(["Full", "DatabaseOnly"]), default="Full")
@click.option("--files-dir", type=click.Path(path_type=Path), default=None)
@click.option("--files-s3-endpoint", default=None)
@click.option("--files-s3-bucket", default=None)
@click.option("--files-s3-prefix", default="")
@click.option("--files-s3-region", default="us-east-1")
@click.option("--restore-namespace", default="", help="The Restore to report progress to.")
@click.option("--restore-name", default="")
@click.option("--api-dir", default="", help="Directory with the service account token and ca.crt.")
@click.option("--presigned-file", default="", help="JSON of presigned URLs (restores across namespaces).")
@click.option(
    "--primary-prefix",
    default=None,
    help="Reading a replica: the primary storage's prefix, which the manifest's keys carry.",
)
@click.option(
    "--keys-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The encryption key Secret, mounted: opens an encrypted snapshot.",
)
@click.option(
    "--db-wait-seconds",
    type=click.FloatRange(0, 86400),
    default=300.0,
    show_default=True,
    help="How long to wait for a database or bucket that does not answer (restarting, failing over) "
    "before failing.",
)
@click.option("--result-file", default="/dev/termination-log", show_default=True)
def restore_cmd(**o: Any) -> None:
    """Restore one snapshot into a database (and files); result to --result-file."""
    from nightjar.agent.backup import DatabaseConn
    from nightjar.agent.progress import Reporter
    from nightjar.agent.restore import UNCHANGED, RestoreFailed, RestoreRequest, run_restore

    started = time.monotonic()
    try:
        storage = _storage(o)
        s3 = None
        data_keys: dict[str, bytes] = {}
        if o["presigned_file"]:
            from nightjar.storage.snapshot import PresignedReader, load_data_keys

            with open(o["presigned_file"], encoding="utf-8") as f:
                handed = json.load(f)
            s3 = PresignedReader(handed["urls"], o["ca_file"], o["insecure"])
            data_keys = load_data_keys(handed.get("keys") or {})
        elif not storage.access_key or not storage.secret_key:
            raise RestoreFailed("storage: the credentials Secret gave no access key pair", UNCHANGED)
        req = RestoreRequest(
            s3=s3,
            storage=storage,
            manifest_key=o["manifest_key"],
            manifest_sha256=o["manifest_sha256"],
            contents=o["contents"],
            db=DatabaseConn.from_env(dict(os.environ)),
            files_dir=o["files_dir"],
            files_s3=_files_s3(o),
            pg_bindir=_env("NIGHTJAR_PG_BINDIR"),
            pg_root=_env("NIGHTJAR_PG_ROOT"),
            reporter=Reporter(o["restore_namespace"], o["restore_name"], o["api_dir"]),
            primary_prefix=o["primary_prefix"],
            keyring=_keyring(o["keys_dir"], lambda m: RestoreFailed(m + "; nothing was restored", UNCHANGED)),
            data_keys=data_keys,
            db_wait_seconds=o["db_wait_seconds"],
        )
        result = run_restore(req)
    except RestoreFailed as e:
        write_result(o["result_file"], {"error": str(e), "targetState": e.target_state})
        # Nothing changed and the cause may pass: the Job runs it again in a new Pod (its pod
        # failure policy ends the Job at once on exit code 1 only).
        sys.exit(RETRY_EXIT if e.retry_safe else 1)
    except Exception as e:  # unexpected: the target's state is not known
        write_result(
            o["result_file"], {"error": f"unexpected {type(e).__name__}: {e}", "targetState": "Unknown"}
        )
        raise
    result["durationSeconds"] = round(time.monotonic() - started, 3)
    write_result(o["result_file"], result)


@click.command("replicate")
@click.option("--endpoint", required=True, help="S3 endpoint of the primary BackupStorage.")
@click.option("--bucket", required=True)
@click.option("--region", default="us-east-1", show_default=True)
@click.option("--prefix", default="", help="The primary's prefix, which the manifest's keys carry.")
@click.option("--ca-file", default=None)
@click.option("--insecure", is_flag=True)
@click.option("--replica-endpoint", required=True, help="S3 endpoint of the replica BackupStorage.")
@click.option("--replica-bucket", required=True)
@click.option("--replica-region", default="us-east-1", show_default=True)
@click.option("--replica-prefix", default="")
@click.option("--replica-ca-file", default=None)
@click.option("--replica-insecure", is_flag=True)
@click.option("--replica-lock-mode", type=click.Choice(["None", "Governance", "Compliance"]), default="None")
@click.option("--manifest-key", required=True, help="The snapshot's manifest in the primary.")
@click.option("--manifest-sha256", default="", help="sha256 the manifest must have.")
@click.option("--retain-until", default="", help="RFC 3339: Object Lock retention in the replica.")
@click.option("--result-file", default="/dev/termination-log", show_default=True)
def replicate_cmd(**o: Any) -> None:
    """Copy one snapshot from its primary storage into a replica, streamed, every object verified."""
    from nightjar.storage import layout
    from nightjar.storage.errors import IntegrityError
    from nightjar.storage.objects import Lock, StorageError
    from nightjar.storage.replicate import replicate_snapshot

    started = time.monotonic()
    src_target, dst_target = _storage(o), _storage(o, role="replica")
    stage = "primary"
    try:
        src = src_target.store()
        src.check()
        stage = "replica"
        dst = dst_target.store()
        dst.check()
        stage = "copy"
        until = parse_time(o["retain_until"]) if o["retain_until"] else None
        report = replicate_snapshot(
            src,
            layout.normalize_prefix(o["prefix"]),
            dst,
            layout.normalize_prefix(o["replica_prefix"]),
            o["manifest_key"],
            o["manifest_sha256"],
            Lock.of(o["replica_lock_mode"], until),
        )
    except IntegrityError as e:
        write_result(o["result_file"], {"error": f"verification failed: {e}"})
        sys.exit(1)
    except StorageError as e:
        write_result(o["result_file"], {"error": f"storage ({stage}): {e}"})
        sys.exit(1)
    result = report.as_dict()
    result["durationSeconds"] = round(time.monotonic() - started, 3)
    write_result(o["result_file"], result)


@click.command("verify")
@click.option("--endpoint", required=True, help="S3 endpoint of the BackupStorage.")
@click.option("--bucket", required=True)
@click.option("--region", default="us-east-1", show_default=True)
@click.option("--prefix", default="")
@click.option("--ca-file", default=None, help="PEM CA bundle for the endpoint.")
@click.option("--insecure", is_flag=True, help="Do not verify the endpoint's certificate.")
@click.option("--manifest-key", required=True, help="Key of the snapshot's manifest.")
@click.option("--manifest-sha256", default="", help="sha256 the manifest must have.")
@click.option(
    "--drill-id",
    required=True,
    help="Names the temporary database nightjar_verify_<id> (letters and digits of it; the Pod's uid).",
)
@click.option("--database-only", is_flag=True, help="Do not read the stored files back.")
@click.option(
    "--keys-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The encryption key Secret, mounted: opens an encrypted snapshot.",
)
@click.option("--verification-namespace", default="", help="The Verification to report progress to.")
@click.option("--verification-name", default="")
@click.option("--api-dir", default="", help="Directory with the service account token and ca.crt.")
@click.option("--result-file", default="/dev/termination-log", show_default=True)
def verify_cmd(**o: Any) -> None:
    """Restore drill: restore the snapshot's database into a temporary database on the scratch
    server (NIGHTJAR_SCRATCH_* env), check every table (exact row counts when recorded), drop it,
    read every stored file back by sha256; result to --result-file."""
    from nightjar.agent.backup import DatabaseConn
    from nightjar.agent.progress import Reporter
    from nightjar.agent.verify import DrillFailed, VerifyFailed, VerifyRequest, run_verify

    started = time.monotonic()
    measured: dict[str, Any] = {}

    def stopped(signum: int, _frame: Any) -> None:
        # Pod deleted or deadline reached: the kubelet sends SIGTERM, then SIGKILL after the grace
        # period. Raised here (once: a second one must not interrupt the cleanup), the drill's
        # finally blocks run: the temporary database is dropped.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise VerifyFailed(f"the drill was stopped ({signal.Signals(signum).name}) before it ended")

    signal.signal(signal.SIGTERM, stopped)
    try:
        storage = _storage(o)
        if not storage.access_key or not storage.secret_key:
            raise DrillFailed("storage: the credentials Secret gave no access key pair", {})
        req = VerifyRequest(
            storage=storage,
            manifest_key=o["manifest_key"],
            manifest_sha256=o["manifest_sha256"],
            scratch=DatabaseConn.from_env(dict(os.environ), "NIGHTJAR_SCRATCH"),
            scratch_secret=_env("NIGHTJAR_SCRATCH_SECRET") or "scratch",
            drill_id=o["drill_id"],
            pg_bindir=_env("NIGHTJAR_PG_BINDIR"),
            pg_root=_env("NIGHTJAR_PG_ROOT"),
            keyring=_keyring(o["keys_dir"], VerifyFailed),
            reporter=Reporter(
                o["verification_namespace"], o["verification_name"], o["api_dir"], resource="verifications"
            ),
            check_files=not o["database_only"],
        )
        result = run_verify(req)
    except VerifyFailed as e:
        _failed(o, str(e), measured, started)
    except DrillFailed as e:
        _failed(o, str(e), e.measured, started)
    except Exception as e:  # unexpected: still a message, not a traceback only
        write_result(o["result_file"], {"passed": False, "error": f"unexpected {type(e).__name__}: {e}"})
        raise
    result["durationSeconds"] = round(time.monotonic() - started, 3)
    write_result(o["result_file"], result)


@click.command("verify-cleanup")
@click.option("--drill-id", "drill_ids", multiple=True, required=True, help="A drill whose database to drop.")
@click.option("--result-file", default="/dev/termination-log", show_default=True)
def verify_cleanup_cmd(drill_ids: tuple[str, ...], result_file: str) -> None:
    """Drop the temporary databases (nightjar_verify_<id>) of drills that ended without dropping
    their own, on the scratch server of NIGHTJAR_SCRATCH_* env; nothing else is dropped."""
    from nightjar.agent.backup import DatabaseConn
    from nightjar.agent.verify import VerifyFailed, VerifyRequest, drop_leftovers

    req = VerifyRequest(
        storage=S3Target("", "", "", "", ""),
        manifest_key="",
        manifest_sha256="",
        scratch=DatabaseConn.from_env(dict(os.environ), "NIGHTJAR_SCRATCH"),
        scratch_secret=_env("NIGHTJAR_SCRATCH_SECRET") or "scratch",
        pg_bindir=_env("NIGHTJAR_PG_BINDIR"),
        pg_root=_env("NIGHTJAR_PG_ROOT"),
    )
    try:
        result = drop_leftovers(req, list(drill_ids))
    except VerifyFailed as e:
        write_result(result_file, {"error": str(e)})
        sys.exit(1)
    write_result(result_file, result)


def _failed(o: dict[str, Any], message: str, measured: dict[str, Any], started: float) -> None:
    result = {"passed": False, "error": message, **measured}
    result["durationSeconds"] = round(time.monotonic() - started, 3)
    write_result(o["result_file"], result)
    sys.exit(1)


def register(group: click.Group) -> None:
    group.add_command(backup_cmd)
    group.add_command(restore_cmd)
    group.add_command(replicate_cmd)
    group.add_command(verify_cmd)
    group.add_command(verify_cleanup_cmd)
