"""Connector stats: what vLLM aggregates across ranks and exports to Prometheus."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from s3kv.stats import Counters
from s3kv.vllm.connector import S3KVConnector
from s3kv.vllm.stats import METRICS, S3KVStats


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


def test_prometheus_counters_follow_observations() -> None:
    registry = CollectorRegistry()

    class C(Counter):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, registry=registry, **kwargs)  # type: ignore[misc]

    prom = S3KVConnector.build_prom_metrics(
        vllm_config=SimpleNamespace(kv_transfer_config=None),
        metric_types={Counter: C, Gauge: Gauge, Histogram: Histogram},
        labelnames=["model_name", "engine"], per_engine_labelvalues={0: ["m", "0"]},
    )
    assert prom is not None
    prom.observe({"bytes_saved": 4096.0, "load_failures": 2.0, "unknown": 1.0}, engine_idx=0)
    prom.observe({"bytes_saved": 1024.0}, engine_idx=0)
    labels = {"model_name": "m", "engine": "0"}
    assert registry.get_sample_value("vllm:s3kv_bytes_saved_total", labels) == 5120.0
    assert registry.get_sample_value("vllm:s3kv_load_failures_total", labels) == 2.0
    assert registry.get_sample_value("vllm:s3kv_saves_dropped_total", labels) == 0.0
    assert len(METRICS) >= 12
