"""The console script's shape: one `nightjar` with operator and agent subcommands."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nightjar.cli import main


def test_nightjar_has_operator_and_agent_subcommands() -> None:
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0
    assert "operator" in out.output
    assert "agent" in out.output


def test_version() -> None:
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0
    assert "nightjar, version 0.1.0" in out.output


def test_schedule_preview_prints_slots_as_table_and_json(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "backupschedule.yaml"
    table = CliRunner().invoke(
        main, ["schedule", "preview", "-f", str(example), "--from", "2026-11-29", "--days", "8"]
    )
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["TIME", "TIER", "EXPIRES", "NAME"]
    assert len(lines) == 1 + 8
    assert lines[1].split()[1] == "Weekly"  # Sunday 29 November
    assert lines[8].split()[1] == "Monthly"  # Sunday 6 December, the month's first
    out = CliRunner().invoke(
        main, ["schedule", "preview", "-f", str(example), "--from", "2026-11-29", "--days", "1", "-o", "json"]
    )
    (slot,) = [json.loads(line) for line in out.output.splitlines()]
    assert set(slot) == {"time", "tier", "expiresAt", "name"}
    assert slot["name"] == "shop-20261129"
    assert slot["expiresAt"].startswith("2027-02-28T")


def test_schedule_preview_refuses_a_file_that_is_not_a_schedule(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("kind: Backup\n")
    out = CliRunner().invoke(main, ["schedule", "preview", "-f", str(f)])
    assert out.exit_code != 0
    assert "does not hold a BackupSchedule" in out.output


def test_the_user_commands_are_there() -> None:
    out = CliRunner().invoke(main, ["--help"])
    for command in ("download", "upload", "backup", "restore"):
        assert f"  {command} " in out.output
    sub = CliRunner().invoke(main, ["backup", "--help"])
    assert "create" in sub.output and "list" in sub.output


KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts:
- {name: with-ns, context: {cluster: c, user: u, namespace: shop}}
- {name: without, context: {cluster: c, user: u}}
current-context: with-ns
"""


def test_the_namespace_defaults_to_the_current_contexts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nightjar.transfer.cluster import current_namespace

    cfg = tmp_path / "kubeconfig"
    cfg.write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    assert current_namespace() == "shop"
    cfg.write_text(KUBECONFIG.replace("current-context: with-ns", "current-context: without"))
    assert current_namespace() == "default"


def test_without_a_kubeconfig_the_error_says_so(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["download", "x"], env={"KUBECONFIG": str(tmp_path / "nope")})
    assert out.exit_code == 1
    assert "Error: no Kubernetes configuration: set KUBECONFIG or create ~/.kube/config" in out.output


def test_backup_create_refuses_files_path_without_a_claim() -> None:
    out = CliRunner().invoke(
        main, ["backup", "create", "--storage", "s", "--database-secret", "db", "--files-path", "docs"]
    )
    assert out.exit_code == 1
    assert "Error: --files-path needs --files-claim" in out.output


def test_download_offers_exactly_one_of_full_database_only_files_only() -> None:
    out = CliRunner().invoke(main, ["download", "--help"])
    assert out.exit_code == 0
    for flag in ("--full", "--database-only", "--files-only", "-o, --output"):
        assert flag in out.output


def test_a_local_file_problem_is_one_line(tmp_path: Path) -> None:
    from nightjar.cli import _failures

    with pytest.raises(click.ClickException) as err, _failures():
        (tmp_path / "missing" / "x.part").open("wb")
    assert err.value.message == f"No such file or directory: {tmp_path / 'missing' / 'x.part'}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"NIGHTJAR_RESIDENCY_POLICY_FILE": "/nonexistent/policy.yaml"},
            "residency policy /nonexistent/policy.yaml",
        ),
        ({"NIGHTJAR_DEFAULT_RETENTION_ONDEMAND": "3 months"}, "NIGHTJAR_DEFAULT_RETENTION_ONDEMAND: invalid"),
        ({"NIGHTJAR_GC_INTERVAL_SECONDS": "often"}, "NIGHTJAR_GC_INTERVAL_SECONDS must be an integer"),
    ],
)
def test_the_operator_refuses_bad_configuration_before_it_starts(env: dict[str, str], message: str) -> None:
    out = CliRunner().invoke(main, ["operator"], env=env)
    assert out.exit_code == 1
    assert message in out.output


def test_a_malformed_residency_policy_says_where(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("rules:\n- {name: eu, primary: [EU]}\n")
    out = CliRunner().invoke(main, ["operator"], env={"NIGHTJAR_RESIDENCY_POLICY_FILE": str(bad)})
    assert out.exit_code == 1
    assert "rules[0] (eu): 'replicasIn' must be a non-empty list" in out.output
