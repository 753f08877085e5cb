"""Replay a request trace through a simulated fleet of vLLM engines with s3kv.

The engine rules, as s3kv and vLLM behave:

* Each engine prefills its requests one at a time, first come first served:
  a request starts at ``max(arrival, engine free)``.
* A request can hit at most ``(input_tokens - 1) // chunk_tokens`` chunks
  (vLLM always computes the last prompt token). Its hits are, first, the
  longest prefix of its chunks in its engine's local prefix cache, then,
  from there on, the longest run of chunks committed in S3 at its start.
* Its prefill takes one lookup round trip (``first_byte_s``; only with the
  S3 tier on and chunks left after the local hit), the S3 load
  (``first_byte_s`` plus the bytes at the engine's bandwidth) and its
  computed tokens at ``prefill_tokens_per_s``. A load that would take longer
  than recomputing its tokens, and longer than the ``min_load_wait_s``
  floor, is not made (s3kv's load deadline: waiting for the cache never
  costs more than recomputing, but a healthy transfer is never cut short for
  being slower than a tiny recompute); those tokens are computed.
  TTFT is the prefill's end minus the arrival.
* After the prefill every full chunk of the request enters (or is touched
  in) the engine's local cache, an LRU by bytes, tail first as vLLM frees a
  request's blocks in reverse so that prefixes outlive their tails. Each
  full chunk not yet committed or in flight in S3 goes to the engine's own
  :class:`s3kv.admission.AdmissionPolicy` and, if admitted, commits one
  round trip after the prefill (:mod:`s3kv.replay.tier`).
* GC runs every ``gc_interval_s`` of virtual time from the first arrival,
  with ``s3kv gc``'s own selection, and once more at the end, so every
  stored-bytes sample follows a GC pass as a periodic job would leave it.

Chunk ids are s3kv's own (:mod:`s3kv.replay.chunks`), routing is in
:mod:`s3kv.replay.routing`. Events are processed in time order; at equal
times prefill ends come before GC runs, and GC runs before prefill starts,
and a commit is visible to a lookup at its own instant. Nothing here reads
a clock: the same trace and config give the same report, but ``wall_s``.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from s3kv.admission import AdmissionPolicy, Mode
from s3kv.config import Settings
from s3kv.replay.chunks import ChunkTable, chunk_table, distinct_chunk_bytes, trace_chunk_ids
from s3kv.replay.fleet import (
    PROFILES,
    ROUTINGS,
    FleetConfig,
    FleetConfigError,
    Routing,
    StoreProfile,
    kv_from_hf_config,
    model_preset,
)
from s3kv.replay.report import ReplayReport, percentile, span_dollars
from s3kv.replay.routing import route_all
from s3kv.replay.tier import KINDS, Tier
from s3kv.replay.trace import Trace, upper_bound_hit_tokens

Progress = Callable[[int, int], None]

# The load deadline's floor: the connector's default, from its settings.
MIN_LOAD_WAIT_S: float = next(f.default for f in dataclasses.fields(Settings)
                              if f.name == "min_load_wait_s")  # type: ignore[assignment]

# Event kinds, in their order at equal times.
_FINISH, _START = 0, 2


@dataclass
class _Run:
    """One simulated run's raw results."""

    local_chunks: int = 0
    s3_chunks: int = 0
    skipped_chunks: int = 0
    ttfts: list[float] = dataclasses.field(default_factory=list)
    events: int = 0
    start_s: float = 0.0
    end_s: float = 0.0
    tier: Tier | None = None


class _Engine:
    """One engine's queue, local prefix cache and admission policy."""

    def __init__(self, capacity: int | None, admission: AdmissionPolicy | None) -> None:
        self.queue: list[int] = []  # its requests in arrival order
        self.next = 0
        # None: unbounded (a set is enough); capacity 0: no local cache at all.
        self.capacity = capacity
        self.unbounded: set[int] | None = set() if capacity is None else None
        self.lru: OrderedDict[int, None] | None = (
            OrderedDict() if capacity is not None and capacity > 0 else None)
        self.admission = admission

    def local_hits(self, ids: tuple[int, ...], limit: int) -> int:
        k = 0
        held = self.unbounded if self.unbounded is not None else self.lru
        if held is None:
            return 0
        while k < limit and ids[k] in held:
            k += 1
        return k

    def keep(self, ids: tuple[int, ...]) -> None:
        if self.unbounded is not None:
            self.unbounded.update(ids)
            return
        lru = self.lru
        if lru is None or self.capacity is None:
            return
        for c in reversed(ids):  # tail first: the prefix ends most recently used
            lru[c] = None
            lru.move_to_end(c)
        while len(lru) > self.capacity:
            lru.popitem(last=False)


