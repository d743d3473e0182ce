"""The README's configuration table is the user's reference for daemon mode: it must match Settings."""

from __future__ import annotations

from enum import Enum

from conftest import REPO

from vramsupply.config import Settings, env_name

TABLE_HEADER = "| variable | default | meaning |"


def documented_default(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return f"`{','.join(value)}`"  # the comma-separated form the environment variable takes
    return f"`{value.value if isinstance(value, Enum) else value}`"


def expected_rows() -> list[str]:
    return [
        f"| `{env_name(name)}` | {documented_default(field.default)} | {field.description} |"
        for name, field in Settings.model_fields.items()
    ]


def readme_rows() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index(TABLE_HEADER) + 2  # skip the header and the |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_every_setting_has_a_description() -> None:
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


def test_readme_configuration_table_matches_settings() -> None:
    expected = expected_rows()
    assert readme_rows() == expected, "README configuration table drifted from Settings; it should read:\n" + "\n".join(expected)
