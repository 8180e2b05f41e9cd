"""hack/build-image.sh (`make image`), checked without Docker: it parses, its help lists every option it
takes, bad options fail before anything starts, shellcheck (when installed) finds nothing, and the
cache of base images is keyed by the functions that build them. The build itself runs with `make
image`; its cold and warm times are in the message of the commit that added it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "build-image.sh"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_the_script_parses_and_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert "set -euo pipefail" in SCRIPT.read_text()


def test_help_lists_every_option_the_script_takes() -> None:
    text = SCRIPT.read_text()
    taken = set(re.findall(r"^\s+(--[a-z-]+)\)", text, re.M))
    assert {"--state", "--tag", "--import", "--keep-dockerd", "--stop-dockerd"} <= taken
    result = run("--help")
    assert result.returncode == 0
    documented = set(re.findall(r"^\s+(--[a-z-]+)", result.stdout, re.M))
    assert documented == taken, (
        f"options without help: {taken - documented}; help without option: {documented - taken}"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option --bogus"),
        (["--no-build"], "--no-build only makes sense with --import"),
    ],
)
def test_bad_options_fail_before_anything_starts(tmp_path: Path, args: list[str], message: str) -> None:
    result = run("--state", str(tmp_path / "state"), *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "dockerd" not in result.stderr.replace(message, "")


def test_stop_dockerd_without_one_running_is_quiet(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run("--state", str(state), "--stop-dockerd")
    assert (result.returncode, result.stderr) == (0, "")
    (state / "dockerd.pid").write_text("999999999\n")  # not a dockerd: a stale file
    result = run("--state", str(state), "--stop-dockerd")
    assert result.returncode == 0
    assert "stale" in result.stderr
    assert not (state / "dockerd.pid").exists()


def test_import_checks_its_socket_and_tarballs_first(tmp_path: Path) -> None:
    if shutil.which("ctr") is None:
        pytest.skip("ctr (containerd) is not installed: the script would install it")
    result = run("--state", str(tmp_path / "state"), "--no-build", "--import", str(tmp_path / "none.sock"))
    assert result.returncode != 0
    assert f"no containerd socket at {tmp_path / 'none.sock'}" in result.stderr


def test_base_images_are_cached_by_their_recipe() -> None:
    """The cache key of each base image hashes the functions that build it, so changing how an image
    is made builds it again; and cache files are renamed into place, never written in place."""
    text = SCRIPT.read_text()
    assert re.search(r"declare -f build_debian\b", text)
    assert re.search(r"declare -f build_python python_standin_dockerfile", text)
    assert re.search(r"declare -f build_pause\b", text)
    saves = re.findall(r'"\$DOCKER" save -o "([^"]+)"', text)
    assert saves
    assert set(saves) == {"$tmp"}, "docker save must write a temporary file that is then renamed"
    assert 'mv -f "$tmp" "$file"' in text
    assert 'mv -f "$tmp" "$image_tar"' in text


def test_the_build_uses_the_legacy_builder_and_the_stand_in_s_arguments() -> None:
    text = SCRIPT.read_text()
    assert 'DOCKER_BUILDKIT=0 "$DOCKER" build "${args[@]}"' in text
    assert '--build-arg "BASE_IMAGE=$base"' in text
    assert 'args+=(--build-arg "PG_MAJORS=$pg_majors" --build-arg "PG_MAJOR=$newest")' in text
    assert "tail -n 40" in text


def test_make_image_runs_the_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^image:.*## (.+)\n\t(.+)$", makefile, re.M)
    assert m, "no `make image` target with a help comment"
    assert "hack/build-image.sh" in m.group(2)


def test_shellcheck_finds_nothing() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(
        ["shellcheck", "-x", str(SCRIPT)], cwd=SCRIPT.parent, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_a_dockerd_that_cannot_start_is_named_with_its_log(tmp_path: Path) -> None:
    """No daemon answers (a docker client that always fails) and dockerd exits at once (a stand-in
    that fails as a real one does when its pid file or socket is taken): one error naming dockerd
    and its log, with the log's last lines, and no dockerd left behind."""
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        pytest.skip("starting dockerd needs root and iptables")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "dockerd").write_text(
        '#!/bin/sh\necho "failed to start daemon: pid file found, ensure docker is not running" >&2\nexit 1\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    state = tmp_path / "state"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER": str(bin_dir / "docker")}
    env_without_host = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--state", str(state), "--local-base"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**env_without_host, **env},
    )
    assert result.returncode != 0
    log = state / "dockerd.log"
    assert f"ERROR: dockerd exited while starting; its log: {log}" in result.stderr
    assert "pid file found" in result.stderr, "the log's last lines are shown"
    assert "pid file found" in log.read_text()
    assert not (state / "dockerd.pid").exists()
