"""`make up` / `make down` / `make restart` semantics on second, private stacks: idempotent up, a down
that leaves no process behind (checked by the recorded pids and by command line), an up that restarts
only what died (same ports, keys and data), a restart of the operator alone; and, on the shared
stack, a namespace holding a bound PVC that finishes deleting (the PVC and PV protection controllers)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

from click.testing import CliRunner
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from nightjar.devstack.__main__ import main
from nightjar.devstack.stack import BUCKET_PLAIN, Stack, State, parse_env
from tests.integration.helpers import psql
from tests.support import hostpath_claim, running, wait_for


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes() and running(int(d.name)):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


def test_up_is_idempotent_and_down_stops_every_process_it_started(tmp_path: Path) -> None:
    lines: list[str] = []
    stack = Stack(tmp_path / "stack", out=lines.append)
    try:
        first = stack.up(with_operator=True)
        pids = {p.name: p.pid for p in first.procs}
        assert set(pids) == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "postgres",
            "minio",
            "minio-replica",
            "process-node",
            "provisioner",
            "operator",
        }
        assert all(running(pid) for pid in pids.values())

        lines.clear()
        again = stack.up(with_operator=True)
        assert any("already up" in line and "nothing changed" in line for line in lines)
        assert {p.name: p.pid for p in again.procs} == pids
    finally:
        stopped = stack.down(quiet=True)
    assert stopped == 9
    assert [name for name, pid in pids.items() if running(pid)] == []
    assert _processes_mentioning(str(tmp_path / "stack")) == []
    assert State.load(tmp_path / "stack") is None
    assert not Path(first.pg_datadir).exists()


def _pids(st: State) -> dict[str, int]:
    return {p.name: p.pid for p in st.procs}


def test_up_restarts_only_what_died_and_keeps_ports_keys_and_data(tmp_path: Path) -> None:
    lines: list[str] = []
    stack = Stack(tmp_path / "stack", out=lines.append)
    try:
        t = time.monotonic()
        first = stack.up(with_operator=True, node="process")
        fresh_s = time.monotonic() - t
        env = parse_env(stack.dir / "env")
        kubeconfig = (stack.dir / "kubeconfig").read_bytes()
        before = _pids(first)
        psql(env, "postgres", "create table kept (v text); insert into kept values ('before the crash')")
        stack.s3_store("primary", BUCKET_PLAIN, first).put("kept/object", b"before the crash")
        api = config.new_client_from_config(str(stack.dir / "kubeconfig"))
        client.CoreV1Api(api).create_namespace({"metadata": {"name": "kept"}})

        # kill -9, as a crash would: the controller manager, the primary S3 server and PostgreSQL.
        crashed = ("kube-controller-manager", "minio", "postgres")
        for name in crashed:
            _kill9(before[name])
        lines.clear()
        t = time.monotonic()
        again = stack.up(with_operator=True, node="process")
        restart_s = time.monotonic() - t
        after = _pids(again)
        assert set(after) == set(before)
        assert {n for n in before if after[n] != before[n]} == set(crashed)
        assert all(running(pid) for pid in after.values())
        assert any(
            line.startswith("Restarted kube-controller-manager, postgres, minio (they had died); data kept")
            for line in lines
        ), lines
        assert again.ports == first.ports
        assert again.s3_keys == first.s3_keys and again.pg_password == first.pg_password
        assert again.pg_datadir == first.pg_datadir
        assert parse_env(stack.dir / "env") == env
        assert (stack.dir / "kubeconfig").read_bytes() == kubeconfig
        assert psql(env, "postgres", "select v from kept") == "before the crash"
        assert stack.s3_store("primary", BUCKET_PLAIN).read("kept/object") == b"before the crash"
        # The controller manager serves again (the namespace controller finishes a deletion).
        client.CoreV1Api(api).delete_namespace("kept")
        wait_for("namespace kept to go", lambda: "kept" not in _namespaces(api), 30)

        # etcd: the API server reconnects and everything written before is still there.
        client.CoreV1Api(api).create_namespace({"metadata": {"name": "kept-in-etcd"}})
        _kill9(after["etcd"])
        lines.clear()
        third = stack.up(with_operator=True, node="process")
        assert {n for n, pid in _pids(third).items() if after[n] != pid} == {"etcd"}
        assert any(line.startswith("Restarted etcd (it had died); data kept") for line in lines), lines
        assert third.ports == first.ports
        assert "kept-in-etcd" in _namespaces(api)

        # `restart`: the operator alone, with a new pid.
        res = CliRunner().invoke(main, ["restart", "--state", str(stack.dir)])
        assert res.exit_code == 0, res.output
        fourth = State.load(stack.dir)
        assert fourth is not None
        new = _pids(fourth)
        assert {n for n, pid in new.items() if _pids(third)[n] != pid} == {"operator"}
        assert f"(pid {after['operator']} -> {new['operator']})" in res.output
        assert running(new["operator"]) and not running(after["operator"])
        print(f"\nfresh up {fresh_s:.1f}s; up restarting 3 dead components {restart_s:.1f}s")
    finally:
        stack.down(quiet=True)
    assert _processes_mentioning(str(tmp_path / "stack")) == []


def _kill9(pid: int) -> None:
    """SIGKILL, and wait until the process is gone (a dying process still reads as running a moment)."""
    os.kill(pid, signal.SIGKILL)
    wait_for(f"pid {pid} to die", lambda: not running(pid), 10, interval=0.05)


def _namespaces(api: client.ApiClient) -> set[str]:
    return {ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items}


def test_restart_refuses_a_stack_without_an_operator(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["restart", "--state", str(tmp_path / "none")])
    assert res.exit_code == 1 and "no stack in" in res.output


def test_a_namespace_holding_a_bound_claim_is_deleted_completely(
    core: client.CoreV1Api, tmp_path: Path
) -> None:
    ns = f"t-pvc-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    (tmp_path / "data").mkdir()
    pv = hostpath_claim(core, ns, "data", tmp_path / "data")
    try:
        claim = core.read_namespaced_persistent_volume_claim("data", ns)
        assert "kubernetes.io/pvc-protection" in (claim.metadata.finalizers or [])
        t = time.monotonic()
        core.delete_namespace(ns)

        def gone() -> bool:
            try:
                core.read_namespace(ns)
            except ApiException as e:
                return e.status == 404
            return False

        wait_for(f"namespace {ns} (holding a bound PVC) to be deleted", gone, 30)
        print(f"\nnamespace with a bound PVC deleted in {time.monotonic() - t:.1f}s")
        # The volume is Released (Retain); pv-protection lets it go once deleted.
        core.delete_persistent_volume(pv)
        wait_for(
            f"PV {pv} to be deleted",
            lambda: pv not in {v.metadata.name for v in core.list_persistent_volume().items},
            30,
        )
    finally:
        with contextlib.suppress(ApiException):
            core.delete_namespace(ns)
        with contextlib.suppress(ApiException):
            core.delete_persistent_volume(pv)
