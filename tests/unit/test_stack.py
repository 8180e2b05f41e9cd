"""Pure parts of the local stack: pinned versions, ports, the env file, pid liveness, the two S3
servers' names and the state of one stopped on purpose."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nightjar.devstack import stack
from nightjar.devstack.__main__ import main


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


def test_the_two_s3_servers_share_nothing_and_keep_the_primarys_env_names() -> None:
    primary, replica = stack.S3_SERVERS["primary"], stack.S3_SERVERS["replica"]
    assert (primary.proc, primary.data, primary.port_key) == ("minio", "s3", "s3")
    assert (replica.proc, replica.data) == ("minio-replica", "s3-replica")
    for attr in ("proc", "data", "port_key", "env_prefix", "bucket_locked", "bucket_plain"):
        assert getattr(primary, attr) != getattr(replica, attr), attr
    assert primary.env("127.0.0.1", 9000, "ak", "sk") == {
        "NIGHTJAR_S3_ENDPOINT": "http://127.0.0.1:9000",
        "NIGHTJAR_S3_REGION": "us-east-1",
        "NIGHTJAR_S3_ACCESS_KEY": "ak",
        "NIGHTJAR_S3_SECRET_KEY": "sk",
        "NIGHTJAR_S3_BUCKET_LOCKED": "nightjar-locked",
        "NIGHTJAR_S3_BUCKET_PLAIN": "nightjar-plain",
    }
    assert replica.env("10.99.7.1", 9001, "ak2", "sk2") == {
        "NIGHTJAR_S3_REPLICA_ENDPOINT": "http://10.99.7.1:9001",
        "NIGHTJAR_S3_REPLICA_REGION": "us-east-1",
        "NIGHTJAR_S3_REPLICA_ACCESS_KEY": "ak2",
        "NIGHTJAR_S3_REPLICA_SECRET_KEY": "sk2",
        "NIGHTJAR_S3_REPLICA_BUCKET_LOCKED": "nightjar-replica-locked",
        "NIGHTJAR_S3_REPLICA_BUCKET_PLAIN": "nightjar-replica-plain",
    }


def test_an_unknown_s3_server_is_refused_by_name() -> None:
    assert stack.s3_server("replica").proc == "minio-replica"
    with pytest.raises(stack.StackError, match="primary, replica"):
        stack.s3_server("secondary")


def test_free_port_avoids_ports_already_handed_out() -> None:
    given: list[int] = []
    for _ in range(30):
        given.append(stack.free_port(given))
    assert len(set(given)) == len(given)


def test_state_round_trips_keys_and_stopped_and_loads_an_older_stacks_file(tmp_path: Path) -> None:
    st = stack.State(dir=str(tmp_path), ports={"s3": 1, "s3_replica": 2})
    st.s3_keys["replica"] = {"access_key": "a", "secret_key": "s"}
    st.stopped.append("minio-replica")
    st.procs.append(stack.Proc(name="etcd", pid=1, exe="/x"))
    st.save()
    assert stack.State.load(tmp_path) == st
    # What an earlier version wrote: other S3 fields, none of the new ones. `status` and `down`
    # must still read it.
    older = {
        "dir": str(tmp_path),
        "procs": [{"name": "minio", "pid": 5, "exe": "/m"}],
        "ports": {"s3": 3},
        "pg_datadir": "",
        "s3_access_key": "k",
        "s3_secret_key": "s",
        "pg_password": "p",
    }
    (tmp_path / "state.json").write_text(json.dumps(older))
    old = stack.State.load(tmp_path)
    assert old is not None
    assert old.procs == [stack.Proc(name="minio", pid=5, exe="/m")]
    assert (old.s3_keys, old.stopped, old.pg_password) == ({}, [], "p")


def _recorded_stack(tmp_path: Path, stopped: list[str]) -> stack.Stack:
    """A stack whose one recorded process is this test (alive) and ``stopped`` stopped on purpose."""
    st = stack.State(dir=str(tmp_path), ports={"s3": 1, "s3_replica": 2}, stopped=stopped)
    st.procs.append(stack.Proc(name="minio", pid=os.getpid(), exe=sys.executable))
    st.s3_keys = {w: {"access_key": "a", "secret_key": "s"} for w in stack.S3_SERVERS}
    st.save()
    return stack.Stack(tmp_path, out=lambda _line: None)


def test_a_server_stopped_on_purpose_is_shown_as_stopped_not_as_broken(tmp_path: Path) -> None:
    st, alive, dead = _recorded_stack(tmp_path, ["minio-replica"]).status()
    assert st is not None and dead == [] and [p.name for p in alive] == ["minio"]
    text = stack.describe(st, alive, dead)
    assert "minio-replica" in text and "stopped" in text and "NOT RUNNING" not in text
    out = CliRunner().invoke(main, ["status", "--state", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "s3 start replica" in out.output


def test_s3_stop_and_start_change_nothing_when_already_there(tmp_path: Path) -> None:
    lines: list[str] = []
    s = _recorded_stack(tmp_path, ["minio-replica"])
    s.out = lines.append
    before = (tmp_path / "state.json").read_text()
    s.stop_s3("replica")  # stopped already
    s.start_s3("primary")  # "runs": the recorded pid is this test, still running its binary
    assert lines == [
        "S3 server replica (minio-replica) is already stopped.",
        "S3 server primary (minio) is already running.",
    ]
    assert (tmp_path / "state.json").read_text() == before


def test_s3_commands_need_a_stack_and_a_known_server(tmp_path: Path) -> None:
    for action in ("stop", "start"):
        out = CliRunner().invoke(main, ["s3", action, "replica", "--state", str(tmp_path)])
        assert out.exit_code == 1 and "no stack in" in out.output
        out = CliRunner().invoke(main, ["s3", action, "secondary", "--state", str(tmp_path)])
        assert out.exit_code == 2 and "'primary', 'replica'" in out.output


def test_the_stacks_servers_are_reached_at_loopback_or_at_the_real_nodes_address() -> None:
    # Pods of the real node live in their own network namespaces: loopback is not the host's there.
    assert stack.State(dir="/x").host == "127.0.0.1"
    assert stack.State(dir="/x", node="real", real_node={"node_ip": "10.99.7.1"}).host == "10.99.7.1"
