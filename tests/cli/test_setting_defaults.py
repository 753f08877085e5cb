"""Defaults the CLI shows or uses are the connector's own: a setting's default
is written once, in ``s3kv.config``'s dataclasses, and everything else reads it.

Each option named after a setting (``--prefix`` is ``prefix``) is checked
against that setting's default: its value when not given, and any
``[default: ...]`` its help text states. So is the help a user sees.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterator
from typing import Any

from typer.core import TyperGroup
from typer.main import get_command
from typer.testing import CliRunner

from s3kv.capacity import Workload, build_workload
from s3kv.cli.app import app
from s3kv.config import ALL_KEYS, Settings, StoreSettings
from s3kv.replay.fleet import FleetConfig

SHOWN = re.compile(r"\[default: ([^\]]+)\]")


def setting_default(key: str) -> Any:
    for cls in (StoreSettings, Settings):
        for f in dataclasses.fields(cls):
            if f.name == key:
                return f.default
    raise KeyError(key)


def setting_options() -> Iterator[tuple[str, Any]]:
    root = get_command(app)
    assert isinstance(root, TyperGroup)
    for name, command in root.commands.items():
        for param in command.params:
            if param.name in ALL_KEYS:
                yield name, param


def test_options_named_after_a_setting_default_to_it() -> None:
    checked: set[str] = set()
    for command, param in setting_options():
        assert param.name is not None
        default = setting_default(param.name)
        if param.default is not None:
            assert param.default == default, (command, param.name)
        for shown in SHOWN.findall(getattr(param, "help", None) or ""):
            assert shown == str(default), (command, param.name, shown)
            checked.add(param.name)
        if param.default is not None:
            checked.add(param.name)
    assert {"prefix", "backend", "chunk_tokens", "admission", "admission_window"} <= checked


def test_prefix_help_shows_the_store_settings_default() -> None:
    out = CliRunner().invoke(app, ["ls", "--help"], terminal_width=200).output
    assert f"[default: {StoreSettings.prefix}]" in " ".join(out.split())
    assert f"[default: {StoreSettings.backend}]" in " ".join(out.split())


def test_capacity_and_replay_models_use_the_connector_defaults() -> None:
    assert Workload.chunk_tokens == Settings.chunk_tokens
    assert inspect.signature(build_workload).parameters["chunk_tokens"].default \
        == Settings.chunk_tokens
    fleet = FleetConfig()
    assert (fleet.chunk_tokens, fleet.admission, fleet.admission_window) \
        == (Settings.chunk_tokens, Settings.admission, Settings.admission_window)
