"""Benchmark: the backup agent on many small files, against the local stack's MinIO and PostgreSQL.

Reports wall time, files/s and the agent's peak RSS for each file count, first run (everything
uploaded) and second run (everything reused), so memory flatness and reuse are visible:

    make bench            # default counts
    BENCH_COUNTS=10000,100000,1000000 make bench
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.support import stack_env


def make_tree(root: Path, n: int, size: int) -> None:
    """Mendix-style tree/ab/cd/<uuid> files of ``size`` bytes."""
    payload = b"x" * size
    for i in range(n):
        u = uuid.uuid5(uuid.NAMESPACE_OID, str(i)).hex
        d = root / u[:2] / u[2:4]
        d.mkdir(parents=True, exist_ok=True)
        (d / u).write_bytes(payload[: size - 8] + i.to_bytes(8, "little"))


def run_agent(
    env: dict[str, str], files: Path, backup_uid: str, attempt: str, previous: str
) -> tuple[dict[str, Any], float, int]:
    args = [
        str(Path(sys.executable).with_name("nightjar")),
        "agent",
        "backup",
        "--endpoint",
        env["NIGHTJAR_S3_ENDPOINT"],
        "--bucket",
        env["NIGHTJAR_S3_BUCKET_PLAIN"],
        "--prefix",
        "bench",
        "--namespace",
        "bench",
        "--backup-name",
        backup_uid,
        "--backup-uid",
        backup_uid,
        "--source-id",
        "bench",
        "--attempt",
        attempt,
        "--expires",
        "2030-01-01T00:00:00Z",
        "--files-dir",
        str(files),
        "--result-file",
        os.devnull,
    ]
    if previous:
        args += ["--previous-manifest", previous]
    agent_env = {
        **os.environ,
        "NIGHTJAR_S3_ACCESS_KEY_ID": env["NIGHTJAR_S3_ACCESS_KEY"],
        "NIGHTJAR_S3_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_SECRET_KEY"],
        "NIGHTJAR_DB_HOST": "127.0.0.1",
        "NIGHTJAR_DB_PORT": env["NIGHTJAR_PG_PORT"],
        "NIGHTJAR_DB_NAME": "postgres",
        "NIGHTJAR_DB_USER": "postgres",
        "NIGHTJAR_DB_PASSWORD": env["NIGHTJAR_PG_PASSWORD"],
        "NIGHTJAR_PG_BINDIR": env["NIGHTJAR_PG_BINDIR"],
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.monotonic()
    out = subprocess.run(args, env=agent_env, capture_output=True, text=True, check=True).stdout
    elapsed = time.monotonic() - t0
    # ru_maxrss of children is the max over all waited children: run counts in ascending order.
    rss_kib = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
    return json.loads(out.strip().splitlines()[-1]), elapsed, rss_kib


def main() -> None:
    env = stack_env()
    counts = [int(c) for c in os.environ.get("BENCH_COUNTS", "10000,100000").split(",")]
    size = int(os.environ.get("BENCH_FILE_SIZE", "100"))
    cols = ("files", 9), ("run", 7), ("seconds", 8), ("files/s", 9), ("uploaded MB", 12), ("reused", 8)
    print(" ".join(f"{c:>{w}}" for c, w in cols), f"{'peak RSS MiB':>13}")
    for n in sorted(counts):
        with tempfile.TemporaryDirectory(prefix="nightjar-bench-") as tmp:
            root = Path(tmp)
            make_tree(root, n, size)
            uid = f"bench-{n}-{uuid.uuid4().hex[:6]}"
            previous = ""
            for run in ("first", "second"):
                result, secs, rss = run_agent(env, root, uid, f"{run}-{n}", previous)
                previous = result["manifestKey"]
                files = result["files"]
                uploaded = (
                    (result["sizeUncompressedBytes"] - result["database"]["bytes"]) if run == "first" else 0
                )
                print(
                    f"{n:>9} {run:>7} {secs:>8.1f} {n / secs:>9.0f} {uploaded / 1e6:>12.1f} "
                    f"{files['reusedFiles']:>8} {rss / 1024:>13.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
