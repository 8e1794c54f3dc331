"""Settings in one place: each `Settings` field has its `INFERQ_*` row in
docs/configuration.md, every `INFERQ_*` name the doc mentions is a setting, and every
`INFERQ_*` name in the code is one too (read through inferq/settings.py, nowhere else)."""

from __future__ import annotations

import re
from pathlib import Path

from inferq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
NOT_FIELDS = {"INFERQ_SETTINGS_FILE"}  # names the settings file itself
CODE = ("api_client", "gateway", "inferq", "kv", "migrations", "scheduler", "storage", "worker")
BENCH_ONLY = {"INFERQ_BENCH_REDIS"}  # bench/ and tests/ are not the product


def _documented() -> set[str]:
    return set(re.findall(r"`(INFERQ_[A-Z0-9_]+)", DOC.read_text()))


def test_every_setting_has_a_row() -> None:
    fields = {"INFERQ_" + name.upper() for name in Settings.model_fields}
    assert sorted(fields - _documented()) == []


def test_every_documented_name_is_a_setting() -> None:
    fields = {"INFERQ_" + name.upper() for name in Settings.model_fields}
    assert sorted(_documented() - fields - NOT_FIELDS) == []


def test_the_code_reads_no_other_name() -> None:
    fields = {"INFERQ_" + name.upper() for name in Settings.model_fields}
    found = {
        (name, str(path.relative_to(ROOT)))
        for package in CODE
        for path in (ROOT / package).rglob("*.py")
        for name in re.findall(r"INFERQ_[A-Z0-9_]+", path.read_text())
    }
    assert sorted(f for f in found if f[0] not in fields | NOT_FIELDS | BENCH_ONLY) == []
