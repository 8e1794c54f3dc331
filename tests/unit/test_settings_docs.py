"""Every setting is documented: each `Settings` field has its `INFERQ_*` row in
docs/configuration.md, and every `INFERQ_*` name the doc mentions is a setting."""

from __future__ import annotations

import re
from pathlib import Path

from inferq.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
NOT_FIELDS = {"INFERQ_SETTINGS_FILE"}  # names the settings file itself


def _documented() -> set[str]:
    return set(re.findall(r"`(INFERQ_[A-Z0-9_]+)", DOC.read_text()))


def test_every_setting_has_a_row() -> None:
    fields = {"INFERQ_" + name.upper() for name in Settings.model_fields}
    assert sorted(fields - _documented()) == []


def test_every_documented_name_is_a_setting() -> None:
    fields = {"INFERQ_" + name.upper() for name in Settings.model_fields}
    assert sorted(_documented() - fields - NOT_FIELDS) == []
