"""``python -m nightjar.devstack demo``: a demo app on the local stack to back up and restore by
copy-paste (``make demo``). TEST/DEV ONLY.

In one namespace (``shop``, as in ``examples/``) it makes, idempotently (a second run changes
nothing the first made and prints the steps again):

* a database and a role of the stack's PostgreSQL (``shop``/``shop`` for the namespace ``shop``)
  with three tables of rows, and the Secret ``shop-db`` naming it by the address Pods reach
  (the node IP on the real node);
* the PVC ``shop-files`` of the default StorageClass (the stack's provisioner makes its volume),
  with files under ``data/files`` written through the volume's host path, owned by the agent's
  uid when run as root (a restore replaces them);
* the Deployment ``shop`` (a ``sleep`` with the PVC mounted, annotated with a model version);
* the Secret ``s3-creds`` and the BackupStorage ``primary`` on the stack's primary MinIO.

``examples/backupstorage.yaml`` names AWS and ``examples/backup.yaml`` carries a Secret of
placeholders, so they do not apply here as they are: the demo makes their equivalents, and
``examples/demo/`` holds the Backup (``examples/backup.yaml``'s own) and a Restore to apply.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client.rest import ApiException

from nightjar.devstack.stack import REPO_ROOT, StackError, parse_env

G, V = "nightjar.dev", "v1alpha1"
DB_SECRET = "shop-db"  # noqa: S105 - a Secret's name
S3_SECRET = "s3-creds"  # noqa: S105 - a Secret's name
CLAIM = "shop-files"
FILES_PATH = "data/files"
APP = "shop"
STORAGE = "primary"
MODEL_VERSION = "10.4.1"
EXAMPLES = REPO_ROOT / "examples" / "demo"


@dataclass
class Demo:
    """What the demo made: enough for the instructions and for a test to check a restore."""

    namespace: str
    db: str
    dsn: str  # the demo role's, from this host
    psql: str
    files: Path  # <volume>/data/files on this host
    bind_seconds: float


def _psql(psql: str, dsn: str, sql: str) -> str:
    res = subprocess.run(
        [psql, dsn, "-v", "ON_ERROR_STOP=1", "-Atqc", sql], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise StackError(f"psql failed: {res.stderr.strip()}")
    return res.stdout.strip()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except ApiException as e:
            if e.status != 404:
                raise
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready after {timeout:.0f}s")
        time.sleep(0.2)


def _create(create: Callable[..., Any], *args: Any) -> bool:
    """Create an object; False when it exists already (left as it is)."""
    try:
        create(*args)
        return True
    except ApiException as e:
        if e.status != 409:
            raise
        return False


def _apply_secret(core: Any, ns: str, name: str, data: dict[str, str]) -> None:
    body = {"metadata": {"name": name}, "stringData": data}
    if not _create(core.create_namespaced_secret, ns, body):
        core.patch_namespaced_secret(name, ns, body)


def _database(env: dict[str, str], core: Any, ns: str, db: str, fresh: bool) -> tuple[str, str]:
    """The role and database ``db`` with its rows (made again when ``fresh``: the namespace is
    new, so what an earlier demo in a namespace of that name left goes); returns (psql, the role's
    DSN)."""
    psql = os.path.join(env["NIGHTJAR_PG_BINDIR"], "psql")
    admin = env["NIGHTJAR_PG_DSN"]
    if fresh:
        _psql(psql, admin, f"drop database if exists {_ident(db)} with (force)")
    password = ""
    try:
        sec = core.read_namespaced_secret(DB_SECRET, ns)
        password = _decode((sec.data or {}).get("password", ""))
    except ApiException as e:
        if e.status != 404:
            raise
    password = password or secrets.token_hex(12)
    _psql(
        psql,
        admin,
        f"do $$ begin if not exists (select from pg_roles where rolname = {_literal(db)}) then "
        f"create role {_ident(db)} login; end if; end $$; "
        f"alter role {_ident(db)} login password {_literal(password)}",
    )
    exists = f"select 1 from pg_database where datname = {_literal(db)}"  # noqa: S608 - quoted
    if not _psql(psql, admin, exists):
        _psql(psql, admin, f"create database {_ident(db)} owner {_ident(db)}")
    host, port = env["NIGHTJAR_PG_HOST"], env["NIGHTJAR_PG_PORT"]
    dsn = f"postgresql://{db}:{password}@{host}:{port}/{db}"
    _psql(
        psql,
        dsn,
        "create table if not exists customers (id int primary key, name text not null, city text);"
        " create table if not exists products (id int primary key, title text not null, price numeric(8,2));"
        " create table if not exists orders (id int primary key, customer int references customers,"
        " product int references products, quantity int, placed timestamptz);"
        " insert into customers select g, 'customer ' || g, (array['Utrecht','Delft','Gent'])[1 + g % 3]"
        " from generate_series(1, 100) g where not exists (select from customers);"
        " insert into products select g, 'product ' || g, (g * 2.5)::numeric(8,2)"
        " from generate_series(1, 20) g where not exists (select from products);"
        " insert into orders select g, 1 + g % 100, 1 + g % 20, 1 + g % 4,"
        " '2026-01-01'::timestamptz + g * interval '1 hour'"
        " from generate_series(1, 1000) g where not exists (select from orders);",
    )
    _apply_secret(
        core,
        ns,
        DB_SECRET,
        {"host": host, "port": port, "dbname": db, "user": db, "password": password},
    )
    return psql, dsn


def _decode(b64: str) -> str:
    import base64

    return base64.b64decode(b64).decode() if b64 else ""


def _claim(core: Any, ns: str) -> tuple[Path, float]:
    """The PVC of the default class, bound; returns its volume's host path and how long binding took."""
    t = time.monotonic()
    _create(
        core.create_namespaced_persistent_volume_claim,
        ns,
        {
            "metadata": {"name": CLAIM},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    pvc = _wait(
        f"PVC {ns}/{CLAIM} bound (the stack's provisioner: logs/provisioner.log)",
        lambda: (c := core.read_namespaced_persistent_volume_claim(CLAIM, ns)).status.phase == "Bound" and c,
        60,
    )
    took = time.monotonic() - t
    pv = core.read_persistent_volume(pvc.spec.volume_name)
    if pv.spec.host_path is None:
        raise StackError(
            f"PV {pv.metadata.name} of {ns}/{CLAIM} is no hostPath volume: the demo cannot fill it"
        )
    return Path(pv.spec.host_path.path), took


def _files(volume: Path, uid: int) -> Path:
    """A few documents under ``data/files`` (written once), owned by ``uid`` when run as root."""
    files = volume / FILES_PATH
    if not files.is_dir():
        for i in range(1, 13):
            d = files / "invoices" / f"2026-{1 + i % 3:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"invoice-{i:04d}.txt").write_text(f"Invoice {i}\nTotal: EUR {i * 12.5:.2f}\n")
        (files / "images").mkdir()
        for i in range(1, 6):
            (files / "images" / f"product-{i}.bin").write_bytes(
                hashlib.sha256(str(i).encode()).digest() * 512
            )
        (files / "README.txt").write_text("The shop's documents, backed up by Nightjar.\n")
    if os.geteuid() == 0:
        # A hostPath volume gets no fsGroup: the agent (and the app) run as this uid.
        for root, dirs, names in os.walk(volume / "data"):
            os.chown(root, uid, uid)
            for n in dirs + names:
                os.chown(os.path.join(root, n), uid, uid, follow_symlinks=False)
    return files


def _deployment(node: str, uid: int) -> dict[str, Any]:
    if node == "real":
        from nightjar.devstack import realnode

        image: dict[str, str] = {"image": realnode.PROJECT_IMAGE, "imagePullPolicy": "Never"}
    else:
        image = {"image": "shop"}  # the process node runs the command on its host whatever the image
    return {
        "metadata": {"name": APP, "annotations": {"nightjar.dev/model-version": MODEL_VERSION}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": APP}},
            "template": {
                "metadata": {"labels": {"app": APP}},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid},
                    "containers": [
                        {
                            "name": "app",
                            **image,
                            "command": ["sleep", "infinity"],
                            "volumeMounts": [{"name": "files", "mountPath": "/var/lib/shop"}],
                        }
                    ],
                    "volumes": [{"name": "files", "persistentVolumeClaim": {"claimName": CLAIM}}],
                },
            },
        },
    }


