"""Every YAML in examples/ is applied with kubectl to the chart-installed operator and reaches its
expected state. Only what names this machine is replaced (S3 endpoint and keys, database host and
password); names, namespaces, references and options are the examples' own.

Also: the metrics endpoint shows the backup counters moving, and a Backup in a namespace the
release does not watch is left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar.constants import LABEL_BACKUP, LABEL_REPLICATION, LABEL_RESTORE
from nightjar.devstack import realnode
from tests.e2e.conftest import CHART, OUTSIDER, REPO, SYSTEM_NS, Release, kubectl, operator_pods
from tests.integration.helpers import TABLE_CHECKSUMS, psql
from tests.support import assert_runs_in_the_image, hostpath_claim, real_node, wait_for

G, V = "nightjar.dev", "v1alpha1"
EXAMPLES = REPO / "examples"
#: The order a user applies them in, and the state each kind must reach.
ORDER = ["backupstorage.yaml", "backup.yaml", "backupschedule.yaml", "restore.yaml"]


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(ORDER)


def app_deployment(ns: str, version: str) -> dict[str, Any]:
    """The app the examples name (Deployment "shop"), PodSecurity-restricted like its namespace."""
    return {
        "metadata": {"name": "shop", "namespace": ns, "annotations": {"nightjar.dev/model-version": version}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {
                "metadata": {"labels": {"app": "shop"}},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "app",
                            **app_image(),
                            "command": ["sleep", "3600"],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                },
            },
        },
    }


def app_image() -> dict[str, str]:
    """On the real node a container needs an image the node has: the built one stands in for the
    app. The process node runs the command on its host whatever the image."""
    if real_node():
        return {"image": realnode.PROJECT_IMAGE, "imagePullPolicy": "Never"}
    return {"image": "shop"}


class Site:
    """What the examples assume exists in a namespace: a database, a files PVC and the app."""

    def __init__(self, ns: str, db: str, password: str, files: Path) -> None:
        self.ns, self.db, self.password, self.files = ns, db, password, files


def make_site(
    env: dict[str, str], core: client.CoreV1Api, apps: client.AppsV1Api, ns: str, root: Path, seed: bool
) -> tuple[Site, str]:
    db = f"e2e_{ns.replace('-', '_')}_{uuid.uuid4().hex[:6]}"
    password = uuid.uuid4().hex
    psql(env, "postgres", f"create role {db} login password '{password}'")
    psql(env, "postgres", f"create database {db} owner {db}")
    files = root / "data" / "files"
    files.mkdir(parents=True)
    if seed:
        psql(
            env,
            db,
            f"set role {db}; create table customers (id int primary key, name text, note text);"
            " create table orders (id bigserial primary key, customer int references customers,"
            " total numeric);"
            " insert into customers select g, 'c' || g, repeat('n', g % 9)"
            " from generate_series(1, 300) g;"
            " insert into orders (customer, total)"
            " select 1 + g % 300, g * 1.5 from generate_series(1, 2000) g;",
        )
        for i in range(40):
            (files / f"{i % 4}").mkdir(exist_ok=True)
            (files / f"{i % 4}" / f"doc-{i}.bin").write_bytes(
                hashlib.sha256(str(i).encode()).digest() * (i + 1)
            )
    pv = hostpath_claim(core, ns, "shop-files", root)
    apps.create_namespaced_deployment(ns, app_deployment(ns, "10.4.1"))
    return Site(ns, db, password, files), pv


@pytest.fixture(scope="module")
def sites(
    release: Release,
    env: dict[str, str],
    core: client.CoreV1Api,
    apps: client.AppsV1Api,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Site, Site]]:
    prod, pv1 = make_site(env, core, apps, "shop", tmp_path_factory.mktemp("shop"), seed=True)
    acc, pv2 = make_site(env, core, apps, "shop-acceptance", tmp_path_factory.mktemp("acc"), seed=False)
    yield prod, acc
    for pv in (pv1, pv2):
        core.delete_persistent_volume(pv)
    for s in (prod, acc):
        psql(env, "postgres", f"drop database if exists {s.db} with (force)")


def localize(doc: dict[str, Any], env: dict[str, str], sites: dict[str, Site]) -> dict[str, Any]:
    """Replace what names a machine; nothing else."""
    kind, ns = doc["kind"], doc["metadata"].get("namespace", "")
    # The secondary location is the stack's second S3 server.
    server = "NIGHTJAR_S3_REPLICA_" if "secondary" in doc["metadata"]["name"] else "NIGHTJAR_S3_"
    if kind == "Secret" and "AWS_ACCESS_KEY_ID" in doc["stringData"]:
        doc["stringData"] = {
            "AWS_ACCESS_KEY_ID": env[f"{server}ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": env[f"{server}SECRET_KEY"],
        }
    elif kind == "Secret" and "password" in doc["stringData"]:
        site = sites[ns]
        doc["stringData"].update(
            host=env["NIGHTJAR_PG_HOST"],
            port=env["NIGHTJAR_PG_PORT"],
            dbname=site.db,
            user=site.db,
            password=site.password,
        )
    elif kind == "BackupStorage":
        doc["spec"].update(
            endpoint=env[f"{server}ENDPOINT"],
            bucket=env[f"{server}BUCKET_LOCKED"],
            region="us-east-1",
            prefix=f"e2e-{uuid.uuid4().hex[:8]}",
        )
    assert "REPLACE-ME" not in yaml.safe_dump(doc), (
        f"{kind} {doc['metadata']['name']} still has a placeholder"
    )
    return doc


def apply(env: dict[str, str], docs: list[dict[str, Any]]) -> None:
    out = kubectl(env, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    assert out.returncode == 0, out.stderr


def get(custom: client.CustomObjectsApi, plural: str, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_namespaced_custom_object(G, V, ns, plural, name)
    return obj


def phase_is(
    custom: client.CustomObjectsApi, plural: str, ns: str, name: str, *phases: str
) -> dict[str, Any] | None:
    obj = get(custom, plural, ns, name)
    return obj if (obj.get("status") or {}).get("phase") in phases else None


SAMPLE = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310  (our own http URL)
        text = r.read().decode()
    out = {}
    for m in SAMPLE.finditer(text):
        labels = frozenset(tuple(kv.split("=", 1)) for kv in re.findall(r'[a-z_]+="[^"]*"', m["labels"]))
        out[(m["name"], frozenset((k, v.strip('"')) for k, v in labels))] = float(m["value"])
    return out


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_examples_reach_their_expected_state(
    release: Release,
    sites: tuple[Site, Site],
    env: dict[str, str],
    custom: client.CustomObjectsApi,
    apps: client.AppsV1Api,
    core: client.CoreV1Api,
) -> None:
    prod, acc = sites
    by_ns = {prod.ns: prod, acc.ns: acc}
    before = scrape(release.metrics_url)
    docs = {
        name: [localize(d, env, by_ns) for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]
        for name in ORDER
    }

    apply(env, docs["backupstorage.yaml"])
    for storage in ("secondary", "primary"):
        wait_for(
            f"BackupStorage {storage} Ready",
            lambda s=storage: phase_is(custom, "backupstorages", "shop", s, "Ready"),
            60,
        )
    primary = get(custom, "backupstorages", "shop", "primary")
    assert primary["status"]["replicaSummary"] == "secondary (EU)"

    apply(env, docs["backup.yaml"])
    backup = wait_for(
        "Backup before-upgrade to finish",
        lambda: phase_is(custom, "backups", "shop", "before-upgrade", "Completed", "Failed"),
        180,
    )
    assert backup["status"]["phase"] == "Completed", backup["status"].get("message")
    assert backup["status"]["modelVersion"] == "10.4.1"
    assert backup["status"]["snapshotId"] and backup["status"]["sizeUncompressedBytes"] > 0
    # ... and then in its secondary location too, every object verified.
    backup = wait_for(
        "Backup before-upgrade in both locations",
        lambda: (
            (b := get(custom, "backups", "shop", "before-upgrade"))["status"].get("replication") == "2/2"
            and b
        ),
        120,
    )
    assert [loc["state"] for loc in backup["status"]["locations"]] == ["Replicated", "Replicated"]

    apply(env, docs["backupschedule.yaml"])
    schedule = wait_for(
        "BackupSchedule shop planned",
        lambda: (
            (s := get(custom, "backupschedules", "shop", "shop")).get("status", {}).get("nextBackupTime")
            and s
        ),
        60,
    )
    assert schedule["status"]["nextTier"] in ("Nightly", "Weekly", "Monthly")

    apply(env, docs["restore.yaml"])
    restore = wait_for(
        "Restore from-production to finish",
        lambda: phase_is(custom, "restores", "shop-acceptance", "from-production", "Completed", "Failed"),
        180,
    )
    assert restore["status"]["phase"] == "Completed", restore["status"].get("message")
    assert psql(env, acc.db, TABLE_CHECKSUMS) == psql(env, prod.db, TABLE_CHECKSUMS)
    assert sorted(p.relative_to(acc.files) for p in acc.files.rglob("*")) == sorted(
        p.relative_to(prod.files) for p in prod.files.rglob("*")
    )
    # The app was stopped for the restore and has its replica back.
    assert apps.read_namespaced_deployment("shop", "shop-acceptance").spec.replicas == 1

    # The metrics endpoint saw it all.
    after = scrape(release.metrics_url)
    for phase in ("Running", "Completed"):
        moved = total(after, "nightjar_backups_total", namespace="shop", phase=phase) - total(
            before, "nightjar_backups_total", namespace="shop", phase=phase
        )
        assert moved >= 1, f"nightjar_backups_total{{phase={phase}}} did not move"
    assert total(after, "nightjar_restores_total", namespace="shop-acceptance", phase="Completed") >= 1
    assert total(after, "nightjar_last_successful_backup_timestamp_seconds", namespace="shop") > 0

    if real_node():
        jobs = {
            ("shop", f"{LABEL_BACKUP}=before-upgrade"),
            ("shop", f"{LABEL_REPLICATION}=before-upgrade"),
            ("shop-acceptance", f"{LABEL_RESTORE}=from-production"),
        }
        for ns, selector in sorted(jobs):
            pods = [
                p
                for p in core.list_namespaced_pod(ns, label_selector=selector).items
                if p.status.phase == "Succeeded"
            ]
            assert pods, f"no finished Pod in {ns} with {selector}"
            print(assert_runs_in_the_image(pods[-1]))
        assert_operator_runs_in_the_image(env, core)


def assert_operator_runs_in_the_image(env: dict[str, str], core: client.CoreV1Api) -> None:
    """The chart's operator Pod is a container of the built image under the kubelet, as uid 65532
    on a read-only root filesystem with the chart's resources, talking to the API server with the
    ServiceAccount token the kubelet projected into it."""
    (pod,) = operator_pods(core)
    (status,) = pod.status.container_statuses
    assert status.container_id.startswith("containerd://") and status.ready
    assert status.image_id == realnode.PROJECT_IMAGE_ID.read_text().strip()
    (container,) = pod.spec.containers
    chart = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["operator"]["resources"]
    assert container.resources.requests == chart["requests"]
    assert container.resources.limits == chart["limits"]
    assert any(v.projected and v.name.startswith("kube-api-access-") for v in pod.spec.volumes)
    name = ["-n", SYSTEM_NS, pod.metadata.name, "--"]
    out = kubectl(env, "exec", *name, "id", "-u")
    assert out.returncode == 0 and out.stdout.strip() == "65532", out.stderr
    out = kubectl(env, "exec", *name, "touch", "/probe")
    assert out.returncode != 0 and "Read-only file system" in out.stderr, out


def test_a_namespace_the_release_does_not_watch_is_left_alone(
    release: Release, sites: tuple[Site, Site], custom: client.CustomObjectsApi
) -> None:
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": "Backup",
        "metadata": {"name": "ignored", "namespace": OUTSIDER},
        "spec": {"storageRef": {"name": "primary"}, "source": {"database": {"secretRef": {"name": "db"}}}},
    }
    custom.create_namespaced_custom_object(G, V, OUTSIDER, "backups", body)
    # Give the operator time to act on it if it could: a Backup in a watched namespace is
    # Queued or refused within a second or two.
    time.sleep(8)
    got = get(custom, "backups", OUTSIDER, "ignored")
    assert not got.get("status") and not got["metadata"].get("finalizers")
    with contextlib.suppress(ApiException):
        custom.delete_namespaced_custom_object(G, V, OUTSIDER, "backups", "ignored")
