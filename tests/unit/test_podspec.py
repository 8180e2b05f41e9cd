"""The process node's container semantics: $(VAR) expansion, env resolution, argv, path rewriting."""

from __future__ import annotations

from typing import Any

import pytest

from nightjar.devstack import podspec
from nightjar.devstack.podspec import ContainerConfigError, Lookups, PathMap

POD: dict[str, Any] = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "shop"}},
    "spec": {"nodeName": "n", "serviceAccountName": "sa"},
}
SECRETS = {"db": {"password": "pw", "user": "bob"}}
CONFIGMAPS = {"cfg": {"mode": "fast"}}
LOOKUPS = Lookups(secret=SECRETS.get, config_map=CONFIGMAPS.get)


def test_expand_replaces_known_vars_keeps_unknown_and_unescapes_double_dollar() -> None:
    env = {"A": "1", "B_C": "2"}
    assert podspec.expand("$(A)-$(B_C)-$(MISSING)-$$(A)-$$", env) == "1-2-$(MISSING)-$(A)-$"


def test_env_resolves_in_order_with_envfrom_first_and_later_entries_winning() -> None:
    container = {
        "envFrom": [{"secretRef": {"name": "db"}, "prefix": "DB_"}, {"configMapRef": {"name": "cfg"}}],
        "env": [
            {"name": "mode", "value": "slow"},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
            {"name": "URL", "value": "postgres://$(DB_user):$(PW)@h/$(POD)"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        ],
    }
    env = podspec.resolve_env(POD, container, LOOKUPS)
    assert env["DB_password"] == "pw"
    assert env["mode"] == "slow"
    # POD is defined after URL, so it is not expanded there (kubelet semantics).
    assert env["URL"] == "postgres://bob:pw@h/$(POD)"
    assert env["POD"] == "p"
    assert env["APP"] == "shop"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"secretKeyRef": {"name": "nope", "key": "k"}}, 'secret "nope" not found'),
        ({"secretKeyRef": {"name": "db", "key": "nokey"}}, "couldn't find key nokey in secret db"),
        ({"configMapKeyRef": {"name": "nope", "key": "k"}}, 'configmap "nope" not found'),
        ({"fieldRef": {"fieldPath": "status.phase"}}, "fieldRef 'status.phase' is not supported"),
    ],
)
def test_unresolvable_env_is_a_config_error_naming_what_is_missing(
    entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(ContainerConfigError, match=message):
        podspec.resolve_env(POD, {"env": [{"name": "X", "valueFrom": entry}]}, LOOKUPS)


def test_optional_refs_are_skipped_when_missing() -> None:
    container = {
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}}],
        "envFrom": [{"configMapRef": {"name": "nope", "optional": True}}],
    }
    assert podspec.resolve_env(POD, container, LOOKUPS) == {}


def test_argv_uses_command_and_args_with_expansion() -> None:
    c = {"command": ["sh", "-c"], "args": ["echo $(NAME)"]}
    assert podspec.argv(c, {"NAME": "x"}, {}) == ["sh", "-c", "echo x"]


def test_argv_falls_back_to_a_known_image_entrypoint() -> None:
    c = {"image": "ghcr.io/acme/nightjar:0.1.0@sha256:abc", "args": ["agent", "backup"]}
    assert podspec.argv(c, {}, {"nightjar": ["/venv/bin/nightjar"]}) == [
        "/venv/bin/nightjar",
        "agent",
        "backup",
    ]
    with pytest.raises(ContainerConfigError, match="no entrypoint is known for image 'busybox'"):
        podspec.argv({"image": "busybox"}, {}, {})


def test_path_map_rewrites_whole_components_and_prefers_the_longest_mount() -> None:
    pm = PathMap()
    pm.add("/data", "/local/d")
    pm.add("/data/cache/", "/local/c")
    pm.add("/dev/termination-log", "/local/t")
    assert pm.rewrite("/data") == "/local/d"
    assert pm.rewrite("--dir=/data/sub/file.txt") == "--dir=/local/d/sub/file.txt"
    assert pm.rewrite("/data/cache/x") == "/local/c/x"
    assert pm.rewrite("open('/dev/termination-log','w')") == "open('/local/t','w')"
    assert pm.rewrite("/database /datax /mnt/data") == "/database /datax /mnt/data"
    assert pm.rewrite("cat /data/a > /data/b") == "cat /local/d/a > /local/d/b"


def test_the_image_entrypoint_is_never_rewritten_but_args_are() -> None:
    pm = PathMap()
    pm.add("/tmp", "/node/pod/volumes/tmp")
    c = {"image": "nightjar:1", "args": ["--result-file", "/tmp/out"]}
    got = podspec.argv(c, {}, {"nightjar": ["/tmp/checkout/.venv/bin/nightjar"]}, rewrite=pm.rewrite)
    assert got == ["/tmp/checkout/.venv/bin/nightjar", "--result-file", "/node/pod/volumes/tmp/out"]


def test_mount_at_root_is_refused() -> None:
    with pytest.raises(ContainerConfigError):
        PathMap().add("/", "/x")


def test_termination_message_is_capped_at_4096_bytes() -> None:
    assert len(podspec.termination_message(b"x" * 5000)) == 4096
    assert podspec.termination_message("é".encode()) == "é"
