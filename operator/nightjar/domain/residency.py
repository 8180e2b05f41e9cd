"""Data residency: which jurisdictions a primary storage's replicas may be in.

The policy is data, not code: a list of rules, each naming the primary jurisdictions it governs
and where their replicas may live. The default is Mendix Cloud's: EU data stays in the EU (and is
not backed up in the UK), UK data is backed up in the EU, US stays in the US, Japan in Japan. A
jurisdiction no rule names may keep replicas only in itself. Operators replace the policy with a
YAML file of the same shape (``NIGHTJAR_RESIDENCY_POLICY_FILE``; the chart's
``residencyPolicy``). Pure: no I/O except :func:`load`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: The Mendix Cloud rules, as data (also the shape of a policy file).
DEFAULT_POLICY: Mapping[str, Any] = {
    "rules": [
        {"name": "eu-stays-in-eu", "primary": ["EU"], "replicasIn": ["EU"]},
        {"name": "uk-backed-up-in-eu", "primary": ["UK"], "replicasIn": ["UK", "EU"]},
        {"name": "us-stays-in-us", "primary": ["US"], "replicasIn": ["US"]},
        {"name": "japan-stays-in-japan", "primary": ["JP"], "replicasIn": ["JP"]},
    ],
}

#: The rule a jurisdiction no rule names falls under.
SAME_ONLY = "same-jurisdiction-only"


class PolicyError(ValueError):
    """The policy itself is malformed; the message says where."""


@dataclass(frozen=True)
class Rule:
    name: str
    primary: frozenset[str]
    replicas_in: frozenset[str]


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str
    message: str


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]

    @classmethod
    def parse(cls, doc: Any, source: str = "policy") -> Policy:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("rules"), list):
            raise PolicyError(f"{source}: expected a mapping with a list 'rules'")
        rules: list[Rule] = []
        seen: dict[str, str] = {}
        for i, raw in enumerate(doc["rules"]):
            where = f"{source}: rules[{i}]"
            if not isinstance(raw, Mapping):
                raise PolicyError(f"{where}: expected a mapping")
            name = raw.get("name")
            if not isinstance(name, str) or not name:
                raise PolicyError(f"{where}: 'name' is required")
            primary = _jurisdictions(raw.get("primary"), f"{where} ({name}): 'primary'")
            replicas = _jurisdictions(raw.get("replicasIn"), f"{where} ({name}): 'replicasIn'")
            for j in primary:
                if j in seen:
                    raise PolicyError(
                        f"{where} ({name}): jurisdiction {j} is already governed by rule {seen[j]}"
                    )
                seen[j] = name
            rules.append(Rule(name, frozenset(primary), frozenset(replicas)))
        return cls(tuple(rules))

    def rule_for(self, jurisdiction: str) -> Rule:
        for r in self.rules:
            if jurisdiction in r.primary:
                return r
        return Rule(SAME_ONLY, frozenset({jurisdiction}), frozenset({jurisdiction}))

    def check(self, primary: str, replica: str) -> Verdict:
        """May data of ``primary``'s jurisdiction be replicated to ``replica``'s?"""
        rule = self.rule_for(primary)
        allowed = sorted(rule.replicas_in)
        if replica in rule.replicas_in:
            return Verdict(
                True, rule.name, f"{primary} data may be replicated to {replica} (rule {rule.name})"
            )
        return Verdict(
            False,
            rule.name,
            f"residency rule {rule.name}: {primary} data may be replicated only to "
            f"{', '.join(allowed)}, not to {replica}",
        )


def _jurisdictions(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{what} must be a non-empty list of jurisdictions")
    return value


def default_policy() -> Policy:
    return Policy.parse(DEFAULT_POLICY, "the default policy")


def load(path: str | None) -> Policy:
    """The policy in the YAML file ``path``, or the default when ``path`` is empty."""
    if not path:
        return default_policy()
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise PolicyError(f"residency policy {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise PolicyError(f"residency policy {path}: not valid YAML ({e})") from e
    return Policy.parse(doc, f"residency policy {path}")