def _storage(core: Any, custom: Any, env: dict[str, str], ns: str) -> None:
    _apply_secret(
        core,
        ns,
        S3_SECRET,
        {
            "AWS_ACCESS_KEY_ID": env["NIGHTJAR_S3_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_SECRET_KEY"],
        },
    )
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": "BackupStorage",
        "metadata": {"name": STORAGE},
        "spec": {
            "endpoint": env["NIGHTJAR_S3_ENDPOINT"],
            "bucket": env["NIGHTJAR_S3_BUCKET_PLAIN"],
            "region": env["NIGHTJAR_S3_REGION"],
            "prefix": f"demo/{ns}",
            "credentials": {"secretName": S3_SECRET},
            "objectLock": {"mode": "None"},
            "jurisdiction": "EU",
        },
    }
    if not _create(custom.create_namespaced_custom_object, G, V, ns, "backupstorages", body):
        custom.patch_namespaced_custom_object(G, V, ns, "backupstorages", STORAGE, {"spec": body["spec"]})


def run(state_dir: Path, namespace: str = "shop", out: Callable[[str], None] = print) -> Demo:
    """Make (or find) the demo in ``namespace`` of the stack in ``state_dir``."""
    from kubernetes import client, config

    from nightjar.config import OperatorConfig

    envf = state_dir / "env"
    if not envf.is_file():
        raise StackError(f"no stack in {state_dir} (no {envf}): start one with `make up`")
    env = parse_env(envf)
    api = config.new_client_from_config(env["KUBECONFIG"])
    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    uid = OperatorConfig.agent_run_as_user
    t = time.monotonic()

    if _create(core.create_namespace, {"metadata": {"name": namespace}}):
        fresh = True
    else:
        fresh = False
        if core.read_namespace(namespace).status.phase == "Terminating":
            raise StackError(f"namespace {namespace} is being deleted: run the demo again once it is gone")
    # Pods need the namespace's "default" ServiceAccount, made a moment after the namespace.
    _wait(
        f"ServiceAccount {namespace}/default",
        lambda: core.read_namespaced_service_account("default", namespace),
        30,
    )
    db = namespace.replace("-", "_")
    psql, dsn = _database(env, core, namespace, db, fresh)
    out(
        f"  database      {db} (role {db}) on {env['NIGHTJAR_PG_HOST']}:{env['NIGHTJAR_PG_PORT']}; "
        f"Secret {DB_SECRET}"
    )
    volume, bind_seconds = _claim(core, namespace)
    files = _files(volume, uid)
    out(f"  PVC           {CLAIM} bound in {bind_seconds:.1f}s; files in {files}")
    if _create(apps.create_namespaced_deployment, namespace, _deployment(env.get("NIGHTJAR_NODE", ""), uid)):
        out(f"  Deployment    {APP} (model version {MODEL_VERSION})")
    _storage(core, custom, env, namespace)
    out(f"  BackupStorage {STORAGE}: {env['NIGHTJAR_S3_ENDPOINT']} bucket {env['NIGHTJAR_S3_BUCKET_PLAIN']}")

    def storage_ready() -> bool:
        obj = custom.get_namespaced_custom_object(G, V, namespace, "backupstorages", STORAGE)
        return (obj.get("status") or {}).get("phase") == "Ready"

    def app_ready() -> bool:
        return bool(apps.read_namespaced_deployment(APP, namespace).status.ready_replicas)

    for what, check in ((f"BackupStorage {STORAGE}", storage_ready), (f"Deployment {APP}", app_ready)):
        try:
            _wait(what, check, 90)
        except StackError as e:
            out(f"  WARNING: {e} (is the operator up? `make status`; logs in {state_dir / 'logs'})")
    out(f"Demo ready in namespace {namespace} ({time.monotonic() - t:.1f}s).")
    return Demo(namespace, db, dsn, psql, files, bind_seconds)


