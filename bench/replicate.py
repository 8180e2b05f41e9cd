"""Benchmark: replicating a snapshot from the primary S3 server to the replica server.

A snapshot is taken by the backup agent (``bench.backup_files``), then ``nightjar agent replicate``
copies it into the stack's second MinIO, twice: the first copy moves everything, the second finds
it all there (nothing crosses the wire). Reports wall time, MB/s and the agent's peak RSS, which
must stay flat whatever the snapshot's size (one multipart part in flight):

    BENCH=replicate make bench
    BENCH_REPLICATE=100000x1000,8x134217728 BENCH=replicate make bench   # files x bytes each
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.support import stack_env

from bench.backup_files import make_tree, run_agent


def replicate(env: dict[str, str], manifest: str, sha: str, prefix: str) -> tuple[dict[str, int], float, int]:
    # The agent in a process of its own that reports its own peak RSS.
    args = [
        sys.executable,
        "-c",
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (big) parent through exec.
        "import sys\n"
        "from nightjar.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "finally:\n"
        "    hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
        "    print('maxrss', hwm, file=sys.stderr)",
        "agent",
        "replicate",
        "--endpoint",
        env["NIGHTJAR_S3_ENDPOINT"],
        "--bucket",
        env["NIGHTJAR_S3_BUCKET_PLAIN"],
        "--prefix",
        "bench",
        "--replica-endpoint",
        env["NIGHTJAR_S3_REPLICA_ENDPOINT"],
        "--replica-bucket",
        env["NIGHTJAR_S3_REPLICA_BUCKET_PLAIN"],
        "--replica-prefix",
        prefix,
        "--manifest-key",
        manifest,
        "--manifest-sha256",
        sha,
        "--result-file",
        os.devnull,
    ]
    agent_env = {
        **os.environ,
        "NIGHTJAR_S3_ACCESS_KEY_ID": env["NIGHTJAR_S3_ACCESS_KEY"],
        "NIGHTJAR_S3_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_SECRET_KEY"],
        "NIGHTJAR_REPLICA_S3_ACCESS_KEY_ID": env["NIGHTJAR_S3_REPLICA_ACCESS_KEY"],
        "NIGHTJAR_REPLICA_S3_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_REPLICA_SECRET_KEY"],
    }
    t0 = time.monotonic()
    proc = subprocess.run(args, env=agent_env, capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - t0
    rss_kib = int(next(ln for ln in proc.stderr.splitlines() if ln.startswith("maxrss ")).split()[1])
    return json.loads(proc.stdout.strip().splitlines()[-1]), elapsed, rss_kib


def main() -> None:
    env = stack_env()
    shapes = [
        tuple(int(x) for x in s.split("x"))
        for s in os.environ.get("BENCH_REPLICATE", "100000x1000,8x134217728").split(",")
    ]
    cols = ("snapshot", 22), ("copy", 7), ("seconds", 8), ("MB/s", 7), ("copied MB", 10), ("skipped", 8)
    print(" ".join(f"{c:>{w}}" for c, w in cols), f"{'peak RSS MiB':>13}")
    for n, size in shapes:
        with tempfile.TemporaryDirectory(prefix="nightjar-bench-") as tmp:
            root = Path(tmp)
            make_tree(root, n, size)
            uid = f"rep-{n}-{uuid.uuid4().hex[:6]}"
            result, _, _ = run_agent(env, root, uid, f"a-{uid}", "")
        prefix = f"replica-{uid}"
        for run in ("first", "second"):
            rep, secs, rss = replicate(env, result["manifestKey"], result["manifestSha256"], prefix)
            mb = rep["copiedBytes"] / 1e6
            print(
                f"{f'{n} x {size} B':>22} {run:>7} {secs:>8.1f} {mb / secs:>7.1f} {mb:>10.1f} "
                f"{rep['skippedObjects']:>8} {rss / 1024:>13.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
