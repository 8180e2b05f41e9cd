"""images/scratch-postgres: the ephemeral scratch server's image agrees with the Pod the operator
builds for it (uid, data directory, socket directory), its entrypoint reaches the build context,
and the entrypoint refuses to start a server without a password. The server itself runs in
tests/integration/test_scratch_server.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from nightjar import scratchpod

ROOT = Path(__file__).resolve().parents[2]
DIR = ROOT / "images" / "scratch-postgres"
DOCKERFILE = (DIR / "Dockerfile").read_text()
ENTRYPOINT = DIR / "entrypoint.sh"


def test_the_image_runs_as_the_uid_the_pod_names_with_its_data_on_the_pods_emptydir() -> None:
    assert re.search(rf"^USER {scratchpod.UID}:{scratchpod.UID}$", DOCKERFILE, re.M)
    assert f"--uid {scratchpod.UID} --gid {scratchpod.UID}" in DOCKERFILE
    pgdata = re.search(r"PGDATA=(\S+)", DOCKERFILE)
    assert pgdata is not None and pgdata.group(1).startswith(scratchpod.DATA + "/")
    assert f"unix_socket_directories={scratchpod.SOCKETS}" in ENTRYPOINT.read_text()
    assert 'ENTRYPOINT ["/usr/local/bin/nightjar-postgres"]' in DOCKERFILE


def test_the_entrypoint_is_in_the_build_context() -> None:
    copies = re.findall(r"^COPY (\S+) ", DOCKERFILE, re.M)
    assert "images/scratch-postgres/entrypoint.sh" in copies
    assert "!images/scratch-postgres/entrypoint.sh" in (ROOT / ".dockerignore").read_text().splitlines()


def test_every_connection_needs_the_password() -> None:
    text = ENTRYPOINT.read_text()
    assert "--auth=scram-sha-256" in text and "trust" not in text
    assert "host all all 0.0.0.0/0 scram-sha-256" in text


def test_the_entrypoint_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    out = subprocess.run(
        ["sh", str(ENTRYPOINT)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PGDATA": str(tmp_path / "pgdata"), "POSTGRES_PASSWORD": ""},
        timeout=10,
    )
    assert out.returncode == 1
    assert "POSTGRES_PASSWORD is empty" in out.stderr
    assert not (tmp_path / "pgdata").exists()
