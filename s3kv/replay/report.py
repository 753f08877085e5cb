"""What a replay found, and the dollars it adds up to.

Money follows :func:`s3kv.capacity.estimate` term by term, from counts
instead of rates: requests at the storage class's list prices (DELETEs are
free on S3 and cost nothing here), storage as the integral of the bytes
stored over virtual time in GB-months of 30 days, and, for S3 Express, the
per-GB charge on the part of each shard beyond 512 KiB, on upload and on
retrieval. Each figure covers the replay's span (first arrival to the last
prefill or commit) and is scaled to a day by ``86400 / span``: an overloaded
fleet that serves the trace over a longer time is charged per day of that
time, as it would be.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from s3kv.capacity import SECONDS_PER_MONTH, s3_dollars
from s3kv.replay.fleet import FleetConfig

#: Version of :meth:`ReplayReport.to_json`'s document.
JSON_VERSION = 1


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between order statistics
    (numpy's default); 0.0 for no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"q: must be in [0, 1], got {q!r}")
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def span_dollars(cfg: FleetConfig, counts: dict[str, int], byte_seconds: float,
                 committed_chunks: int, loaded_chunks: int) -> dict[str, float]:
    """S3 dollars over a replay's span, by kind (``put``, ``get``, ``storage``,
    ``transfer``, ``total``). 404 GETs are billed as GETs."""
    shards = cfg.shards
    return s3_dollars(
        cfg.storage_class, puts=counts["put"], gets=counts["get"] + counts["get_miss"],
        gb_months=byte_seconds / 1e9 / SECONDS_PER_MONTH, shard_bytes=cfg.chunk_bytes / shards,
        shards_put=shards * committed_chunks, shards_got=shards * loaded_chunks)


@dataclass
class ReplayReport:
    """A replay's figures; plain data (:meth:`to_json`), rendered by the CLI.

    Token figures split every input token three ways: served from the
    engine's local prefix cache, loaded from S3, or computed.
    ``prefill_seconds_saved`` and ``gpu_dollars_per_day_saved`` count the
    S3 hits only (the compute they avoid at ``prefill_tokens_per_s``): local
    prefix caching needs no s3kv, and a load's wait is not GPU work (vLLM
    runs other requests meanwhile). ``tokens_saved_per_s3_dollar`` is 0.0
    when the S3 tier cost nothing (off, or never used), never infinite.
    ``events`` counts arrivals, prefill finishes, commits and GC runs of every
    run the report needed (with the S3 tier and, for the comparison, without),
    the same runs ``wall_s`` times.
    """

    config: FleetConfig
    requests: int
    input_tokens: int
    upper_bound_tokens: int
    local_hit_tokens: int
    s3_hit_tokens: int
    computed_tokens: int
    prefill_seconds_saved: float
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_p50_no_s3_s: float
    ttft_p99_no_s3_s: float
    s3_requests: dict[str, int]
    s3_peak_rps: dict[str, float]
    busiest_partition_rps: float
    bytes_stored_series: list[tuple[float, int]]
    gc_deleted_chunks: int
    gc_deleted_bytes: int
    dollars_per_day: dict[str, float]
    gpu_dollars_per_day_saved: float
    tokens_saved_per_s3_dollar: float
    events: int
    wall_s: float
    # Additions beyond the figures above; defaults keep plain construction working.
    #: S3 hits found but not loaded: the load would have taken longer than
    #: recomputing them (counted in ``computed_tokens``).
    s3_skipped_tokens: int = 0
    #: Seconds of virtual time the per-day figures are scaled from.
    span_s: float = 0.0
    committed_chunks: int = 0
    gc_runs: int = 0
    #: Per kind, the busiest partition's requests in its busiest second
    #: (S3's per-prefix limits are per kind: 3,500 PUT and 5,500 GET per second).
    busiest_partition_rps_by_kind: dict[str, float] = field(default_factory=dict)

    @property
    def hit_fraction(self) -> float:
        """(local + S3 hit tokens) / input tokens."""
        if not self.input_tokens:
            return 0.0
        return (self.local_hit_tokens + self.s3_hit_tokens) / self.input_tokens

    @property
    def of_upper_bound(self) -> float:
        """Hit tokens as a fraction of the trace's upper bound (0.0 when the bound is 0)."""
        if not self.upper_bound_tokens:
            return 0.0
        return (self.local_hit_tokens + self.s3_hit_tokens) / self.upper_bound_tokens

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: plain numbers, lists and string keys (no inf or NaN)."""
        doc: dict[str, Any] = {"version": JSON_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "config":
                value = dataclasses.asdict(value)
            elif f.name == "bytes_stored_series":
                value = [[t, b] for t, b in value]
            elif isinstance(value, dict):
                value = dict(value)
            doc[f.name] = value
        doc["hit_fraction"] = self.hit_fraction
        doc["of_upper_bound"] = self.of_upper_bound
        return doc


__all__ = ["JSON_VERSION", "ReplayReport", "percentile", "span_dollars"]
