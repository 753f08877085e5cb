"""Connector stats: what vLLM aggregates across ranks and exports to Prometheus."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from s3kv.metrics import METRICS, exposed_names
from s3kv.stats import Counters
from s3kv.vllm.connector import S3KVConnector
from s3kv.vllm.stats import S3KVStats


def test_counters_delta_reports_changes_only_and_keeps_totals() -> None:
    c = Counters()
    c.add("bytes_saved", 100)
    c.add("put_requests")
    assert c.delta() == {"bytes_saved": 100, "put_requests": 1}
    assert c.delta() == {}
    c.add("bytes_saved", 50)
    assert c.delta() == {"bytes_saved": 50}
    assert c.snapshot()["bytes_saved"] == 150


def test_stats_aggregate_across_ranks_and_reduce() -> None:
    a = S3KVConnector.build_kv_connector_stats({"bytes_loaded": 10.0, "load_failures": 1.0})
    b = S3KVConnector.build_kv_connector_stats({"bytes_loaded": 5.0, "loaded_chunks": 2.0})
    assert isinstance(a, S3KVStats) and b is not None
    merged = a.aggregate(b)
    assert merged.reduce() == {"bytes_loaded": 15.0, "load_failures": 1.0, "loaded_chunks": 2.0}
    assert not merged.is_empty()
    merged.reset()  # type: ignore[no-untyped-call]
    assert merged.is_empty()


def _prom(registry: CollectorRegistry) -> Any:
    class C(Counter):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, registry=registry, **kwargs)  # type: ignore[misc]

    prom = S3KVConnector.build_prom_metrics(
        vllm_config=SimpleNamespace(kv_transfer_config=None),
        metric_types={Counter: C, Gauge: Gauge, Histogram: Histogram},
        labelnames=["model_name", "engine"], per_engine_labelvalues={0: ["m", "0"]},
    )
    assert prom is not None
    return prom


def test_prometheus_exports_every_declared_metric_and_nothing_else() -> None:
    registry = CollectorRegistry()
    _prom(registry)
    families = {f.name: f for f in registry.collect()}
    samples = {s.name for f in families.values() for s in f.samples
               if not s.name.endswith("_created")}
    assert samples == exposed_names()
    for m in METRICS.values():
        family = families[m.prometheus_name]
        assert family.type == "counter"
        assert family.documentation == f"{m.help} ({m.unit})"


def test_prometheus_counters_follow_observations() -> None:
    registry = CollectorRegistry()
    prom = _prom(registry)
    prom.observe({"bytes_saved": 4096.0, "load_failures": 2.0, "unknown": 1.0}, engine_idx=0)
    prom.observe({"bytes_saved": 1024.0}, engine_idx=0)
    labels = {"model_name": "m", "engine": "0"}
    assert registry.get_sample_value("vllm:s3kv_bytes_saved_total", labels) == 5120.0
    assert registry.get_sample_value("vllm:s3kv_load_failures_total", labels) == 2.0
    assert registry.get_sample_value("vllm:s3kv_saves_dropped_total", labels) == 0.0
    # Scheduler-side counters are exported too (they reach vLLM merged with the workers').
    prom.observe({"hit_tokens": 512.0, "get_requests": 3.0}, engine_idx=0)
    assert registry.get_sample_value("vllm:s3kv_hit_tokens_total", labels) == 512.0
    assert registry.get_sample_value("vllm:s3kv_get_requests_total", labels) == 3.0


class _Sched:
    def __init__(self) -> None:
        self.steps = 0

    def step_done(self) -> None:
        self.steps += 1


def _bare_connector(sched: _Sched | None) -> S3KVConnector:
    """The stats methods need only the counters and the role's side; building
    a whole connector needs a vLLM config."""
    conn = S3KVConnector.__new__(S3KVConnector)
    conn.counters = Counters()
    conn._sched = sched  # type: ignore[assignment]
    conn._worker = None
    return conn


def test_scheduler_role_reports_its_counters_delta_each_step() -> None:
    sched = _Sched()
    conn = _bare_connector(sched)
    assert conn.get_kv_connector_stats() is None  # nothing counted yet
    conn.counters.add("lookups")
    conn.counters.add("hit_tokens", 256)
    stats = conn.get_kv_connector_stats()
    assert isinstance(stats, S3KVStats)
    assert stats.data == {"lookups": 1, "hit_tokens": 256}
    assert conn.get_kv_connector_stats() is None  # a delta, not the totals
    assert sched.steps == 3  # the step hook still runs on every call
    # vLLM's scheduler merges it into the workers' stats (Scheduler.update_from_output).
    workers = S3KVConnector.build_kv_connector_stats({"bytes_loaded": 10.0})
    assert workers is not None
    conn.counters.add("lookups")
    merged = workers.aggregate(conn.get_kv_connector_stats() or S3KVStats())
    assert merged.reduce() == {"bytes_loaded": 10.0, "lookups": 1.0}
