"""Pure parts of `up` on a stack that is already there: what it restarts (and in what order), what
stops it restarting in place, the group of a dead process, and the `restart` verb's refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nightjar.devstack import stack
from nightjar.devstack.__main__ import main

PROCESS = stack.components("process", True)
REAL = stack.components("real", True)


def test_components_are_in_start_order() -> None:
    assert PROCESS[:4] == ["etcd", "kube-apiserver", "kube-controller-manager", "postgres"]
    assert PROCESS[-3:] == ["process-node", "provisioner", "operator"]
    assert REAL[-5:] == ["containerd", "kubelet", "pod-binder", "provisioner", "operator"]
    assert "operator" not in stack.components("process", False)


def test_an_up_stack_needs_nothing() -> None:
    assert stack.restart_plan("process", True, PROCESS, PROCESS, []) == []


def test_only_what_died_restarts() -> None:
    alive = [n for n in PROCESS if n != "kube-controller-manager"]
    assert stack.restart_plan("process", True, PROCESS, alive, []) == ["kube-controller-manager"]


def test_several_dead_restart_in_start_order() -> None:
    alive = [n for n in PROCESS if n not in ("operator", "etcd", "minio")]
    assert stack.restart_plan("process", True, PROCESS, alive, []) == ["etcd", "minio", "operator"]


def test_a_dead_containerd_restarts_the_kubelet_after_it_but_a_dead_kubelet_restarts_alone() -> None:
    alive = [n for n in REAL if n != "containerd"]
    assert stack.restart_plan("real", True, REAL, alive, []) == ["containerd", "kubelet"]
    alive = [n for n in REAL if n not in ("kubelet", "pod-binder")]
    assert stack.restart_plan("real", True, REAL, alive, []) == ["kubelet", "pod-binder"]


def test_s3_servers_stopped_on_purpose_start_again() -> None:
    recorded = [n for n in PROCESS if n != "minio-replica"]
    assert stack.restart_plan("process", True, recorded, recorded, ["minio-replica"]) == ["minio-replica"]


def test_the_operator_starts_when_asked_for_and_a_dead_one_restarts_even_without() -> None:
    no_op = stack.components("process", False)
    assert stack.restart_plan("process", True, no_op, no_op, []) == ["operator"]
    assert stack.restart_plan("process", False, no_op, no_op, []) == []
    alive = [n for n in PROCESS if n != "operator"]
    assert stack.restart_plan("process", False, PROCESS, alive, []) == ["operator"]


def test_a_stack_without_a_provisioner_gets_one() -> None:
    older = [n for n in PROCESS if n != "provisioner"]
    assert stack.restart_plan("process", True, older, older, []) == ["provisioner"]


def test_a_record_missing_a_core_process_is_not_restarted_in_place() -> None:
    partial = ["etcd", "kube-apiserver"]  # an `up` interrupted half way
    with pytest.raises(stack.StackError, match="no kube-controller-manager"):
        stack.restart_plan("process", True, partial, partial, [])


def test_a_dead_process_this_version_does_not_know_is_not_restarted_in_place() -> None:
    with pytest.raises(stack.StackError, match="does not know: old-thing"):
        stack.restart_plan("process", True, [*PROCESS, "old-thing"], PROCESS, [])


def _state(tmp_path: Path, node: str = "process") -> stack.State:
    """A recorded stack with every file and record a restart in place needs."""
    d = tmp_path / "stack"
    pg = tmp_path / "nightjar-pg-x"
    for sub in ("pki/apiserver", "etcd", "s3", "s3-replica"):
        (d / sub).mkdir(parents=True)
    (pg / "data").mkdir(parents=True)
    (pg / "data" / "PG_VERSION").write_text("17\n")
    names = [
        "kubeconfig",
        "pki/token",
        "pki/tokens.csv",
        "pki/sa.key",
        "pki/sa.pub",
        "pki/apiserver/apiserver.crt",
    ]
    for f in names:
        (d / f).write_text("x")
    st = stack.State(dir=str(d), node=node, pg_datadir=str(pg), pg_password="pw")
    st.ports = {
        k: 10000 + i
        for i, k in enumerate(
            ["etcd", "etcd_peer", "apiserver", "controller_manager", "postgres", "s3", "s3_replica"]
        )
    }
    st.s3_keys = {w: {"access_key": "a", "secret_key": "s"} for w in stack.S3_SERVERS}
    return st


def test_a_complete_record_can_restart_every_process(tmp_path: Path) -> None:
    assert stack.restart_blockers(_state(tmp_path), PROCESS) == []


def test_missing_pki_data_ports_or_keys_block_a_restart_in_place(tmp_path: Path) -> None:
    st = _state(tmp_path)
    (st.path / "pki" / "sa.key").unlink()
    del st.ports["controller_manager"]
    del st.s3_keys["replica"]
    (Path(st.pg_datadir) / "data" / "PG_VERSION").unlink()
    problems = stack.restart_blockers(st, PROCESS)
    assert any("sa.key is missing" in p for p in problems)
    assert "its record has no port controller_manager" in problems
    assert "its record has no keys for S3 server replica" in problems
    assert any("PG_VERSION is missing" in p for p in problems)
    # What is not restarted does not need its records: only the PKI blocks restarting the operator.
    assert [p for p in stack.restart_blockers(st, ["operator"]) if "sa.key" not in p] == []


def test_a_real_node_needs_its_record_and_certificates(tmp_path: Path) -> None:
    problems = stack.restart_blockers(_state(tmp_path, node="real"), ["kubelet"])
    assert "its record of the real node is incomplete" in problems
    assert any("ca.crt is missing" in p for p in problems)


def test_a_port_held_by_another_socket_is_not_free() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not stack._port_free("127.0.0.1", port)
    assert stack._port_free("127.0.0.1", port)
    with pytest.raises(OSError, match="assign"):
        stack._port_free("192.0.2.1", port)  # no address of this machine


def test_what_is_left_of_a_dead_process_group_is_killed(tmp_path: Path) -> None:
    # A leader that dies and leaves a child behind in its group, as a SIGKILLed postmaster does.
    leader = subprocess.Popen(
        ["bash", "-c", "sleep 300 & echo $! > child; exec sleep 300"], cwd=tmp_path, start_new_session=True
    )
    deadline = time.monotonic() + 10
    while not (tmp_path / "child").is_file() or not (tmp_path / "child").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int((tmp_path / "child").read_text())
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait()
    assert stack._group_members(leader.pid) == [child]
    stack._kill_group_leftovers(stack.Proc(name="x", pid=leader.pid, exe="/bin/sleep"))
    assert stack._group_members(leader.pid) == []


def test_a_recycled_pid_is_not_signalled() -> None:
    # The recorded pid now runs another program (here: this test): its group is left alone.
    stack._kill_group_leftovers(stack.Proc(name="x", pid=os.getpid(), exe="/bin/sleep"), timeout=0)
    assert stack._group_members(os.getpgid(0))


def test_up_on_a_stack_of_another_node_kind_asks_for_down_then_up(tmp_path: Path) -> None:
    st = _state(tmp_path)
    st.save()
    with pytest.raises(
        stack.StackError, match=r"runs the process node, not the real node.*make down.*make up"
    ):
        stack.Stack(st.path, out=lambda _: None)._resume(st, [], True, "real")


def test_up_on_an_incomplete_record_asks_and_wipes_nothing(tmp_path: Path) -> None:
    st = _state(tmp_path)
    st.procs = [stack.Proc(name="etcd", pid=2**22 + 1, exe="/bin/false")]
    st.save()
    with pytest.raises(stack.StackError, match=r"cannot be restarted in place.*make down"):
        stack.Stack(st.path, out=lambda _: None).up(with_operator=True, node="process")
    assert (st.path / "state.json").is_file() and (st.path / "pki" / "sa.key").is_file()


def test_restart_needs_a_stack_with_an_operator(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["restart", "--state", str(tmp_path)])
    assert res.exit_code == 1 and "no stack in" in res.output
    st = _state(tmp_path)
    st.procs = [stack.Proc(name="etcd", pid=os.getpid(), exe=sys.executable)]
    st.save()
    res = CliRunner().invoke(main, ["restart", "--state", str(st.path)])
    assert res.exit_code == 1 and "--no-operator" in res.output
    st.procs.append(stack.Proc(name="operator", pid=os.getpid(), exe=sys.executable))
    st.procs.append(stack.Proc(name="minio", pid=2**22 + 1, exe="/bin/false"))
    st.save()
    res = CliRunner().invoke(main, ["restart", "--state", str(st.path)])
    assert res.exit_code == 1 and "minio of the stack" in res.output and "`up` restarts them" in res.output
