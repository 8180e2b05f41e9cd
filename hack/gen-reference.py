#!/usr/bin/env python3
"""Generate docs/reference.md from the CRDs in crds/ (the one source of the schemas).

    .venv/bin/python hack/gen-reference.py           # (re)write docs/reference.md
    .venv/bin/python hack/gen-reference.py --check   # exit 1 when docs/reference.md is stale

For each kind: group, version, kind, names, scope, printer columns; then every spec and status
field (path, type, required, default, validation, description) and the CEL validation rules with
their messages. The output depends only on the CRD files, so it is the same on every machine;
tests/unit/test_docs_reference.py fails when the committed file differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"
OUTPUT = ROOT / "docs" / "reference.md"
REGENERATE = ".venv/bin/python hack/gen-reference.py"

#: Validation keywords shown in the Validation column, in this order.
_LIMITS = (
    ("minLength", "min length"),
    ("maxLength", "max length"),
    ("minimum", "min"),
    ("maximum", "max"),
    ("minItems", "min items"),
    ("maxItems", "max items"),
)


def _cell(text: str) -> str:
    """Plain text for a table cell: one line, pipes escaped, and `<`, `>` and `*` outside code
    spans escaped so that `<namespace>` is shown rather than read as an HTML tag."""
    text = " ".join(str(text).split())
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", r"\*")
    return "`".join(parts).replace("|", r"\|")


def _code(value: str) -> str:
    """A code span for a table cell (pipes escaped: GitHub tables need it even in code)."""
    value = str(value).replace("|", r"\|")
    fence = "``" if "`" in value else "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def _literal(value: Any) -> str:
    """A default or enum value as it would be written in YAML: strings bare, empty string as ""."""
    if isinstance(value, str):
        return _code(value if value else '""')
    return _code(json.dumps(value, sort_keys=True, separators=(", ", ": ")))


def _type(schema: dict[str, Any]) -> str:
    t = str(schema.get("type", "any"))
    if t == "array":
        items = schema.get("items") or {}
        t = f"array of {_type(items)}" if items else "array"
    elif schema.get("format"):
        t += f" ({schema['format']})"
    return t


def _validation(schema: dict[str, Any]) -> str:
    out = []
    if "enum" in schema:
        out.append("one of " + ", ".join(_literal(v) for v in schema["enum"]))
    if "pattern" in schema:
        out.append("pattern " + _code(schema["pattern"]))
    out += [f"{label} {schema[key]}" for key, label in _LIMITS if key in schema]
    list_type = schema.get("x-kubernetes-list-type")
    if list_type:
        keys = schema.get("x-kubernetes-list-map-keys")
        out.append(f"list type {list_type}" + (f" (keys {', '.join(keys)})" if keys else ""))
    items = schema.get("items")
    if isinstance(items, dict) and not items.get("properties") and _validation(items):
        out.append(f"each item: {_validation(items)}")
    if schema.get("x-kubernetes-validations"):
        out.append("CEL rules below")
    return "; ".join(out)


def walk(schema: dict[str, Any], path: str, required: bool) -> list[tuple[str, dict[str, Any], bool]]:
    """(path, schema, required) of ``schema`` and every field below it, depth first, in the order
    the CRD lists them. Array items are written ``path[]``."""
    out = [(path, schema, required)]
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        items = schema["items"]
        for name, sub in (items.get("properties") or {}).items():
            out += walk(sub, f"{path}[].{name}", name in (items.get("required") or []))
        return out
    for name, sub in (schema.get("properties") or {}).items():
        out += walk(sub, f"{path}.{name}", name in (schema.get("required") or []))
    return out


def _field_table(root: dict[str, Any], part: str) -> list[str]:
    top = (root.get("properties") or {}).get(part)
    if not top:
        return []
    lines = [f"### {part.capitalize()}", ""]
    if top.get("description"):
        lines += [_cell(top["description"]), ""]
    fields = walk(top, part, part in (root.get("required") or []))[1:]
    if not fields:
        return lines
    lines += [
        "| Field | Type | Required | Default | Validation | Description |",
        "|---|---|---|---|---|---|",
    ]
    for path, schema, required in fields:
        default = _literal(schema["default"]) if "default" in schema else ""
        lines.append(
            f"| {_code(path)} | {_type(schema)} | {'yes' if required else ''} | {default} "
            f"| {_validation(schema)} | {_cell(schema.get('description', ''))} |"
        )
    return [*lines, ""]


def cel_rules(root: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field path, rule, message) of every x-kubernetes-validations rule under spec and status."""
    out = []
    for part in ("spec", "status"):
        top = (root.get("properties") or {}).get(part)
        if not top:
            continue
        for path, schema, _ in walk(top, part, False):
            items: dict[str, Any] = schema["items"] if isinstance(schema.get("items"), dict) else {}
            for where, rules in ((path, schema), (f"{path}[]", items)):
                for v in rules.get("x-kubernetes-validations") or []:
                    message = v.get("message") or v.get("messageExpression") or ""
                    out.append((where, str(v["rule"]), str(message)))
    return out


