"""The console script's shape: one `nightjar` with operator and agent subcommands."""

from __future__ import annotations

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
