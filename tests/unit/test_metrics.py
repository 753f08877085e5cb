"""Every counter is declared once, and every declaration is counted somewhere.

The call sites name counters by string; these tests read the source (not the
running code, so a rarely taken branch is checked too) and hold it to
s3kv/metrics.py in both directions.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from s3kv.metrics import METRICS, PROMETHEUS_PREFIX
from s3kv.stats import Counters

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "s3kv"

# Files whose counters belong to one side of the connector.
SIDE_OF_FILE = {
    "vllm/scheduler_side.py": "scheduler",
    "vllm/worker_side.py": "worker",
    "vllm/loader.py": "worker",
    "vllm/saver.py": "worker",
    "commit.py": "worker",
}


def _counter_calls(path: Path) -> list[ast.Call]:
    """``<...>counters.add(...)`` calls, whatever the receiver is called
    (``self.counters``, ``self._counters``, ``counters``)."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add"):
            continue
        receiver = node.func.value
        name = (receiver.attr if isinstance(receiver, ast.Attribute)
                else receiver.id if isinstance(receiver, ast.Name) else "")
        if name.lstrip("_") == "counters":
            calls.append(node)
    return calls


def _literal(call: ast.Call) -> str | None:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def _counted() -> dict[str, set[str]]:
    """Counter name -> files (relative to s3kv/) that count it."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _counter_calls(path):
            name = _literal(call)
            if name is not None:
                out.setdefault(name, set()).add(str(path.relative_to(PACKAGE)))
    return out


def test_every_counting_call_names_its_counter_literally() -> None:
    """A computed name would escape both checks below."""
    computed = [f"{p.relative_to(ROOT)}:{c.lineno}" for p in sorted(PACKAGE.rglob("*.py"))
                for c in _counter_calls(p) if _literal(c) is None]
    assert computed == []


def test_every_counted_name_is_declared() -> None:
    undeclared = {n: sorted(files) for n, files in _counted().items() if n not in METRICS}
    assert undeclared == {}


def test_every_declared_metric_is_counted_somewhere() -> None:
    counted = _counted()
    unused = sorted(n for n in METRICS if n not in counted)
    assert unused == [], "declared in s3kv/metrics.py but never counted in s3kv/"


def test_counters_land_on_the_side_they_are_declared_for() -> None:
    counted = _counted()
    wrong = {
        (name, f): sorted(METRICS[name].sides)
        for name, files in counted.items() if name in METRICS
        for f in files if f in SIDE_OF_FILE and SIDE_OF_FILE[f] not in METRICS[name].sides
    }
    assert wrong == {}


def test_declarations_are_valid_prometheus_counters() -> None:
    valid = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
    for name, m in METRICS.items():
        assert m.name == name
        assert m.kind == "counter"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        # prometheus_client strips a trailing _total from a counter's name.
        assert not name.endswith("_total"), name
        assert valid.fullmatch(m.prometheus_name), name
        assert m.prometheus_name == PROMETHEUS_PREFIX + name
        assert m.exposed_name == m.prometheus_name + "_total"
        assert m.help and m.unit, name
        assert m.sides and m.sides <= {"scheduler", "worker"}, name


def test_s3_request_kinds_are_declared_for_both_sides() -> None:
    for kind in ("get", "put", "head", "list", "delete"):
        assert METRICS[f"{kind}_requests"].sides == {"scheduler", "worker"}


def test_counters_reject_an_undeclared_name() -> None:
    c = Counters()
    with pytest.raises(ValueError, match=r"'bytes_savd'.*s3kv/metrics\.py"):
        c.add("bytes_savd", 10)
    with pytest.raises(ValueError, match=r"s3kv/metrics\.py"):
        c.get("no_such_counter")
    assert c.snapshot() == {}


def test_counters_delta_and_reset() -> None:
    c = Counters()
    c.add("bytes_saved", 100)
    assert c.delta() == {"bytes_saved": 100}
    assert c.snapshot(reset=True) == {"bytes_saved": 100}
    c.add("bytes_saved", 30)
    assert c.delta() == {"bytes_saved": 30}  # never negative after a reset
    assert c.get("bytes_saved") == 30


def test_metrics_import_without_torch_or_vllm() -> None:
    code = ("import sys, s3kv.metrics, s3kv.stats, s3kv.store.counting; "
            "bad = [m for m in ('torch', 'vllm') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