def render_kind(crd: dict[str, Any]) -> list[str]:
    spec = crd["spec"]
    names = spec["names"]
    kind = names["kind"]
    lines = [f"## {kind}", ""]
    for version in spec["versions"]:
        root = version["schema"]["openAPIV3Schema"]
        info = [
            ("API version", _code(f"{spec['group']}/{version['name']}")),
            ("Kind", _code(kind)),
            ("Plural", _code(names["plural"])),
            ("Short names", ", ".join(_code(n) for n in names.get("shortNames") or []) or "none"),
            ("Categories", ", ".join(_code(n) for n in names.get("categories") or []) or "none"),
            ("Scope", spec["scope"]),
            (
                "Served / storage",
                f"{'yes' if version.get('served') else 'no'} / {'yes' if version.get('storage') else 'no'}",
            ),
            ("Subresources", ", ".join(sorted(version.get("subresources") or {})) or "none"),
        ]
        if len(spec["versions"]) > 1:
            lines += [f"### {version['name']}", ""]
        if root.get("description"):
            lines += [_cell(root["description"]), ""]
        lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in info], ""]
        columns = version.get("additionalPrinterColumns") or []
        if columns:
            lines += [
                "### Printer columns",
                "",
                f"`kubectl get {names['plural']}` shows the columns of priority 0, `-o wide` the others too.",
                "",
                "| Column | Type | JSONPath | Priority | Description |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {_cell(c['name'])} | {c['type']} | {_code(c['jsonPath'])} | {c.get('priority', 0)} "
                f"| {_cell(c.get('description', ''))} |"
                for c in columns
            ]
            lines.append("")
        lines += _field_table(root, "spec")
        lines += _field_table(root, "status")
        rules = cel_rules(root)
        if rules:
            lines += [
                "### Validation rules (CEL)",
                "",
                "The API server refuses a create or update that breaks one of these, with its message. "
                "Rules that use `oldSelf` apply to updates only.",
                "",
                "| Field | Rule | Message |",
                "|---|---|---|",
            ]
            lines += [f"| {_code(p)} | {_code(r)} | {_cell(m)} |" for p, r, m in rules]
            lines.append("")
    return lines


def load(crd_dir: Path) -> list[dict[str, Any]]:
    """The CRDs, ordered by kind (file order does not matter)."""
    docs = []
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                docs.append(doc)
    return sorted(docs, key=lambda d: d["spec"]["names"]["kind"])


def render(crd_dir: Path = CRDS) -> str:
    crds = load(crd_dir)
    groups = sorted({c["spec"]["group"] for c in crds})
    kinds = [c["spec"]["names"]["kind"] for c in crds]
    lines = [
        "# API reference",
        "",
        f"<!-- Generated from crds/*.yaml by hack/gen-reference.py: do not edit. Run {REGENERATE} -->",
        "",
        f"Nightjar's custom resources (API group {', '.join(_code(g) for g in groups)}), generated from the "
        "CRDs in `crds/`, the one source of the schemas. `kubectl explain <kind>.spec` shows the same "
        "descriptions in a cluster.",
        "",
        "A field is required where the Required column says yes, given that its parent is set. "
        "Defaults are applied by the API server when the field is left out.",
        "",
        *[f"- [{k}](#{k.lower()})" for k in kinds],
        "",
    ]
    for crd in crds:
        lines += render_kind(crd)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 when the output file is stale")
    parser.add_argument("--crds", type=Path, default=CRDS, help="directory of the CRD files")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the Markdown file to write")
    args = parser.parse_args(argv)
    text = render(args.crds)
    current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    shown = args.output.resolve()
    shown_text = str(shown.relative_to(ROOT)) if shown.is_relative_to(ROOT) else str(shown)
    if args.check:
        if current != text:
            print(f"{shown_text} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {shown_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
