"""`make up` / `make down` semantics on a second, private stack: idempotent up, and a down that
leaves no process behind (checked by the recorded pids and by command line)."""

from __future__ import annotations

import os
from pathlib import Path

from nightjar.devstack.stack import Stack, State
from tests.support import running


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
            "operator",
        }
        assert all(running(pid) for pid in pids.values())

        lines.clear()
        again = stack.up(with_operator=True)
        assert any("already up" in line and "nothing changed" in line for line in lines)
        assert {p.name: p.pid for p in again.procs} == pids
    finally:
        stopped = stack.down(quiet=True)
    assert stopped == 8
    assert [name for name, pid in pids.items() if running(pid)] == []
    assert _processes_mentioning(str(tmp_path / "stack")) == []
    assert State.load(tmp_path / "stack") is None
    assert not Path(first.pg_datadir).exists()