def instructions(demo: Demo, state_dir: Path) -> str:
    """The copy-paste steps from here to a Completed backup and a restore."""
    ns, q = demo.namespace, shlex.quote
    rel = os.path.relpath(state_dir.resolve() / "kubeconfig", Path.cwd())
    kubeconfig = f"$PWD/{rel}" if not rel.startswith("..") else str(state_dir.resolve() / "kubeconfig")
    backup = os.path.relpath(EXAMPLES / "backup.yaml", Path.cwd())
    restore = os.path.relpath(EXAMPLES / "restore.yaml", Path.cwd())
    return f"""
Back it up and restore it (copy-paste; kubectl is yours or $NIGHTJAR_KUBECTL from {state_dir}/env):

  export KUBECONFIG={kubeconfig}
  kubectl -n {ns} get backupstorages        # primary: Ready
  kubectl -n {ns} apply -f {backup}
  kubectl -n {ns} get backups -w            # before-upgrade: Completed (Ctrl-C)

  # An accident: orders and invoices gone (the database and the PVC's files, seen from this host).
  psql={q(demo.psql)} db={q(demo.dsn)}
  files={q(str(demo.files))}
  $psql "$db" -c 'delete from orders where id > 100'
  rm -r "$files/invoices"
  $psql "$db" -c 'select count(*) from orders'; ls "$files"

  kubectl -n {ns} apply -f {restore}
  kubectl -n {ns} get restores -w           # after-the-accident: Completed (Ctrl-C)

  # Back as they were: 1000 orders, the invoices.
  $psql "$db" -c 'select count(*) from orders'; ls -R "$files"

Again from the start: kubectl delete namespace {ns}, then the demo again.
"""  # noqa: S608 - shell lines for a person, not a query
