"""Every config key is documented in docs/CONFIG.md and shown in fleet.example.toml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from supervisor.config.models import (
    AgentConfig,
    AgentDefaults,
    HttpConfig,
    RedisConfig,
    SupervisorConfig,
)

ROOT = Path(__file__).resolve().parent.parent
MODELS: list[type[BaseModel]] = [
    SupervisorConfig,
    RedisConfig,
    HttpConfig,
    AgentDefaults,
    AgentConfig,
]
FIELDS = sorted({(m.__name__, f) for m in MODELS for f in m.model_fields})


@pytest.mark.parametrize(("model", "field"), FIELDS, ids=[f"{m}.{f}" for m, f in FIELDS])
def test_field_documented_in_config_md(model: str, field: str) -> None:
    """docs/CONFIG.md has a table row for the key."""
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    assert re.search(rf"^\| `{field}` \|", text, re.M), f"{model}.{field} missing in CONFIG.md"


@pytest.mark.parametrize(("model", "field"), FIELDS, ids=[f"{m}.{f}" for m, f in FIELDS])
def test_field_shown_in_example(model: str, field: str) -> None:
    """fleet.example.toml sets the key or shows it in a comment (secrets, optional keys)."""
    text = (ROOT / "fleet.example.toml").read_text()
    assert re.search(rf"^#? ?{field} ?[=:]", text, re.M), f"{model}.{field} missing in example"


def test_every_example_key_has_a_comment() -> None:
    """Each key line in the example is directly preceded by a comment line (or table header)."""
    lines = (ROOT / "fleet.example.toml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            previous = lines[number - 1]
            assert (
                previous.startswith("#")
                or re.match(r"^[a-z_]+ = ", previous)
                or (previous.startswith("["))
            ), f"line {number + 1} ({line!r}) has no comment above it"