def _simulate(trace: Trace, table: ChunkTable, cfg: FleetConfig, engine_of: list[int],
              s3: bool, tick: Callable[[], None]) -> _Run:
    reqs = trace.requests
    run = _Run()
    chunk_tokens = cfg.chunk_tokens
    pps = cfg.prefill_tokens_per_s
    profile = cfg.profile
    first_byte = profile.first_byte_s
    load_s_per_chunk = cfg.chunk_bytes / cfg.load_bytes_per_s
    recompute_s_per_chunk = chunk_tokens / pps
    capacity = (None if cfg.local_cache_bytes is None
                else cfg.local_cache_bytes // cfg.chunk_bytes)
    mode: Mode = cfg.admission  # type: ignore[assignment]  # validated by FleetConfig
    engines = [_Engine(capacity, AdmissionPolicy(mode, cfg.admission_window) if s3 else None)
               for _ in range(cfg.engines)]
    for i, e in enumerate(engine_of):
        engines[e].queue.append(i)
    tier = Tier(table, cfg) if s3 else None
    run.tier = tier
    t0 = reqs[0].arrival_s
    run.start_s = t0
    gc_on = tier is not None and cfg.gc_enabled
    interval = cfg.gc_interval_s
    marks = 1  # the next GC/sample mark is t0 + marks * interval
    last_mark = t0

    heap: list[tuple[float, int, int, int]] = []  # (time, kind, engine, request)
    for e, eng in enumerate(engines):
        if eng.queue:
            heapq.heappush(heap, (reqs[eng.queue[0]].arrival_s, _START, e, eng.queue[0]))
    run.events += len(reqs)  # arrivals
    last_finish = t0

    def mark(at: float) -> None:
        nonlocal last_mark
        if tier is None:
            return
        if gc_on:
            tier.gc(at)
        tier.sample(at)
        last_mark = at

    while heap:
        now, kind, e, r = heapq.heappop(heap)
        if tier is not None:
            while (m := t0 + marks * interval) < now or (m == now and kind > _FINISH):
                mark(m)
                marks += 1
        eng = engines[e]
        req = reqs[r]
        ids = table.requests[r]
        if kind == _START:
            limit = (req.input_tokens - 1) // chunk_tokens
            local = eng.local_hits(ids, limit)
            used = 0
            seconds = 0.0
            if tier is not None and local < limit:
                seconds = first_byte  # the lookup round trip
                found = tier.lookup(ids, local, limit, now)
                if found:
                    load = first_byte + found * load_s_per_chunk
                    # s3kv's load deadline: the recompute estimate, never
                    # under the min_load_wait_s floor (Settings' default).
                    if load <= max(MIN_LOAD_WAIT_S, found * recompute_s_per_chunk):
                        tier.load(ids[local:local + found], now + seconds)
                        seconds += load
                        used = found
                    else:
                        run.skipped_chunks += found
            run.local_chunks += local
            run.s3_chunks += used
            computed = req.input_tokens - (local + used) * chunk_tokens
            finish = now + seconds + computed / pps
            heapq.heappush(heap, (finish, _FINISH, e, r))
            continue
        # A prefill ends at ``now``.
        run.events += 1
        run.ttfts.append(now - req.arrival_s)
        last_finish = now
        eng.keep(ids)
        if tier is not None and eng.admission is not None:
            tier.offer(ids, now, eng.admission)
        eng.next += 1
        if eng.next < len(eng.queue):
            nxt = eng.queue[eng.next]
            heapq.heappush(heap, (max(now, reqs[nxt].arrival_s), _START, e, nxt))
        tick()

    end = last_finish
    if tier is not None:
        end = max(end, tier.last_commit_s)
        while (m := t0 + marks * interval) <= end:
            mark(m)
            marks += 1
        if gc_on and last_mark != end:
            mark(end)
        tier.sample(end)
        tier.close(end)
        run.events += tier.committed_chunks + tier.gc_runs
    run.end_s = end
    return run


def replay(trace: Trace, cfg: FleetConfig, progress: Progress | None = None) -> ReplayReport:
    """Replay ``trace`` through the fleet ``cfg`` describes, and once more without
    the S3 tier (same routing) for the TTFT comparison, unless ``cfg.s3`` is off.

    ``progress(done, total)`` follows the prefills of both runs.
    """
    if not trace.requests:
        raise ValueError("trace: no requests to replay")
    started = time.perf_counter()
    table = chunk_table(trace, cfg.chunk_tokens)
    engine_of = route_all(trace, cfg)
    runs = 2 if cfg.s3 else 1
    total = runs * len(trace.requests)
    step = max(1, total // 200)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None and (done % step == 0 or done == total):
            progress(done, total)

    main = _simulate(trace, table, cfg, engine_of, cfg.s3, tick)
    base = _simulate(trace, table, cfg, engine_of, False, tick) if cfg.s3 else main
    return _report(trace, cfg, main, base, time.perf_counter() - started)


def _report(trace: Trace, cfg: FleetConfig, main: _Run, base: _Run, wall_s: float
            ) -> ReplayReport:
    c = cfg.chunk_tokens
    input_tokens = trace.input_tokens
    local_tokens, s3_tokens = main.local_chunks * c, main.s3_chunks * c
    span = main.end_s - main.start_s
    per_day = 86400 / span if span > 0 else 0.0
    tier = main.tier
    saved_s = s3_tokens / cfg.prefill_tokens_per_s
    if tier is not None:
        dollars = span_dollars(cfg, tier.counts, tier.byte_seconds, tier.committed_chunks,
                               tier.loaded_chunks)
        counts = dict(tier.counts)
        peaks = tier.peak_rps()
        busiest = tier.busiest_partition_rps()
        by_kind = {k: tier.busiest_partition_rps(k) for k in KINDS}
        series = list(tier.series)
        deleted = (tier.gc_deleted_chunks, tier.gc_deleted_bytes)
        committed, gc_runs = tier.committed_chunks, tier.gc_runs
    else:
        dollars = dict.fromkeys(("put", "get", "storage", "transfer", "total"), 0.0)
        counts = dict.fromkeys(KINDS, 0)
        peaks = dict.fromkeys(KINDS, 0.0)
        busiest, by_kind, series, deleted = 0.0, dict.fromkeys(KINDS, 0.0), [], (0, 0)
        committed = gc_runs = 0
    return ReplayReport(
        config=cfg,
        requests=len(trace.requests),
        input_tokens=input_tokens,
        upper_bound_tokens=upper_bound_hit_tokens(trace),
        local_hit_tokens=local_tokens,
        s3_hit_tokens=s3_tokens,
        computed_tokens=input_tokens - local_tokens - s3_tokens,
        prefill_seconds_saved=saved_s,
        ttft_p50_s=percentile(main.ttfts, 0.5),
        ttft_p99_s=percentile(main.ttfts, 0.99),
        ttft_p50_no_s3_s=percentile(base.ttfts, 0.5),
        ttft_p99_no_s3_s=percentile(base.ttfts, 0.99),
        s3_requests=counts,
        s3_peak_rps=peaks,
        busiest_partition_rps=busiest,
        bytes_stored_series=series,
        gc_deleted_chunks=deleted[0],
        gc_deleted_bytes=deleted[1],
        dollars_per_day={k: v * per_day for k, v in dollars.items()},
        gpu_dollars_per_day_saved=saved_s * cfg.tp / 3600 * cfg.gpu_dollars_per_hour * per_day,
        tokens_saved_per_s3_dollar=s3_tokens / dollars["total"] if dollars["total"] > 0 else 0.0,
        events=main.events + (base.events if base is not main else 0),
        wall_s=wall_s,
        s3_skipped_tokens=main.skipped_chunks * c,
        span_s=span,
        committed_chunks=committed,
        gc_runs=gc_runs,
        busiest_partition_rps_by_kind=by_kind,
    )


__all__ = ["PROFILES", "ROUTINGS", "FleetConfig", "FleetConfigError", "Progress",
           "ReplayReport", "Routing", "StoreProfile", "distinct_chunk_bytes",
           "kv_from_hf_config", "model_preset", "replay", "trace_chunk_ids"]
