"""S3KVConnector: vLLM's KV connector V1 API, dispatching to one side per role.

Configuration errors fail start-up with a message naming the key. S3 being
unreachable does not: the engine serves without the cache and logs a warning.
Nor do weights that cannot be identified (no ``weights_id``, nothing local to
fingerprint): the engine serves without the cache, and says how to enable it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from s3kv.config import parse_settings
from s3kv.errors import WeightsUnresolved
from s3kv.groups import describe_groups
from s3kv.stats import Counters
from s3kv.vllm.hybrid import check_state_sharding, group_specs, state_checkpoints
from s3kv.vllm.metadata import S3KVMetadata
from s3kv.vllm.namespace import build_fingerprint
from s3kv.vllm.stats import S3KVPromMetrics, S3KVStats

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from s3kv.keys import Fingerprint

log = logging.getLogger("s3kv.vllm")

# vLLM's engine loop polls in a tight Python loop while requests wait for their
# KV, and holds the GIL for up to the interpreter's switch interval (5 ms) at a
# time; s3kv's I/O thread needs the GIL at every await. At 5 ms a warm load of
# an 8k-token prompt took 3-4x longer than at 0.5 ms (measured: TTFT 1.6-2.1 s
# vs 0.5 s), at no measurable cost to the engine's own throughput.
_SWITCH_INTERVAL_S = 0.0005


def _shorten_gil_switch_interval() -> None:
    if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
        sys.setswitchinterval(_SWITCH_INTERVAL_S)


def _backend_token_map(fp: Fingerprint, block_size: int) -> torch.Tensor | None:
    """The CPU attention kernel packs each block its own way (s3kv.vllm.cpu_layout);
    the GPU backends and MLA keep tokens in order, each token's K then V."""
    from vllm.platforms import current_platform

    if fp.attention == "mla" or not current_platform.is_cpu():
        return None
    import torch

    from s3kv.vllm.cpu_layout import cpu_token_map

    return cpu_token_map(getattr(torch, fp.dtype), block_size, fp.head_size)


class S3KVConnector(KVConnectorBase_V1, SupportsHMA):
    """Subclasses ``SupportsHMA``: vLLM keeps its hybrid KV cache manager on,
    and s3kv stores each KV cache group as its own section (``s3kv.groups``)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _shorten_gil_switch_interval()
        ktc = self._kv_transfer_config
        if getattr(ktc, "kv_load_failure_policy", "recompute") != "recompute":
            # A cache miss must never fail a request: a block that does not load
            # (missing, corrupt, slow) is recomputed. The scheduler reads this
            # policy after constructing its connector.
            ktc.kv_load_failure_policy = "recompute"
            if role == KVConnectorRole.SCHEDULER:
                log.info("s3kv: kv_load_failure_policy set to 'recompute' (s3kv is a cache)")
        self.settings = parse_settings(dict(ktc.kv_connector_extra_config or {}))
        block_size = int(vllm_config.cache_config.block_size)
        # A group kind s3kv cannot store stops start-up here, with its name.
        tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
        groups = (group_specs(kv_cache_config, block_size, tp_size)
                  if kv_cache_config is not None else ())
        if len(groups) <= 1:
            groups = ()  # one group of every layer: the layout s3kv always had
        self.counters = Counters()
        self._sched = None
        self._worker = None
        self.fingerprint: Fingerprint | None = None
        try:
            fp = build_fingerprint(vllm_config, self.settings)
        except WeightsUnresolved as exc:
            # Every role reaches this from the same config and files; each hook
            # below then answers as an engine without a connector. The
            # scheduler speaks for the engine, once.
            (log.warning if role == KVConnectorRole.SCHEDULER else log.debug)("%s", exc)
            return
        if groups:
            # Which layers share a block table, and how much of it they keep,
            # decides what a chunk's shards hold: part of the namespace.
            fp = dataclasses.replace(fp, groups=describe_groups(groups))
            check_state_sharding(groups, fp.num_kv_heads, fp.attention, tp_size)
        self.fingerprint = fp
        self._groups = groups
        can_load = bool(ktc.is_kv_consumer)
        can_save = bool(ktc.is_kv_producer)
        if role == KVConnectorRole.SCHEDULER:
            from s3kv.vllm.scheduler_side import SchedulerSide

            checkpoints = state_checkpoints(vllm_config, kv_cache_config)
            if any(g.kind == "state" for g in groups):
                log.info("s3kv: SSM states are stored where vLLM writes them: at step ends%s",
                         " and prefill checkpoints" if checkpoints else "")
            self._sched = SchedulerSide(
                self.settings, fp, block_size, can_load, can_save, self.counters,
                groups=groups, checkpoints=checkpoints)
            log.info("s3kv: namespace %s in s3://%s/%s", fp.namespace,
                     self.settings.store.bucket, self.settings.store.prefix)
        else:
            from vllm.distributed.parallel_state import get_tp_group

            from s3kv.vllm.worker_side import WorkerSide

            tp = get_tp_group()
            num_blocks = int(kv_cache_config.num_blocks) if kv_cache_config is not None else 0
            self._worker = WorkerSide(
                self.settings, fp, num_blocks, block_size, tp.rank_in_group,
                tp.world_size, list(tp.ranks), can_load, can_save, self.counters,
                token_map=_backend_token_map(fp, block_size), groups=groups,
            )

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # best-effort cache: a dropped save is a future miss, nothing more

    # --- worker side --------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._worker is not None:
            self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._worker is not None:
            t0 = time.perf_counter()
            self._worker.start_load_kv(self._meta())
            self.counters.add("forward_path_seconds", time.perf_counter() - t0)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return None  # whole chunks are copied once per step, in wait_for_save

    def wait_for_save(self) -> None:
        if self._worker is not None:
            t0 = time.perf_counter()
            self._worker.wait_for_save(self._meta())
            self.counters.add("forward_path_seconds", time.perf_counter() - t0)
            self.counters.add("forward_steps")

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return None, self._worker.get_finished() or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        results = super().get_transfer_results(finished_req_ids)
        if self._worker is not None:
            # Several KV cache groups: vLLM takes load failures per request.
            results.failed_recving = self._worker.take_failed_requests()
        return results

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        # Once per step on every rank, after wait_for_save: rank 0's commit
        # outcomes (the scheduler closes its save plans) and late loads.
        return self._worker.take_report() if self._worker is not None else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._sched is not None:
            # vLLM asks once per step, after the step's output is in: the
            # scheduler side times the step from here (s3kv.deadlines).
            self._sched.step_done()
        # Both roles report: vLLM merges the scheduler's stats with the workers'
        # (already summed across ranks) before logging and exporting them, so
        # lookups, hits and scheduler-side S3 requests reach Prometheus too.
        # Each role's counters are its own object, so nothing is counted twice.
        delta = self.counters.delta()
        return S3KVStats(data=delta) if delta else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return S3KVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> KVConnectorPromMetrics | None:
        return S3KVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def flush(self, timeout: float) -> bool:
        """Wait until every save submitted so far is committed (or failed) and every
        load started has finished; True if all did in time. For shutdown, tools
        and tests; never called on the forward path."""
        return self._worker.flush(timeout) if self._worker is not None else True

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    def _meta(self) -> S3KVMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, S3KVMetadata):
            raise TypeError(f"unexpected connector metadata {type(meta).__name__}")
        return meta

    # --- scheduler side -------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        if self._sched is None:
            return 0, False
        t0 = time.perf_counter()
        try:
            return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)
        finally:
            self.counters.add("scheduler_hook_seconds", time.perf_counter() - t0)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        if self._sched is not None:
            self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        if self._sched is None:
            return S3KVMetadata()
        t0 = time.perf_counter()
        try:
            return self._sched.build_connector_meta(scheduler_output)
        finally:
            self.counters.add("scheduler_hook_seconds", time.perf_counter() - t0)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._sched is not None:
            self._sched.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        if self._sched is not None:
            self._sched.request_finished(request)
        return False, None

    def request_finished_all_groups(self, request: Request, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        # Saves copy their blocks out in the step that completes them, so the
        # blocks may be freed at once in every group.
        return self.request_finished(request, block_ids[0] if block_ids else [])
