"""s3kv's counters as vLLM KV connector stats, and so as Prometheus metrics.

Workers and the scheduler each report the change in their counters since the
previous step; vLLM aggregates them across ranks and steps, logs them, and
(when serving) exports them as ``vllm:s3kv_<name>`` counters. The set of
counters is :data:`s3kv.metrics.METRICS`, never a list kept here, so every
declared counter is exported and nothing undeclared is. Lookup hits and
misses are also exported by vLLM itself as external prefix-cache queries and
hits.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from s3kv.metrics import METRICS


class S3KVStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 6) for k, v in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class S3KVPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for name, m in METRICS.items():
            metric = self._counter_cls(name=m.prometheus_name,
                                       documentation=f"{m.help} ({m.unit})",
                                       labelnames=labelnames)
            self._counters[name] = {
                idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            per_engine = self._counters.get(name)
            if per_engine is not None and value > 0 and engine_idx in per_engine:
                per_engine[engine_idx].inc(value)
