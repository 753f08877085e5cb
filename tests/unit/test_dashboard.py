"""The Grafana dashboard queries only metrics s3kv really exports.

A renamed or misspelt counter would leave a panel silently empty; these tests
read every query in the dashboard and check each s3kv name against what
prometheus_client exposes for the declared metrics (s3kv.metrics), derived
here rather than listed, so a new counter needs no edit in this file.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from s3kv.metrics import METRICS, exposed_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "grafana" / "s3kv.json"
S3KV_NAME = re.compile(r"vllm:s3kv_[A-Za-z0-9_:]*")
ANY_VLLM_NAME = re.compile(r"vllm:[A-Za-z0-9_:]+")
# Every s3kv series must follow the dashboard's engine and model pickers.
SELECTOR = '{model_name=~"$model_name", engine=~"$engine"}'


def _load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in container.get("panels", []):
        yield p
        yield from _panels(p)  # rows nest their panels


def _exprs(doc: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(doc) for t in p.get("targets", [])]


def _names_prometheus_client_exposes() -> set[str]:
    """What a scrape would show for the declared counters, asked of the client
    library itself (it appends ``_total``; ``_created`` is not for queries)."""
    registry = CollectorRegistry()
    for m in METRICS.values():
        Counter(m.prometheus_name, m.help, registry=registry)
    return {s.name for family in registry.collect() for s in family.samples
            if not s.name.endswith("_created")}


def test_exposed_names_match_what_prometheus_client_exposes() -> None:
    assert exposed_names() == _names_prometheus_client_exposes()


def test_every_s3kv_name_in_the_dashboard_is_exported() -> None:
    exprs = _exprs(_load())
    assert exprs, "dashboard has no queries"
    used = {n for e in exprs for n in S3KV_NAME.findall(e)}
    assert used, "dashboard queries no s3kv metric"
    assert used - _names_prometheus_client_exposes() == set()


def test_dashboard_covers_the_operational_questions() -> None:
    used = {n for e in _exprs(_load()) for n in S3KV_NAME.findall(e)}
    wanted = {METRICS[n].exposed_name for n in (
        "get_requests", "put_requests", "head_requests", "list_requests", "delete_requests",
        "hit_tokens", "bytes_saved", "bytes_loaded", "lookup_deadline_misses",
        "load_deadline_misses", "breaker_opens", "cache_wait_seconds",
        "recompute_seconds_saved_est", "load_failures", "upload_failures", "commit_failures",
        "saves_dropped")}
    assert wanted - used == set()


def test_every_query_is_a_rate_filtered_by_the_pickers() -> None:
    for expr in _exprs(_load()):
        assert expr.count("(") == expr.count(")"), expr
        for m in re.finditer(r"(vllm:[A-Za-z0-9_:]+)(\{[^}]*\})?(\[[^\]]*\])?", expr):
            name, selector, window = m.groups()
            assert selector == SELECTOR, f"{name} in {expr!r} ignores the pickers"
            assert window == "[$__rate_interval]", f"counter {name} is not rated in {expr!r}"


def test_datasource_and_engine_variables_drive_every_panel() -> None:
    doc = _load()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "engine" in variables and "model_name" in variables
    for v in ("engine", "model_name"):
        for name in S3KV_NAME.findall(variables[v]["definition"]):
            assert name in exposed_names()
    panels = list(_panels(doc))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("description"), f"panel {p['title']!r} has no description"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_cost_panel_states_its_prices() -> None:
    cost = [p for p in _panels(_load()) if "cost" in p["title"].lower()]
    assert len(cost) == 1
    desc = cost[0]["description"]
    for fact in ("S3 Standard", "$0.0004 per 1,000", "$0.005 per 1,000", "DELETE free"):
        assert fact in desc
    exprs = " ".join(t["expr"] for t in cost[0]["targets"])
    assert "0.0004" in exprs and "0.005" in exprs
    assert METRICS["delete_requests"].exposed_name not in exprs


def test_vllm_own_metrics_exist_in_the_installed_vllm() -> None:
    """The hit-rate panel divides by vLLM's own counters; check their names
    against vLLM's metrics source without importing vLLM (slow, heavy)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM not installed")
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    others = {n for e in _exprs(_load()) for n in ANY_VLLM_NAME.findall(e)
              if not n.startswith("vllm:s3kv_")}
    assert others
    for name in others:
        assert f'name="{name.removesuffix("_total")}"' in source, name
