"""docs/reference.md is generated from the CRDs by hack/gen-reference.py and must not go stale."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
REFERENCE = ROOT / "docs" / "reference.md"
STALE = "docs/reference.md is stale: run `.venv/bin/python hack/gen-reference.py`"


@cache
def gen() -> ModuleType:
    """hack/gen-reference.py as a module (its name is not an importable identifier)."""
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "hack" / "gen-reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def rendered() -> str:
    text: str = gen().render(CRDS)
    return text


def crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted(CRDS.glob("*.yaml"))]


def fields(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every field below ``schema`` with its path (array items as ``path[]``), found independently
    of the generator."""
    if isinstance(schema.get("items"), dict):
        yield from fields(schema["items"], path + "[]")
    for name, sub in (schema.get("properties") or {}).items():
        here = f"{path}.{name}"
        yield here, sub
        yield from fields(sub, here)


def roots() -> Iterator[tuple[str, dict[str, Any]]]:
    for crd in crds():
        for version in crd["spec"]["versions"]:
            yield crd["spec"]["names"]["kind"], version["schema"]["openAPIV3Schema"]


def section(kind: str) -> str:
    """The part of the reference about one kind."""
    text = rendered()
    start = text.index(f"\n## {kind}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_reference_is_up_to_date() -> None:
    assert REFERENCE.exists(), STALE
    assert REFERENCE.read_text(encoding="utf-8") == rendered(), STALE


def test_every_spec_and_status_field_has_a_row() -> None:
    count = 0
    for kind, root in roots():
        for part in ("spec", "status"):
            for path, _ in fields(root["properties"][part], part):
                row = f"\n| `{path}` |"
                assert row in section(kind), f"{kind}: no row for {path}"
                count += 1
    assert count > 100  # four kinds with dozens of fields each: the walk found them


def test_rows_say_type_required_default_and_validation() -> None:
    backup = section("Backup")
    assert "| `spec.storageRef.name` | string | yes |  | min length 1; max length 253 |" in backup
    assert "| `spec.type` | string |  | `OnDemand` | one of `OnDemand`, `Nightly`, " in backup
    assert "| `status.createdOn` | string (date-time) |" in backup
    storage = section("BackupStorage")
    # A pattern holding a pipe keeps it escaped inside the table.
    assert r"pattern `^(\*\|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$`" in storage
    assert "| `spec.objectLock` | object |  | `{}` |" in storage
    # Angle brackets in descriptions are shown, not read as HTML tags.
    assert "&lt;namespace&gt;" in backup


def test_every_cel_rule_is_listed_with_its_message() -> None:
    count = 0
    for kind, root in roots():
        for part in ("spec", "status"):
            top = root["properties"][part]
            for path, schema in [(part, top), *fields(top, part)]:
                items = schema["items"] if isinstance(schema.get("items"), dict) else {}
                for where, rule in [
                    *((path, r) for r in schema.get("x-kubernetes-validations") or []),
                    *((f"{path}[]", r) for r in items.get("x-kubernetes-validations") or []),
                ]:
                    escaped = rule["rule"].replace("|", r"\|")
                    assert f"| `{where}` | `{escaped}` |" in section(kind), f"{kind}: rule at {where} missing"
                    assert rule["message"].replace("|", r"\|") in section(kind)
                    count += 1
    assert count >= 10


def test_names_scope_and_printer_columns() -> None:
    for crd in crds():
        names, kind = crd["spec"]["names"], crd["spec"]["names"]["kind"]
        text = section(kind)
        assert f"| API version | `{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}` |" in text
        assert f"| Scope | {crd['spec']['scope']} |" in text
        for short in names.get("shortNames") or []:
            assert f"`{short}`" in text
        for column in crd["spec"]["versions"][0].get("additionalPrinterColumns") or []:
            assert f"| `{column['jsonPath']}` | {column.get('priority', 0)} |" in text


def test_output_does_not_depend_on_file_names_or_order(tmp_path: Path) -> None:
    for n, path in enumerate(sorted(CRDS.glob("*.yaml"), reverse=True)):
        shutil.copy(path, tmp_path / f"{n}-crd.yaml")
    assert gen().render(tmp_path) == rendered()


def test_check_exits_1_on_a_stale_file_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "reference.md"
    out.write_text("# old\n")
    assert gen().main(["--check", "--output", str(out)]) == 1
    assert out.read_text() == "# old\n"
    assert "is stale: run `.venv/bin/python hack/gen-reference.py`" in capsys.readouterr().err
    assert gen().main(["--output", str(out)]) == 0
    assert out.read_text() == rendered()
    assert gen().main(["--check", "--output", str(out)]) == 0
