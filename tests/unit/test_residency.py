"""Data residency: the Mendix rules as data, and policies loaded from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightjar.domain.residency import SAME_ONLY, Policy, PolicyError, default_policy, load


@pytest.mark.parametrize(
    ("primary", "replica", "allowed", "rule"),
    [
        ("EU", "EU", True, "eu-stays-in-eu"),
        ("EU", "UK", False, "eu-stays-in-eu"),
        ("EU", "US", False, "eu-stays-in-eu"),
        ("UK", "EU", True, "uk-backed-up-in-eu"),
        ("UK", "UK", True, "uk-backed-up-in-eu"),
        ("UK", "US", False, "uk-backed-up-in-eu"),
        ("US", "US", True, "us-stays-in-us"),
        ("US", "EU", False, "us-stays-in-us"),
        ("JP", "JP", True, "japan-stays-in-japan"),
        ("JP", "US", False, "japan-stays-in-japan"),
        ("AU", "AU", True, SAME_ONLY),
        ("AU", "JP", False, SAME_ONLY),
    ],
)
def test_the_mendix_rules(primary: str, replica: str, allowed: bool, rule: str) -> None:
    v = default_policy().check(primary, replica)
    assert (v.allowed, v.rule) == (allowed, rule)


def test_a_refusal_names_the_rule_and_where_data_may_go() -> None:
    v = default_policy().check("EU", "UK")
    assert v.message == "residency rule eu-stays-in-eu: EU data may be replicated only to EU, not to UK"


def test_a_policy_file_replaces_the_default(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text("rules:\n- {name: eu-and-ch, primary: [EU, CH], replicasIn: [EU, CH]}\n")
    p = load(str(f))
    assert p.check("CH", "EU").allowed and p.check("EU", "CH").allowed
    assert not p.check("UK", "EU").allowed  # no rule for UK any more: same jurisdiction only
    assert load("") == default_policy()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "expected a mapping with a list 'rules'"),
        ({"rules": [{"primary": ["EU"], "replicasIn": ["EU"]}]}, "rules[0]: 'name' is required"),
        (
            {"rules": [{"name": "x", "primary": [], "replicasIn": ["EU"]}]},
            "'primary' must be a non-empty list",
        ),
        (
            {"rules": [{"name": "x", "primary": ["EU"], "replicasIn": "EU"}]},
            "'replicasIn' must be a non-empty",
        ),
        (
            {
                "rules": [
                    {"name": "a", "primary": ["EU"], "replicasIn": ["EU"]},
                    {"name": "b", "primary": ["EU"], "replicasIn": ["UK"]},
                ]
            },
            "jurisdiction EU is already governed by rule a",
        ),
    ],
)
def test_a_malformed_policy_is_refused_with_where(doc: object, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Policy.parse(doc)


def test_an_unreadable_or_invalid_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"residency policy .*missing\.yaml"):
        load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load(str(bad))
