"""Pure parts of the local stack: pinned versions, ports, the env file, pid liveness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nightjar.devstack import stack


def test_versions_are_pinned_in_one_file() -> None:
    v = stack.versions()
    assert v["KUBERNETES_VERSION"].startswith("v1.")
    assert v["ETCD_VERSION"].startswith("v3.6.")
    assert v["MINIO_VERSION"].startswith("v0.0.0-")


def test_free_port_is_bindable_and_skips_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = {stack.free_port() for _ in range(20)}
        assert taken not in ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_env_file_round_trips_values_with_shell_characters(tmp_path: Path) -> None:
    envf = tmp_path / "env"
    envf.write_text("export A='it'\"'\"'s $HOME'\nexport B=plain\n")
    assert stack.parse_env(envf) == {"A": "it's $HOME", "B": "plain"}
    # and the shell reads it the same way
    out = subprocess.run(
        ["bash", "-c", f'source {envf}; printf %s "$A"'], capture_output=True, text=True, check=True
    )
    assert out.stdout == "it's $HOME"


def test_alive_checks_the_pid_still_runs_the_recorded_binary() -> None:
    me = stack.Proc(name="me", pid=os.getpid(), exe=sys.executable)
    assert stack._alive(me)
    assert not stack._alive(stack.Proc(name="other", pid=os.getpid(), exe="/bin/true"))
    p = subprocess.Popen(["sleep", "0"])
    p.wait()
    assert not stack._alive(stack.Proc(name="gone", pid=p.pid, exe="/bin/sleep"))


def test_missing_binary_names_the_make_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NIGHTJAR_CACHE", str(tmp_path))
    with pytest.raises(stack.StackError, match="make binaries"):
        stack.binary("etcd", "etcd")
