"""The README's configuration table is the code's: every key, every default.

Users read the defaults there and nowhere else; a default changed in
``s3kv.config`` without the README (or a key added without a row) fails here.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from s3kv.config import ALL_KEYS, Settings, StoreSettings

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `([a-z_0-9]+)` \| ([^|]+) \|")


def table() -> dict[str, str]:
    text = README.read_text()
    start = text.index("### Configuration (`kv_connector_extra_config`)")
    rows: dict[str, str] = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        if m := ROW.match(line):
            rows[m.group(1)] = m.group(2).strip()
    return rows


def code_defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in (StoreSettings, Settings):
        for f in fields(cls):
            if f.name != "store":
                out[f.name] = MISSING if f.default is MISSING else f.default
    return out


def documented(value: Any) -> str | None:
    """How the README writes a literal default; None where it explains it in words."""
    if value is MISSING:
        return "(required)"
    if value is None:
        return None
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def test_every_key_has_a_row_and_no_row_is_stale() -> None:
    assert set(table()) == set(ALL_KEYS)


def test_every_literal_default_is_the_code_default() -> None:
    rows = table()
    for key, value in code_defaults().items():
        want = documented(value)
        if want is None:
            assert not rows[key].startswith("`"), (key, rows[key])
        else:
            assert rows[key] == want, key


def test_the_check_reads_the_table() -> None:
    rows = table()
    assert rows["chunk_tokens"] == "`256`" and rows["bucket"] == "(required)"
    assert len(rows) > 20
