"""scripts/check_privates.py: tests and tools use s3kv through public names only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts.check_privates import ALLOWED, THIRD_PARTY, Finding, check_source, find_privates

ROOT = Path(__file__).resolve().parents[2]

SOURCE = '''\
import os
from s3kv.config import _hidden, parse_settings

class Helper:
    def __init__(self) -> None:
        self._own = 1

def go(index, store, helper) -> None:
    index._clock = lambda: 0.0         # flagged: a product private, written
    store.inner._objects.clear()        # flagged: read through another attribute
    getattr(store, "_store", None)      # flagged: a private named by a string
    store.client.config                 # public
    helper._own                         # the file's own private
    os._exit(0)                         # a third-party name
    self._x = 1                         # self
'''


def test_a_private_access_is_flagged_and_public_or_allowed_ones_are_not() -> None:
    got = find_privates(SOURCE, "tests/unit/test_x.py")
    assert [(f.line, f.name, f.how) for f in got] == [
        (2, "_hidden", "import"),
        (9, "_clock", "attribute"),
        (10, "_objects", "attribute"),
        (11, "_store", "by-name"),
    ]
    allowed = {("tests/unit/test_x.py", "_clock"): "a reason"}
    left = check_source(SOURCE, "tests/unit/test_x.py", allowed)
    assert [f.name for f in left] == ["_hidden", "_objects", "_store"]
    assert str(left[0]) == "tests/unit/test_x.py:2: import _hidden"
    # The allow-list is per file: the same access elsewhere is still flagged.
    assert "_clock" in [f.name for f in check_source(SOURCE, "tests/unit/test_y.py", allowed)]


def test_monkeypatching_a_private_by_name_is_flagged() -> None:
    source = ('monkeypatch.setattr(Executor, "_delete", fake)\n'
              'monkeypatch.setattr("s3kv.gc_executor.Executor._delete", fake)\n'
              'monkeypatch.setattr(Executor, "delete", fake)\n'
              'import s3kv._impl\n')
    assert find_privates(source, "t.py") == [
        Finding("t.py", 1, "_delete", "by-name"),
        Finding("t.py", 2, "_delete", "by-name"),
        Finding("t.py", 4, "s3kv._impl", "import"),
    ]


def test_every_exception_has_a_reason() -> None:
    assert all(reason.strip() for reason in [*ALLOWED.values(), *THIRD_PARTY.values()])
    assert all((ROOT / path).is_file() for path, _ in ALLOWED)


def test_the_repository_passes() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_privates.py")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout
