"""Every counter s3kv keeps, declared once.

Counters are named by string at the call site (``counters.add("bytes_saved")``),
which makes a typo a silently new, never-exported counter. Declaring each name
here, with its unit, help text and the side that emits it, lets
:class:`s3kv.stats.Counters` reject an undeclared name at once, lets the vLLM
adapter (:mod:`s3kv.vllm.stats`) export exactly this set to Prometheus, and
lets tests check the dashboards against it. Adding a counter means adding one
:class:`Metric` below; nothing else lists names.

Kept free of vLLM and torch, like the rest of the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Kind = Literal["counter"]
Side = Literal["scheduler", "worker"]

SCHEDULER: frozenset[Side] = frozenset({"scheduler"})
WORKER: frozenset[Side] = frozenset({"worker"})
BOTH: frozenset[Side] = frozenset({"scheduler", "worker"})

# vLLM exports connector metrics under its own ``vllm:`` namespace; the name is
# part of the public surface (dashboards, alerts), so it is fixed here.
PROMETHEUS_PREFIX = "vllm:s3kv_"
# prometheus_client exposes a counter ``x`` as the sample ``x_total``.
COUNTER_SUFFIX = "_total"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    unit: str
    help: str
    sides: frozenset[Side]

    @property
    def prometheus_name(self) -> str:
        """The name the metric is registered under (what ``# HELP`` shows)."""
        return PROMETHEUS_PREFIX + self.name

    @property
    def exposed_name(self) -> str:
        """The sample name a query must use: counters gain ``_total``."""
        return self.prometheus_name + COUNTER_SUFFIX


def _c(name: str, unit: str, sides: frozenset[Side], help: str) -> Metric:
    return Metric(name=name, kind="counter", unit=unit, help=help, sides=sides)


_ALL: tuple[Metric, ...] = (
    # --- S3 requests, counted by s3kv.store.counting.CountingStore on both sides ---
    _c("get_requests", "requests", BOTH,
       "S3 GET requests issued, whole and ranged (manifests and shards)"),
    _c("put_requests", "requests", BOTH,
       "S3 PUT requests issued (shards, manifests, namespace description)"),
    _c("head_requests", "requests", BOTH, "S3 HEAD requests issued"),
    _c("list_requests", "requests", BOTH, "S3 LIST requests issued (one per page)"),
    _c("delete_requests", "requests", BOTH,
       "S3 DeleteObjects requests issued (up to 1,000 keys each)"),
    # --- hedged reads, counted by s3kv.store.hedged.HedgedStore on both sides ---
    _c("hedged_gets", "requests", BOTH,
       "Second GETs sent for a read not answered within the hedge delay "
       "(also counted in get_requests)"),
    _c("hedge_wins", "requests", BOTH,
       "Reads answered by the hedged second GET rather than the first"),
    # --- scheduler: lookups ---
    _c("lookups", "lookups", SCHEDULER, "Manifest lookups started for a request's chunks"),
    _c("hit_chunks", "chunks", SCHEDULER, "Chunks found committed by a lookup"),
    _c("hit_tokens", "tokens", SCHEDULER, "Prompt tokens offered to vLLM from the cache"),
    _c("hit_misalignments", "chunks", SCHEDULER,
       "Hit chunks dropped because their id was not the id of the blocks they would fill "
       "(a bug guard: must stay 0)"),
    _c("window_short_hits", "requests", SCHEDULER,
       "Hits cut short because a sliding-window group's stored blocks did not cover "
       "its window at the hit's end"),
    _c("state_short_hits", "requests", SCHEDULER,
       "Hits cut short because the chunk they would end on holds no SSM state (the step "
       "that computed it did not end on its boundary)"),
    _c("miss_requests", "requests", SCHEDULER,
       "Cache queries answered with no tokens (the request computes its prefill)"),
    _c("lookup_errors", "lookups", SCHEDULER, "Lookups that failed with an S3 error"),
    _c("lookup_deadline_misses", "lookups", SCHEDULER,
       "Lookups with no answer by their deadline (the request is served as a miss)"),
    _c("lookups_truncated", "lookups", SCHEDULER,
       "Lookups past their deadline with a partial answer (the prefix found so far is used)"),
    _c("lookups_skipped_store_down", "lookups", SCHEDULER,
       "Lookups not started because the circuit breaker is open (served as a miss)"),
    _c("breaker_opens", "events", SCHEDULER,
       "Times the circuit breaker opened (S3 down or stalled: the cache is bypassed)"),
    _c("breaker_probes", "probes", SCHEDULER,
       "Background probes (one small GET each) sent while the circuit breaker is open"),
    _c("breaker_opens_errors", "events", SCHEDULER,
       "Breaker openings on S3 errors (refused, reset, 5xx or throttled after retries, "
       "client timeouts, denied credentials)"),
    _c("breaker_opens_stalled", "events", SCHEDULER,
       "Breaker openings on a stall: lookups unanswered in a row and no answer at all "
       "for longer than the store normally takes"),
    _c("breaker_closes", "events", SCHEDULER,
       "Times the circuit breaker closed again (a probe was answered)"),
    _c("breaker_open_seconds", "seconds", SCHEDULER,
       "Seconds the cache was off because the circuit breaker was open (counted at close)"),
    _c("cache_wait_seconds", "seconds", SCHEDULER,
       "Seconds requests spent waiting for lookups and loads before computing"),
    _c("recompute_seconds_saved_est", "seconds", SCHEDULER,
       "Estimated prefill seconds of the tokens loaded from the cache"),
    _c("scheduler_hook_seconds", "seconds", SCHEDULER,
       "Seconds the scheduler spent in s3kv's connector hooks"),
    # --- scheduler: save planning and load outcomes ---
    _c("planned_chunks", "chunks", SCHEDULER, "Chunks planned for saving"),
    _c("admission_skipped", "chunks", SCHEDULER, "Full chunks the admission policy did not save"),
    _c("saves_skipped_store_down", "chunks", SCHEDULER,
       "Chunk saves not planned because the circuit breaker is open"),
    _c("save_plans_failed", "chunks", SCHEDULER,
       "Planned saves that did not commit (dropped, failed, round lost): planned again "
       "the next time the chunk is computed"),
    _c("save_outcomes_lost", "chunks", SCHEDULER,
       "Planned saves whose outcome never came back within the commit timeout "
       "(planned again)"),
    _c("failed_loads", "requests", SCHEDULER,
       "Requests with at least one chunk that failed to load (those blocks recompute)"),
    # --- worker: saves and commits ---
    _c("bytes_saved", "bytes", WORKER, "Shard bytes uploaded"),
    _c("shard_conflicts", "shards", WORKER,
       "Shard keys found holding other bytes: not overwritten, chunk not committed "
       "(a bug guard: must stay 0)"),
    _c("save_seconds", "seconds", WORKER, "Seconds spent in shard PUT requests"),
    _c("upload_failures", "shards", WORKER, "Shard uploads that failed after retries"),
    _c("saves_dropped", "chunks", WORKER,
       "Chunk saves dropped because upload memory (max_inflight_mib) was full"),
    _c("chunks_committed", "chunks", WORKER, "Chunks committed (manifest written)"),
    _c("chunks_already_committed", "chunks", WORKER,
       "Chunks another writer committed first (manifest PUT refused with 412)"),
    _c("chunks_not_committed", "chunks", WORKER,
       "Chunks not committed because a rank's upload failed or ranks disagreed"),
    _c("commit_failures", "chunks", WORKER, "Manifest writes that failed"),
    _c("commit_gather_failures", "events", WORKER,
       "Commit gathers that timed out or lost a peer (saving pauses while the group re-forms)"),
    _c("commit_group_reforms", "events", WORKER,
       "Times the commit group was re-formed after a failed gather (saving resumed)"),
    _c("commit_rounds_skipped", "rounds", WORKER,
       "Save rounds reported failed because the commit group was re-forming or resyncing"),
    # --- worker: loads and the forward path ---
    _c("bytes_loaded", "bytes", WORKER, "Shard bytes loaded and verified"),
    _c("load_seconds", "seconds", WORKER, "Seconds spent fetching and verifying shards"),
    _c("loaded_chunks", "chunks", WORKER, "Chunks loaded from S3 (counted per rank)"),
    _c("load_failures", "chunks", WORKER,
       "Chunk loads that failed verification, errored or timed out (recomputed)"),
    _c("load_deadline_misses", "chunks", WORKER,
       "Chunk loads abandoned at their deadline (recomputed)"),
    _c("forward_path_seconds", "seconds", WORKER,
       "Seconds the forward path spent in the connector (copy-out, hand-off)"),
    _c("forward_steps", "steps", WORKER, "Steps seen by the worker connector"),
)


def _index(metrics: tuple[Metric, ...]) -> Mapping[str, Metric]:
    out: dict[str, Metric] = {}
    for m in metrics:
        if m.name in out:
            raise ValueError(f"metric {m.name!r} declared twice in s3kv/metrics.py")
        out[m.name] = m
    return MappingProxyType(out)


METRICS: Mapping[str, Metric] = _index(_ALL)


def undeclared(name: str) -> ValueError:
    """The error for a counter name nobody declared: raised where it is used,
    so a typo fails the first test that reaches it instead of vanishing."""
    return ValueError(f"undeclared s3kv metric {name!r}: declare it in s3kv/metrics.py "
                      f"(name, unit, help, side) before counting it")


def exposed_names() -> frozenset[str]:
    """Every sample name a Prometheus query may use for an s3kv metric."""
    return frozenset(m.exposed_name for m in METRICS.values())


__all__ = [
    "BOTH",
    "METRICS",
    "PROMETHEUS_PREFIX",
    "SCHEDULER",
    "WORKER",
    "Kind",
    "Metric",
    "Side",
    "exposed_names",
    "undeclared",
]
