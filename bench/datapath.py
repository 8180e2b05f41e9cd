"""Benchmark: Nightjar's data path side by side with the tools a user would pick instead.

Same data, same MinIO (the bench stack's plain bucket), one run, the two sides interleaved
(A, B, then B, A in the next round) because the machine is small and shared:

* database: ``nightjar agent backup --contents DatabaseOnly`` of a pgbench database against
  ``pg_dump -Fc -O -x > /dev/null`` (time) and ``pg_dump -Fc -Z0 -O -x | restic backup --stdin``
  (time and stored bytes); then three "nights" (the newest 1 % of pgbench_accounts updated,
  another backup in the same chain / repository each night): bytes each night adds;
* files: a Mendix-like tree of many small, not trivially compressible files against restic:
  first backup, unchanged second backup, restore into an empty directory; stored bytes;
* memory: the agent's peak RSS in every run (restic's alongside), and optionally a first backup
  of 1,000,000 files;
* encryption: when the agent offers it, first backups with and without, interleaved.

Prints min and median of each measurement over the rounds, the ratios nightjar/reference and
PASS/FAIL against each target, and writes the same to ``$NIGHTJAR_STATE_DIR/datapath.json``.
A missed target is a measurement (exit 0); only a broken run exits non-zero.

    BENCH=datapath make bench
    BENCH_PG_SCALE=5 BENCH_FILES=5000 BENCH_ROUNDS=1 BENCH=datapath make bench   # quick
    BENCH_MILLION=1 BENCH=datapath make bench     # adds the 1,000,000-file memory run

Knobs: BENCH_ROUNDS (3), BENCH_PG_SCALE (100, about 1.5 GB), BENCH_NIGHTS (3), BENCH_FILES
(100000), BENCH_FILE_SIZE (4096), BENCH_MILLION (0), BENCH_MILLION_FILES (1000000),
BENCH_MILLION_SIZE (1024). The method is described in docs/benchmarks.md ("Data path").
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from tests.support import stack_env

from bench.measure import (
    CommandFailed,
    Measured,
    count_files,
    delete_prefix,
    run_measured,
    run_pipeline,
    stored_bytes,
    summary,
)

MB = 1e6
MIB = 1024 * 1024
RESTIC_PASSWORD = "nightjar-datapath-bench"  # noqa: S105 - a throwaway repository's password
PG_DB = "bench_pgbench"
TINY_DB = "bench_tiny"
TINY_RESTORE_DB = "bench_tiny_restore"
# The agent options this bench knows how to fill; a new required one stops the bench early.
KNOWN_BACKUP_OPTIONS = {
    "--endpoint",
    "--bucket",
    "--prefix",
    "--namespace",
    "--backup-name",
    "--backup-uid",
    "--source-id",
    "--attempt",
    "--expires",
    "--contents",
    "--files-dir",
    "--previous-manifest",
    "--result-file",
}
UPDATE_NEWEST_PERCENT = (
    "UPDATE pgbench_accounts SET abalance = abalance + 1 "
    "WHERE aid > (SELECT max(aid) - max(aid) / 100 FROM pgbench_accounts)"
)

# Bytes of English-like text: letters at roughly their English frequencies, spaces and some
# punctuation. Drawn independently, they compress to ~60 % (gzip, zstd): not trivially
# compressible, not incompressible, and no two files share content.
_LETTER_WEIGHTS = {
    " ": 41, "e": 26, "t": 19, "a": 17, "o": 15, "i": 14, "n": 15, "s": 13, "h": 12, "r": 12,
    "d": 9, "l": 8, "c": 6, "u": 6, "m": 5, "w": 5, "f": 5, "g": 4, "y": 4, "p": 4,
    "b": 3, "v": 2, "k": 2, ".": 2, ",": 2, "j": 1, "x": 1, "q": 1, "z": 1, "\n": 1,
}  # fmt: skip
_TEXT_TABLE = "".join(c * w for c, w in _LETTER_WEIGHTS.items()).encode()
assert len(_TEXT_TABLE) == 256  # noqa: S101 - one byte maps to one character


_TO_TEXT = bytes.maketrans(bytes(range(256)), _TEXT_TABLE)


def make_text_tree(root: Path, n: int, size: int) -> None:
    """Mendix-style tree/ab/cd/<uuid> files of ``size`` bytes of text-like content, the same
    bytes for the same (n, size) on every run."""
    rng = random.Random(f"nightjar-datapath-{size}")  # noqa: S311 - test data, not secrets
    made: set[Path] = set()
    for i in range(n):
        u = uuid.uuid5(uuid.NAMESPACE_OID, str(i)).hex
        d = root / u[:2] / u[2:4]
        if d not in made:
            d.mkdir(parents=True, exist_ok=True)
            made.add(d)
        (d / u).write_bytes(rng.randbytes(size).translate(_TO_TEXT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the agent's options, read from its --help ---------------------------------------------------


def option_blocks(help_text: str) -> dict[str, str]:
    """Each option of a click ``--help``: its long name -> its text (wrapped lines joined)."""
    blocks: dict[str, str] = {}
    cur = ""
    in_options = False
    for line in help_text.splitlines():
        if line.strip() == "Options:":
            in_options = True
            continue
        if not in_options:
            continue
        if re.match(r"^ {1,4}-", line):
            head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            names = re.findall(r"--[\w-]+", head)
            cur = names[-1] if names else ""
            if cur:
                blocks[cur] = line.strip()
        elif cur and line.startswith(" "):
            blocks[cur] += " " + line.strip()
    return blocks


@dataclass
class Encryption:
    args: list[str]
    how: str


def encryption_from_help(blocks: dict[str, str], workdir: Path) -> tuple[Encryption | None, str]:
    """The backup arguments that turn encryption on, or None and why not."""
    if "--keys-dir" in blocks:
        keys = workdir / "keys"
        keys.mkdir(mode=0o700)
        key_id = "datapath1"
        (keys / "current").write_text(key_id + "\n")
        (keys / f"key-{key_id}").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        for f in keys.iterdir():
            f.chmod(0o600)
        return Encryption(["--keys-dir", str(keys)], "--keys-dir (key id 'datapath1', 32 random bytes)"), ""
    offered = sorted(
        name for name, text in blocks.items() if re.search(r"encrypt|cipher|\bkeys?\b", text, re.IGNORECASE)
    )
    if offered:
        return (
            None,
            f"encryption: the agent offers {', '.join(offered)}, which this bench cannot drive; skipped",
        )
    return None, "encryption: not supported by this agent"


# --- the measurements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    title: str
    unit: str  # "s", "MB" or "MiB"
    a: str  # sample key of nightjar's figure
    b: str | None = None  # sample key of the reference's figure
    max_ratio: float | None = None  # target: median(a) / median(b) <= max_ratio
    max_value: float | None = None  # target: median(a) < max_value (in unit)

    def target(self) -> str:
        if self.max_ratio is not None:
            return f"<= {self.max_ratio:g}"
        if self.max_value is not None:
            return f"< {self.max_value:g} {self.unit}"
        return ""


_SCALE = {"s": 1.0, "MB": MB, "MiB": MIB}
AGENT_MAIN = "import sys\nfrom nightjar.cli import main\nsys.argv[0] = 'nightjar'\nsys.exit(main())\n"


class Bench:
    def __init__(self) -> None:
        self.env = stack_env()
        self.rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
        self.pg_scale = int(os.environ.get("BENCH_PG_SCALE", "100"))
        self.nights = int(os.environ.get("BENCH_NIGHTS", "3"))
        self.nfiles = int(os.environ.get("BENCH_FILES", "100000"))
        self.file_size = int(os.environ.get("BENCH_FILE_SIZE", "4096"))
        self.million = os.environ.get("BENCH_MILLION", "0") == "1"
        self.million_files = int(os.environ.get("BENCH_MILLION_FILES", "1000000"))
        self.million_size = int(os.environ.get("BENCH_MILLION_SIZE", "1024"))
        self.endpoint = self.env["NIGHTJAR_S3_ENDPOINT"]
        self.bucket = self.env["NIGHTJAR_S3_BUCKET_PLAIN"]
        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["NIGHTJAR_S3_ACCESS_KEY"],
            aws_secret_access_key=self.env["NIGHTJAR_S3_SECRET_KEY"],
            region_name=self.env.get("NIGHTJAR_S3_REGION", "us-east-1"),
            config=Config(s3={"addressing_style": "path"}),
        )
        self.top = f"datapath-{uuid.uuid4().hex[:8]}"
        self.work = Path(tempfile.mkdtemp(prefix="nightjar-datapath-"))
        # The agent runs from a copy of operator/nightjar taken at the start (PYTHONPATH wins over
        # the editable install): the tree may be edited while the bench runs for the better part
        # of an hour, and every measured run must be of the same code.
        self.agent_dir = self.work / "agent"
        self.agent = [sys.executable, "-c", AGENT_MAIN]
        self.bindir = Path(self.env["NIGHTJAR_PG_BINDIR"])
        self.restic_bin = shutil.which("restic") or "restic"
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.info: dict[str, Any] = {}
        self.encryption: Encryption | None = None
        self.serial = 0

    # --- environments -------------------------------------------------------------------------

    def pg_env(self, db: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),  # noqa: S108 - only a fallback
            "PGHOST": "127.0.0.1",
            "PGPORT": self.env["NIGHTJAR_PG_PORT"],
            "PGUSER": self.env.get("NIGHTJAR_PG_USER", "postgres"),
            "PGPASSWORD": self.env["NIGHTJAR_PG_PASSWORD"],
            "PGDATABASE": db,
        }

    def agent_env(self, db: str) -> dict[str, str]:
        return {
            **os.environ,
            "NIGHTJAR_S3_ACCESS_KEY_ID": self.env["NIGHTJAR_S3_ACCESS_KEY"],
            "NIGHTJAR_S3_SECRET_ACCESS_KEY": self.env["NIGHTJAR_S3_SECRET_KEY"],
            "NIGHTJAR_DB_HOST": "127.0.0.1",
            "NIGHTJAR_DB_PORT": self.env["NIGHTJAR_PG_PORT"],
            "NIGHTJAR_DB_NAME": db,
            "NIGHTJAR_DB_USER": self.env.get("NIGHTJAR_PG_USER", "postgres"),
            "NIGHTJAR_DB_PASSWORD": self.env["NIGHTJAR_PG_PASSWORD"],
            "NIGHTJAR_PG_BINDIR": str(self.bindir),
            "PYTHONPATH": str(self.agent_dir),
        }

    def restic_env(self, repo: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),  # noqa: S108 - only a fallback
            "RESTIC_REPOSITORY": f"s3:{self.endpoint}/{self.bucket}/{repo}",
            "RESTIC_PASSWORD": RESTIC_PASSWORD,
            "RESTIC_CACHE_DIR": str(self.work / "restic-cache"),
            "AWS_ACCESS_KEY_ID": self.env["NIGHTJAR_S3_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": self.env["NIGHTJAR_S3_SECRET_KEY"],
        }

    # --- tools --------------------------------------------------------------------------------

    def psql(self, db: str, sql: str) -> str:
        out = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql],
            env=self.pg_env(db),
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise CommandFailed(f"psql {sql[:60]!r}: {out.stderr.strip()}")
        return out.stdout.strip()

    def stored(self, prefix: str) -> int:
        return stored_bytes(self.s3, self.bucket, prefix + "/")

    def listing(self, prefix: str) -> dict[str, int]:
        """Every object under ``prefix``/ with its size (to say what a night added)."""
        out: dict[str, int] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix + "/"
        ):
            out.update({o["Key"]: int(o["Size"]) for o in page.get("Contents", [])})
        return out

    def nightjar_backup(
        self,
        prefix: str,
        source: str,
        db: str,
        files: Path | None = None,
        previous: str = "",
        enc: bool = False,
    ) -> tuple[dict[str, Any], Measured]:
        self.serial += 1
        uid = f"{source}-{self.serial}-{uuid.uuid4().hex[:6]}"
        result_file = self.work / f"result-{uid}.json"
        args = [*self.agent, "agent", "backup", "--endpoint", self.endpoint, "--bucket", self.bucket]
        args += ["--prefix", prefix, "--namespace", "bench", "--backup-name", uid, "--backup-uid", uid]
        args += ["--source-id", source, "--attempt", f"a-{uid}", "--expires", "2030-01-01T00:00:00Z"]
        args += ["--contents", "Full" if files is not None else "DatabaseOnly"]
        args += ["--result-file", str(result_file)]
        if files is not None:
            args += ["--files-dir", str(files)]
        if previous:
            args += ["--previous-manifest", previous]
        if enc:
            assert self.encryption is not None  # noqa: S101 - only called when offered
            args += self.encryption.args
        m = run_measured(args, self.agent_env(db))
        text = result_file.read_text() if result_file.exists() else m.stdout.strip().splitlines()[-1]
        result_file.unlink(missing_ok=True)
        result: dict[str, Any] = json.loads(text)
        return result, m

    def nightjar_restore(self, prefix: str, backup: dict[str, Any], files: Path | None) -> Measured:
        result_file = self.work / f"restore-{uuid.uuid4().hex[:6]}.json"
        args = [*self.agent, "agent", "restore", "--endpoint", self.endpoint, "--bucket", self.bucket]
        args += ["--prefix", prefix, "--manifest-key", backup["manifestKey"]]
        if backup.get("manifestSha256"):
            args += ["--manifest-sha256", backup["manifestSha256"]]
        args += ["--contents", "Full" if files is not None else "DatabaseOnly"]
        args += ["--result-file", str(result_file)]
        if files is not None:
            args += ["--files-dir", str(files)]
        m = run_measured(args, self.agent_env(TINY_RESTORE_DB))
        result_file.unlink(missing_ok=True)
        return m

    def restic(self, repo: str, *args: str) -> Measured:
        return run_measured([self.restic_bin, *args], self.restic_env(repo))

    def restic_init(self, repo: str) -> None:
        self.restic(repo, "init", "-q")
        if "restic_repository_version" not in self.info:
            config = json.loads(self.restic(repo, "cat", "config").stdout)
            self.info["restic_repository_version"] = config.get("version")

    def restic_dump(self, repo: str) -> Measured:
        dump = [str(self.bindir / "pg_dump"), "-Fc", "-Z0", "-O", "-x", "--no-password"]
        backup = [
            self.restic_bin,
            "backup",
            "-q",
            "--host",
            "bench",
            "--stdin",
            "--stdin-filename",
            "db.dump",
        ]
        return run_pipeline(dump, self.pg_env(PG_DB), backup, self.restic_env(repo))

    def rec(self, key: str, value: float) -> None:
        self.samples[key].append(value)

    def interleave(self, turn: int, ops: list[tuple[str, Callable[[], None]]]) -> None:
        """Run ``ops`` in order rotated by ``turn`` (A, B in one round, B, A in the next), each
        after a sync so one tool's write-back does not land in the other's time."""
        k = turn % len(ops)
        for name, op in ops[k:] + ops[:k]:
            os.sync()
            t0 = time.monotonic()
            op()
            log(f"  {name}: {time.monotonic() - t0:.1f} s")

    # --- setup --------------------------------------------------------------------------------

    def copy_agent(self) -> None:
        src = Path(__file__).resolve().parents[1] / "operator" / "nightjar"
        commit = _git_commit()
        shutil.copytree(src, self.agent_dir / "nightjar", ignore=shutil.ignore_patterns("__pycache__"))
        digest = hashlib.sha256()
        for f in sorted((self.agent_dir / "nightjar").rglob("*.py")):
            digest.update(f"{f.relative_to(self.agent_dir)}\0".encode() + f.read_bytes() + b"\0")
        self.info["agent"] = {"commit": commit, "sourceSha256": digest.hexdigest()}
        where = subprocess.run(
            [sys.executable, "-c", "import nightjar; print(nightjar.__file__)"],
            env=self.agent_env(TINY_DB),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not where.startswith(str(self.agent_dir)):
            raise RuntimeError(f"the agent would import nightjar from {where}, not from the copy")
        log(f"agent: a copy of operator/nightjar at {commit} (sources sha256 {digest.hexdigest()[:12]})")

    def check_agent(self) -> None:
        help_text = subprocess.run(
            [*self.agent, "agent", "backup", "--help"],
            env=self.agent_env(TINY_DB),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        blocks = option_blocks(help_text)
        required = sorted(n for n, t in blocks.items() if "[required]" in t)
        unknown = [n for n in required if n not in KNOWN_BACKUP_OPTIONS]
        if unknown:
            raise RuntimeError(f"nightjar agent backup now requires {', '.join(unknown)}: teach the bench")
        self.encryption, why = encryption_from_help(blocks, self.work)
        self.info["agent_backup_options"] = sorted(blocks)
        self.info["encryption"] = self.encryption.how if self.encryption else why
        print(f"encryption: {self.encryption.how}" if self.encryption else why, flush=True)

    def ensure_restic(self) -> None:
        if shutil.which("restic") is None:
            log("restic is not installed: apt-get install restic")
            sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
            subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "restic"], check=True)
            self.restic_bin = shutil.which("restic") or "restic"
        version = subprocess.run([self.restic_bin, "version"], capture_output=True, text=True, check=True)
        self.info["restic"] = version.stdout.strip()

    def setup_databases(self) -> None:
        for db in (PG_DB, TINY_DB, TINY_RESTORE_DB):
            self.psql("postgres", f'DROP DATABASE IF EXISTS "{db}"')
            self.psql("postgres", f'CREATE DATABASE "{db}"')
        self.psql(
            TINY_DB, "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100) g"
        )
        log(f"pgbench -i -s {self.pg_scale}")
        t0 = time.monotonic()
        subprocess.run(
            [str(self.bindir / "pgbench"), "-i", "-q", "-s", str(self.pg_scale)],
            env=self.pg_env(PG_DB),
            capture_output=True,
            check=True,
        )
        self.psql(PG_DB, "CHECKPOINT")
        size = int(self.psql(PG_DB, f"SELECT pg_database_size('{PG_DB}')"))
        self.info["pg_database_bytes"] = size
        self.info["pg_server"] = self.psql(PG_DB, "SHOW server_version")
        log(f"database: {size / MB:.0f} MB after {time.monotonic() - t0:.0f} s")

    # --- rounds -------------------------------------------------------------------------------

    def database_round(self, r: int) -> None:
        nj, rs, nje = (f"{self.top}/r{r}-{k}" for k in ("nightjar-db", "restic-db", "nightjar-db-enc"))
        self.restic_init(rs)
        source = f"db-r{r}"
        chain: dict[str, str] = {}

        def nightjar() -> None:
            res, m = self.nightjar_backup(nj, source, PG_DB)
            chain["previous"] = res["manifestKey"]
            self.rec("db.time.nightjar", m.seconds)
            self.rec("db.rss.nightjar", m.rss_bytes)
            self.rec("db.stored.nightjar", self.stored(nj))

        def pg_dump() -> None:
            args = [str(self.bindir / "pg_dump"), "-Fc", "-O", "-x", "--no-password"]
            m = run_measured(args, self.pg_env(PG_DB), stdout_to_null=True)
            self.rec("db.time.pg_dump", m.seconds)

        def restic() -> None:
            m = self.restic_dump(rs)
            self.rec("db.time.restic", m.seconds)
            self.rec("db.rss.restic", m.rss_bytes)
            self.rec("db.stored.restic", self.stored(rs))

        def nightjar_encrypted() -> None:
            _, m = self.nightjar_backup(nje, f"{source}-enc", PG_DB, enc=True)
            self.rec("db.time.nightjar_enc", m.seconds)

        ops = [("nightjar backup", nightjar), ("pg_dump > /dev/null", pg_dump), ("pg_dump | restic", restic)]
        if self.encryption:
            ops.append(("nightjar backup, encrypted", nightjar_encrypted))
        self.interleave(r, ops)

        for night in range(1, self.nights + 1):
            self.psql(PG_DB, UPDATE_NEWEST_PERCENT)
            self.psql(PG_DB, "VACUUM ANALYZE pgbench_accounts")  # what autovacuum would do overnight

            def nightjar_night(night: int = night) -> None:
                before = self.listing(nj)
                res, m = self.nightjar_backup(nj, source, PG_DB, previous=chain["previous"])
                chain["previous"] = res["manifestKey"]
                added = {k: v for k, v in self.listing(nj).items() if k not in before}
                self.rec(f"night{night}.added.nightjar", sum(added.values()))
                manifest = added.get(res["manifestKey"], 0)
                self.rec("nights.meta.nightjar", manifest)
                self.rec("nights.data.nightjar", sum(added.values()) - manifest)
                self.rec("nights.time.nightjar", m.seconds)

            def restic_night(night: int = night) -> None:
                before = self.listing(rs)
                m = self.restic_dump(rs)
                added = {k: v for k, v in self.listing(rs).items() if k not in before}
                self.rec(f"night{night}.added.restic", sum(added.values()))
                data = sum(v for k, v in added.items() if "/data/" in k)
                self.rec("nights.meta.restic", sum(added.values()) - data)
                self.rec("nights.data.restic", data)
                self.rec("nights.time.restic", m.seconds)

            log(f" night {night}")
            self.interleave(
                r + night, [("nightjar backup", nightjar_night), ("pg_dump | restic", restic_night)]
            )

    def files_round(self, r: int, tree: Path) -> None:
        nj, rs, nje = (
            f"{self.top}/r{r}-{k}" for k in ("nightjar-files", "restic-files", "nightjar-files-enc")
        )
        self.restic_init(rs)
        source = f"files-r{r}"
        snap: dict[str, dict[str, Any]] = {}

        def nightjar_first() -> None:
            snap["first"], m = self.nightjar_backup(nj, source, TINY_DB, files=tree)
            self.rec("files.first.time.nightjar", m.seconds)
            self.rec("files.first.rss.nightjar", m.rss_bytes)
            self.rec("files.stored.nightjar", self.stored(nj))

        def restic_first() -> None:
            m = self.restic(rs, "backup", "-q", "--host", "bench", str(tree))
            self.rec("files.first.time.restic", m.seconds)
            self.rec("files.first.rss.restic", m.rss_bytes)
            self.rec("files.stored.restic", self.stored(rs))

        def nightjar_first_encrypted() -> None:
            _, m = self.nightjar_backup(nje, f"{source}-enc", TINY_DB, files=tree, enc=True)
            self.rec("files.first.time.nightjar_enc", m.seconds)

        def nightjar_second() -> None:
            before = self.stored(nj)
            snap["second"], m = self.nightjar_backup(
                nj, source, TINY_DB, files=tree, previous=snap["first"]["manifestKey"]
            )
            self.rec("files.second.time.nightjar", m.seconds)
            self.rec("files.second.rss.nightjar", m.rss_bytes)
            self.rec("files.second.added.nightjar", self.stored(nj) - before)

        def restic_second() -> None:
            before = self.stored(rs)
            m = self.restic(rs, "backup", "-q", "--host", "bench", str(tree))
            self.rec("files.second.time.restic", m.seconds)
            self.rec("files.second.rss.restic", m.rss_bytes)
            self.rec("files.second.added.restic", self.stored(rs) - before)

        restored: dict[str, Path] = {}

        def empty_dir(who: str) -> Path:
            target = self.work / f"restore-r{r}-{len(restored)}"
            target.mkdir()
            restored[who] = target
            return target

        def nightjar_restore() -> None:
            m = self.nightjar_restore(nj, snap["second"], empty_dir("nightjar agent restore"))
            self.rec("files.restore.time.nightjar", m.seconds)
            self.rec("files.restore.rss.nightjar", m.rss_bytes)

        def nightjar_restore_db_only() -> None:
            m = self.nightjar_restore(nj, snap["second"], None)
            self.rec("files.restore.tinydb.nightjar", m.seconds)

        def restic_restore() -> None:
            target = empty_dir("restic restore")
            m = self.restic(rs, "restore", "latest", "-q", "--target", str(target))
            self.rec("files.restore.time.restic", m.seconds)
            self.rec("files.restore.rss.restic", m.rss_bytes)

        first = [("nightjar first backup", nightjar_first), ("restic first backup", restic_first)]
        if self.encryption:
            first.append(("nightjar first backup, encrypted", nightjar_first_encrypted))
        self.interleave(r, first)
        self.interleave(
            r, [("nightjar second backup", nightjar_second), ("restic second backup", restic_second)]
        )
        self.interleave(
            r,
            [
                ("nightjar restore", nightjar_restore),
                ("restic restore", restic_restore),
                ("nightjar restore, tiny database only", nightjar_restore_db_only),
            ],
        )
        for who, target in restored.items():
            got = count_files(target)
            if got != self.nfiles:
                raise RuntimeError(f"{who} restored {got} files, expected {self.nfiles}")

    def million_run(self) -> None:
        tree = self.work / "million"
        log(f"making {self.million_files:,} files of {self.million_size} B")
        make_text_tree(tree, self.million_files, self.million_size)
        os.sync()
        prefix = f"{self.top}/million"
        _, m = self.nightjar_backup(prefix, "million", TINY_DB, files=tree)
        log(f"  nightjar first backup of {self.million_files:,} files: {m.seconds:.1f} s")
        self.rec("million.time.nightjar", m.seconds)
        self.rec("million.rss.nightjar", m.rss_bytes)

    # --- the whole run ------------------------------------------------------------------------

    def warm_up(self) -> None:
        """One untimed pass of every tool: the agent's modules compiled, MinIO and the page
        cache warm (the database read once), so the first measured run is not the odd one."""
        small = self.work / "warm-tree"
        make_text_tree(small, 200, self.file_size)
        prefix, repo = f"{self.top}/warm-nightjar", f"{self.top}/warm-restic"
        res, _ = self.nightjar_backup(prefix, "warm", TINY_DB, files=small)
        (self.work / "warm-restore-nightjar").mkdir()
        self.nightjar_restore(prefix, res, self.work / "warm-restore-nightjar")
        self.restic_init(repo)
        self.restic(repo, "backup", "-q", "--host", "bench", str(small))
        self.restic(repo, "restore", "latest", "-q", "--target", str(self.work / "warm-restore-restic"))
        run_measured(
            [str(self.bindir / "pg_dump"), "-Fc", "-Z0", "-O", "-x"], self.pg_env(PG_DB), stdout_to_null=True
        )

    def run(self) -> None:
        """Everything written (objects, restored trees) stays until :meth:`cleanup`: deleting
        slows down the I/O that follows it (ext4 with online discard on the development
        machine), which would land in whichever command ran next."""
        self.copy_agent()
        self.ensure_restic()
        self.check_agent()
        self.setup_databases()
        tree = self.work / "tree"
        log(f"making {self.nfiles:,} files of {self.file_size} B")
        make_text_tree(tree, self.nfiles, self.file_size)
        log("warming up (untimed)")
        self.warm_up()
        for r in range(self.rounds):
            log(f"round {r + 1}/{self.rounds}: database")
            self.database_round(r)
            log(f"round {r + 1}/{self.rounds}: files")
            self.files_round(r, tree)
        if self.million:
            self.million_run()

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        try:
            delete_prefix(self.s3, self.bucket, self.top + "/")
            for db in (PG_DB, TINY_DB, TINY_RESTORE_DB):
                self.psql("postgres", f'DROP DATABASE IF EXISTS "{db}"')
        except Exception as e:  # the stack is torn down after the bench anyway
            log(f"cleanup: {e}")

    # --- report -------------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        rows = [
            Row(
                "database backup time vs pg_dump -Fc -O -x > /dev/null",
                "s",
                "db.time.nightjar",
                "db.time.pg_dump",
                max_ratio=0.6,
            ),
            Row(
                "database backup time vs pg_dump -Z0 | restic --stdin",
                "s",
                "db.time.nightjar",
                "db.time.restic",
            ),
            Row("database stored bytes vs restic", "MB", "db.stored.nightjar", "db.stored.restic"),
        ]
        rows += [
            Row(
                f"night {n}: bytes added vs restic",
                "MB",
                f"night{n}.added.nightjar",
                f"night{n}.added.restic",
                max_ratio=1.0,
            )
            for n in range(1, self.nights + 1)
        ]
        rows += [
            Row(
                "  of a night: packs (restic: data/, the tree included)",
                "MB",
                "nights.data.nightjar",
                "nights.data.restic",
            ),
            Row(
                "  of a night: the manifest (restic: index/, snapshots/)",
                "MB",
                "nights.meta.nightjar",
                "nights.meta.restic",
            ),
            Row(
                "nightly backup time vs pg_dump -Z0 | restic",
                "s",
                "nights.time.nightjar",
                "nights.time.restic",
            ),
            Row(
                "files first backup time vs restic",
                "s",
                "files.first.time.nightjar",
                "files.first.time.restic",
                max_ratio=0.5,
            ),
            Row(
                "files unchanged second backup time vs restic",
                "s",
                "files.second.time.nightjar",
                "files.second.time.restic",
                max_ratio=0.25,
            ),
            Row(
                "files restore time vs restic restore",
                "s",
                "files.restore.time.nightjar",
                "files.restore.time.restic",
                max_ratio=0.5,
            ),
            Row("  of it: the tiny database (DatabaseOnly restore)", "s", "files.restore.tinydb.nightjar"),
            Row(
                "files stored bytes vs restic",
                "MB",
                "files.stored.nightjar",
                "files.stored.restic",
                max_ratio=1.0,
            ),
            Row(
                "files unchanged second backup adds",
                "MB",
                "files.second.added.nightjar",
                "files.second.added.restic",
                max_value=1.0,
            ),
            Row("peak RSS: database backup vs restic --stdin", "MiB", "db.rss.nightjar", "db.rss.restic"),
            Row(
                "peak RSS: files first backup vs restic",
                "MiB",
                "files.first.rss.nightjar",
                "files.first.rss.restic",
            ),
            Row(
                "peak RSS: files second backup vs restic",
                "MiB",
                "files.second.rss.nightjar",
                "files.second.rss.restic",
            ),
            Row(
                "peak RSS: files restore vs restic",
                "MiB",
                "files.restore.rss.nightjar",
                "files.restore.rss.restic",
            ),
        ]
        if self.million:
            rows += [
                Row(
                    f"{self.million_files:,} files x {self.million_size} B: first backup time",
                    "s",
                    "million.time.nightjar",
                ),
                Row(
                    f"{self.million_files:,} files x {self.million_size} B: peak RSS",
                    "MiB",
                    "million.rss.nightjar",
                    max_value=256,
                ),
            ]
        if self.encryption:
            rows += [
                Row(
                    "encryption: database backup time, encrypted vs plain",
                    "s",
                    "db.time.nightjar_enc",
                    "db.time.nightjar",
                    max_ratio=1.1,
                ),
                Row(
                    "encryption: files first backup time, encrypted vs plain",
                    "s",
                    "files.first.time.nightjar_enc",
                    "files.first.time.nightjar",
                    max_ratio=1.1,
                ),
            ]
        return rows

    def report(self, write: bool = True) -> None:
        out_rows: list[dict[str, Any]] = []
        header = (
            f"{'measurement':<58} {'unit':>4} {'nightjar min':>12} {'median':>9} "
            f"{'reference min':>13} {'median':>9} {'ratio med (min)':>16} {'target':>9}  verdict"
        )
        lines = [header, "-" * len(header)]
        verdicts: dict[str, int] = defaultdict(int)
        for row in self.rows():
            scale = _SCALE[row.unit]
            a = summary(v / scale for v in self.samples.get(row.a, []))
            b = summary(v / scale for v in self.samples.get(row.b, [])) if row.b else None
            ratio = ratio_min = None
            if a and b and b["median"] > 0:
                ratio = a["median"] / b["median"]
                ratio_min = a["min"] / b["min"] if b["min"] > 0 else None
            verdict = _verdict(row, a, ratio, ratio_min)
            verdicts[verdict] += 1
            ratio_text = (
                f"{ratio:.2f} ({ratio_min:.2f})" if ratio is not None and ratio_min is not None else "-"
            )
            lines.append(
                f"{row.title:<58} {row.unit:>4} {_num(a, 'min'):>12} {_num(a, 'median'):>9} "
                f"{_num(b, 'min'):>13} {_num(b, 'median'):>9} {ratio_text:>16} {row.target():>9}  {verdict}"
            )
            out_rows.append(
                {
                    "measurement": row.title,
                    "unit": row.unit,
                    "nightjar": a,
                    "reference": b,
                    "ratioMedian": ratio,
                    "ratioMin": ratio_min,
                    "target": row.target(),
                    "verdict": verdict,
                }
            )
        print("\n".join(lines), flush=True)
        print(
            f"targets: {verdicts['PASS']} met, {verdicts['FAIL']} missed, {verdicts['NOISY']} noisy "
            "(NOISY: the ratio of the minimums and the ratio of the medians disagree; run more rounds)",
            flush=True,
        )
        doc = {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "config": {
                "rounds": self.rounds,
                "pgScale": self.pg_scale,
                "nights": self.nights,
                "files": self.nfiles,
                "fileSize": self.file_size,
                "million": self.million_files if self.million else None,
                "millionFileSize": self.million_size if self.million else None,
            },
            "info": self.info,
            "rows": out_rows,
            "samples": self.samples,
        }
        if not write:
            return
        path = Path(self.env.get("NIGHTJAR_STATE_DIR", ".local/bench")) / "datapath.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}", flush=True)


def _verdict(row: Row, a: dict[str, float] | None, ratio: float | None, ratio_min: float | None) -> str:
    """PASS when both the ratio of the medians and the ratio of the minimums meet the target
    (for an absolute target: both the median and the minimum), FAIL when neither does, NOISY
    when they disagree."""
    if row.max_ratio is not None and ratio is not None and ratio_min is not None:
        met = [ratio <= row.max_ratio, ratio_min <= row.max_ratio]
    elif row.max_value is not None and a is not None:
        met = [a["median"] < row.max_value, a["min"] < row.max_value]
    else:
        return ""
    return "PASS" if all(met) else "FAIL" if not any(met) else "NOISY"


def _num(s: dict[str, float] | None, k: str) -> str:
    if s is None:
        return "-"
    v = s[k]
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _git_commit() -> str:
    """The checkout's commit, "+dirty" when operator/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "operator"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    # SIGTERM (run-bench.sh interrupted) unwinds like Ctrl-C: measured commands are killed,
    # the work directory and the bench's objects removed.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    bench = Bench()
    log(
        f"datapath: {bench.rounds} round(s), pgbench scale {bench.pg_scale}, {bench.nights} nights, "
        f"{bench.nfiles:,} files x {bench.file_size} B; S3 {bench.bucket}/{bench.top}/, work {bench.work}"
    )
    try:
        bench.run()
    except BaseException:
        log("the bench broke; the figures so far (not written to datapath.json):")
        bench.report(write=False)
        raise
    finally:
        bench.cleanup()
    bench.report()


if __name__ == "__main__":
    main()
