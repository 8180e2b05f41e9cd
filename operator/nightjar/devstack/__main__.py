"""``python -m nightjar.devstack {up,down,status,s3,node,bind,provision,demo,chaos}`` — TEST/DEV ONLY (see the
package doc)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from nightjar.devstack.stack import NODE_KINDS, NODE_NAME, S3_SERVERS, Stack, StackError, describe


def _state_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--state",
        "state_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("NIGHTJAR_STATE_DIR", ".local"),
        show_default=".local",
        help="Directory holding the stack's state, logs and kubeconfig.",
    )(f)


@click.group()
def main() -> None:
    """The local stack for development and tests (not for production)."""


@main.command()
@_state_option
@click.option("--operator/--no-operator", default=True, help="Also start the Nightjar operator.")
@click.option(
    "--node",
    type=click.Choice(NODE_KINDS),
    default=lambda: os.environ.get("NIGHTJAR_NODE", "process"),
    show_default="process",
    help="What runs the Pods: the process node (local processes), or a real kubelet with containerd "
    "(root; installs Debian's containerd, runc and CNI plugins when missing).",
)
def up(state_dir: Path, operator: bool, node: str) -> None:
    """Start etcd, kube-apiserver, kube-controller-manager, a node, two MinIOs, PostgreSQL."""
    stack = Stack(state_dir)
    try:
        stack.up(with_operator=operator, node=node)
    except StackError as e:
        raise click.ClickException(str(e)) from e
    click.echo(stack.usage())


@main.command()
@_state_option
def down(state_dir: Path) -> None:
    """Stop exactly the processes `up` started (by recorded pid)."""
    Stack(state_dir).down()


@main.command()
@_state_option
def restart(state_dir: Path) -> None:
    """Restart the operator of a running stack alone (to run changed code); the rest keeps running."""
    stack = Stack(state_dir)

    def pids() -> str:
        st = stack.status()[0]
        return ", ".join(str(p.pid) for p in st.procs if p.name == "operator") if st else ""

    old = pids()
    try:
        stack.restart_operator()
    except StackError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"Restarted the operator of the stack in {stack.dir} (pid {old or '-'} -> {pids()}).")


@main.command()
@_state_option
def status(state_dir: Path) -> None:
    """Show each recorded process and whether it runs; exits 1 unless all run (an S3 server
    stopped with `s3 stop` is shown as stopped and does not count)."""
    st, alive, dead = Stack(state_dir).status()
    click.echo(describe(st, alive, dead))
    sys.exit(0 if st is not None and not dead else 1)


@main.group()
def s3() -> None:
    """Stop or start one S3 server (primary or replica) of a running stack."""


_WHICH = click.argument("which", type=click.Choice(list(S3_SERVERS)))


@s3.command("stop")
@_WHICH
@_state_option
def s3_stop(which: str, state_dir: Path) -> None:
    """Kill the S3 server WHICH: its endpoint refuses connections until `s3 start`."""
    try:
        Stack(state_dir).stop_s3(which)
    except StackError as e:
        raise click.ClickException(str(e)) from e


@s3.command("start")
@_WHICH
@_state_option
def s3_start(which: str, state_dir: Path) -> None:
    """Start the S3 server WHICH again (same port, data and keys) and wait until it serves."""
    try:
        Stack(state_dir).start_s3(which)
    except StackError as e:
        raise click.ClickException(str(e)) from e


@main.command()
@_state_option
@click.option("--name", default=NODE_NAME, show_default=True)
def node(state_dir: Path, name: str) -> None:
    """Run the process node (what `up` starts in the background)."""
    from kubernetes import client, config

    from nightjar.devstack.processnode import ProcessNode

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = state_dir.resolve()
    api_client = config.new_client_from_config(str(state_dir / "kubeconfig"))
    host = api_client.configuration.host.removeprefix("https://")
    api_host, api_port = host.rsplit(":", 1)
    venv_bin = Path(sys.executable).parent
    # The venv first, so containers find `nightjar` and the venv's python like an image's PATH.
    os.environ["PATH"] = f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    pn = ProcessNode(
        client.CoreV1Api(api_client),
        name,
        state_dir / "node",
        entrypoints={"nightjar": [str(venv_bin / "nightjar")]},
        api_host=api_host,
        api_port=int(api_port),
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("nightjar.processnode").info("signal %d: killing all containers", signum)
        pn.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pn.run()


@main.command()
@_state_option
def bind(state_dir: Path) -> None:
    """Bind pending Pods to the real node (what `up --node real` starts in the background)."""
    from kubernetes import client, config

    from nightjar.devstack.realnode import NODE_NAME as REAL_NODE_NAME
    from nightjar.devstack.realnode import bind_pods

    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    api = client.CoreV1Api(config.new_client_from_config(str(state_dir.resolve() / "kubeconfig")))
    bind_pods(api, REAL_NODE_NAME, stop=lambda: bool(stopping))


@main.command()
@_state_option
def provision(state_dir: Path) -> None:
    """Provision the default StorageClass's volumes (what `up` starts in the background)."""
    from nightjar.devstack import provisioner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))
    state_dir = state_dir.resolve()
    provisioner.run(state_dir / "kubeconfig", state_dir / "volumes", stop=lambda: bool(stopping))


@main.command()
@_state_option
@click.option("--namespace", default="shop", show_default=True, help="Where the demo app goes.")
def demo(state_dir: Path, namespace: str) -> None:
    """A demo app on the running stack (database, PVC with files, BackupStorage) and the copy-paste
    steps to back it up and restore it."""
    from nightjar.devstack import demo as demo_app

    try:
        made = demo_app.run(state_dir, namespace, out=click.echo)
    except StackError as e:
        raise click.ClickException(str(e)) from e
    click.echo(demo_app.instructions(made, state_dir))


@main.command()
@_state_option
@click.option("--faults", default=200, show_default=True, help="How many faults to inject.")
@click.option(
    "--seed", type=int, default=None, help="The seed of the faults and operations (random if not set)."
)
@click.option("--lanes", default=3, show_default=True, help="Namespaces working side by side.")
@click.option(
    "--settle",
    default=300.0,
    show_default=True,
    help="Seconds to wait, after the last fault, for every Backup to end (its deadline).",
)
def chaos(state_dir: Path, faults: int, seed: int | None, lanes: int, settle: float) -> None:
    """Inject faults into the running stack while Backups, Restores, replications and GC run, then
    check the invariants; exits 1 on any violation. Prints the seed that replays it."""
    from nightjar.devstack.chaos.run import run
    from nightjar.devstack.chaos.workload import ChaosError

    try:
        rc = run(state_dir, faults, seed, lanes, settle, out=click.echo)
    except (ChaosError, StackError) as e:
        raise click.ClickException(str(e)) from e
    sys.exit(rc)


if __name__ == "__main__":
    main()
