"""What would s3kv save on real traffic? The Mooncake conversation trace
replayed through simulated fleets (``s3kv.replay``), over a grid of fleets.

    .venv/bin/python bench/replay.py [--trace PATH] [--limit N] [--engines 1,4,16]
        [--caches 10,1,0.1] [--full] [--no-sensitivity] [--name NAME]

Every cell is one :func:`s3kv.replay.sim.replay` run: request arrivals in
virtual time through s3kv's own chunk ids, admission, GC and prices. Model:
70B class (327,680 KV bytes per token, 8 KV heads), TP 4, 256-token chunks,
10,000 prefill tokens/s per engine, S3 Standard. The grid: engines x routing
(random, prefix-affinity; one engine has no routing) x local prefix cache per
engine (a percentage of the trace's distinct KV bytes) x S3 tier off / on
with admission ``all`` / ``second_sighting`` (``--full`` adds round-robin).

The S3 tier only serves a hit when loading it is faster than recomputing it
(s3kv's deadline rule, with its 1 s floor), so whether S3 pays hinges on load
bandwidth against prefill speed: at 6 GB/s per engine (Standard's profile) a
70B engine loads 18k tokens/s against 10k prefilled. The sensitivity block
re-runs the 16-engine, 1% cells with S3 Express, with Standard at 2 GB/s per
engine (slower than prefill: S3 stops paying) and with half the prefill
speed. The bottom line is the prefill tokens the S3 tier saves beyond the
same fleet without it, per dollar of S3.

Writes ``bench/results/replay_<name>.json`` (default name: the trace file's
stem without ``_trace``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, ROOT, machine_info
from s3kv.replay.chunks import distinct_chunk_bytes
from s3kv.replay.sim import FleetConfig, ReplayReport, replay
from s3kv.replay.trace import Trace, read_trace, upper_bound_hit_tokens

TRACE = ROOT / "bench" / "data" / "mooncake" / "conversation_trace.jsonl"
BASE = FleetConfig(kv_bytes_per_token=327_680, num_kv_heads=8, tp=4, chunk_tokens=256,
                   prefill_tokens_per_s=10_000.0, storage_class="standard")
TIERS = ((False, "all"), (True, "all"), (True, "second_sighting"))


@dataclasses.dataclass(frozen=True)
class Cell:
    engines: int
    routing: str
    cache_pct: float
    s3: bool
    admission: str = "all"
    storage_class: str = "standard"
    prefill_tokens_per_s: float = BASE.prefill_tokens_per_s
    load_gbps: float | None = None  # None: the storage class's

    @property
    def fleet(self) -> tuple[int, str, float, float]:
        """What the S3-off baseline of this cell shares with it."""
        return (self.engines, self.routing, self.cache_pct, self.prefill_tokens_per_s)

    def config(self, distinct_bytes: int) -> FleetConfig:
        return dataclasses.replace(
            BASE, engines=self.engines, routing=self.routing,  # type: ignore[arg-type]
            local_cache_bytes=int(self.cache_pct / 100 * distinct_bytes), s3=self.s3,
            admission=self.admission, storage_class=self.storage_class,
            prefill_tokens_per_s=self.prefill_tokens_per_s, load_gbps=self.load_gbps)


def grid(engines: list[int], routings: list[str], caches: list[float]) -> list[Cell]:
    return [Cell(n, routing, pct, s3, admission)
            for n in engines
            for routing in (routings if n > 1 else ["random"])
            for pct in caches
            for s3, admission in TIERS]


def sensitivity(engines: int, cache_pct: float) -> list[Cell]:
    slow = BASE.prefill_tokens_per_s / 2
    cells = []
    for routing in ("random", "prefix-affinity"):
        cells.append(Cell(engines, routing, cache_pct, True, storage_class="express"))
        cells.append(Cell(engines, routing, cache_pct, True, load_gbps=2.0))
        cells.append(Cell(engines, routing, cache_pct, False, prefill_tokens_per_s=slow))
        cells.append(Cell(engines, routing, cache_pct, True, prefill_tokens_per_s=slow))
    return cells


def summarise(cell: Cell, r: ReplayReport) -> dict[str, Any]:
    return {
        "engines": cell.engines, "routing": cell.routing if cell.engines > 1 else "-",
        "local_cache_pct": cell.cache_pct, "s3": cell.s3,
        "admission": cell.admission if cell.s3 else "-",
        "storage_class": cell.storage_class if cell.s3 else "-",
        "prefill_tokens_per_s": cell.prefill_tokens_per_s,
        "load_gbps": cell.load_gbps,
        "local_cache_bytes": r.config.local_cache_bytes,
        "input_tokens": r.input_tokens, "hit_fraction": r.hit_fraction,
        "local_hit_tokens": r.local_hit_tokens, "s3_hit_tokens": r.s3_hit_tokens,
        "s3_skipped_tokens": r.s3_skipped_tokens, "of_upper_bound": r.of_upper_bound,
        "ttft_p50_s": r.ttft_p50_s, "ttft_p99_s": r.ttft_p99_s,
        "ttft_p50_no_s3_s": r.ttft_p50_no_s3_s, "ttft_p99_no_s3_s": r.ttft_p99_no_s3_s,
        "s3_requests": r.s3_requests, "s3_peak_rps": r.s3_peak_rps,
        "busiest_partition_rps": r.busiest_partition_rps,
        "committed_chunks": r.committed_chunks,
        "peak_bytes_stored": max((b for _, b in r.bytes_stored_series), default=0),
        "dollars_per_day": r.dollars_per_day,
        "gpu_dollars_per_day_saved": r.gpu_dollars_per_day_saved,
        "tokens_saved_per_s3_dollar": r.tokens_saved_per_s3_dollar,
        "events": r.events, "wall_s": r.wall_s, "events_per_s": r.events / max(r.wall_s, 1e-9),
        "span_s": r.span_s,
    }


def add_marginal(cells: list[Cell], rows: list[dict[str, Any]]) -> None:
    """What the S3 tier adds over the same fleet without it, per S3 dollar.

    Hit tokens beyond the S3-off run of the same fleet, scaled to a day like
    the dollars (over the replay's span), divided by S3 dollars per day; and
    GPU dollars of prefill saved per S3 dollar.
    """
    off = {c.fleet: r for c, r in zip(cells, rows, strict=True) if not c.s3}
    for c, r in zip(cells, rows, strict=True):
        base = off[c.fleet]
        extra = (r["local_hit_tokens"] + r["s3_hit_tokens"]
                 - base["local_hit_tokens"] - base["s3_hit_tokens"])
        dollars = r["dollars_per_day"].get("total", 0.0)
        on = c.s3 and dollars > 0
        r["extra_hit_tokens_vs_no_s3"] = extra
        r["extra_tokens_per_s3_dollar"] = extra * 86400 / r["span_s"] / dollars if on else None
        r["gpu_dollars_per_s3_dollar"] = r["gpu_dollars_per_day_saved"] / dollars if on else None


HEADER = (f"{'eng':>3} {'routing':<15} {'cache':>6} {'S3':<26} {'hit%':>5} {'local%':>6} "
          f"{'S3%':>5} {'skip%':>5} {'bound':>5} {'TTFT p50/p99 s':>15} {'PUT':>9} "
          f"{'GET':>9} {'$/day':>7} {'tok/$':>8} {'GPU$/S3$':>8} {'ev/s':>7}")


def table_line(r: dict[str, Any]) -> str:
    tier = "off"
    if r["s3"]:
        tier = f"{r['storage_class']}, {r['admission']}"
    if r["prefill_tokens_per_s"] != BASE.prefill_tokens_per_s:
        tier += f" @{r['prefill_tokens_per_s'] / 1000:g}k"
    if r.get("load_gbps") is not None:
        tier += f" {r['load_gbps']:g}GB/s"
    inp = r["input_tokens"]
    per_dollar, roi = r["extra_tokens_per_s3_dollar"], r["gpu_dollars_per_s3_dollar"]
    return (f"{r['engines']:>3} {r['routing']:<15} {r['local_cache_pct']:>5g}% {tier:<26} "
            f"{100 * r['hit_fraction']:>5.1f} {100 * r['local_hit_tokens'] / inp:>6.1f} "
            f"{100 * r['s3_hit_tokens'] / inp:>5.1f} {100 * r['s3_skipped_tokens'] / inp:>5.1f} "
            f"{100 * r['of_upper_bound']:>4.0f}% "
            f"{r['ttft_p50_s']:>7.2f}/{r['ttft_p99_s']:<7.2f} "
            f"{r['s3_requests'].get('put', 0):>9,} {r['s3_requests'].get('get', 0):>9,} "
            f"{r['dollars_per_day'].get('total', 0.0):>7.0f} "
            f"{'-' if per_dollar is None else f'{per_dollar / 1e6:,.2f}M':>8} "
            f"{'-' if roi is None else f'{roi:.2f}':>8} {r['events_per_s']:>7,.0f}")


def bottom_line(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("engines", "routing", "local_cache_pct", "storage_class", "admission",
            "prefill_tokens_per_s", "extra_tokens_per_s3_dollar", "gpu_dollars_per_s3_dollar",
            "dollars_per_day")
    on = [r for r in rows if r["s3"]]
    grid_on = [r for r in on if r["storage_class"] == "standard"
               and r["prefill_tokens_per_s"] == BASE.prefill_tokens_per_s
               and r.get("load_gbps") is None]

    def best(rs: list[dict[str, Any]]) -> dict[str, Any] | None:
        rs = [r for r in rs if r["extra_tokens_per_s3_dollar"] is not None]
        if not rs:
            return None
        b = max(rs, key=lambda r: r["extra_tokens_per_s3_dollar"])
        return {k: b[k] for k in keys}

    return {"grid_best": best(grid_on), "any_best": best(on),
            "grid_s3_hit_tokens": sum(r["s3_hit_tokens"] for r in grid_on),
            "grid_s3_dollars_per_day_max": max(
                (r["dollars_per_day"].get("total", 0.0) for r in grid_on), default=0.0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    ap.add_argument("--engines", default="1,4,16", help="engine counts (comma separated)")
    ap.add_argument("--caches", default="10,1,0.1",
                    help="local cache per engine, %% of the trace's distinct KV bytes")
    ap.add_argument("--full", action="store_true", help="also round-robin routing")
    ap.add_argument("--no-sensitivity", action="store_true",
                    help="skip the Express / slower-prefill cells")
    ap.add_argument("--name", default=None, help="results go to replay_<name>.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    t0 = time.time()
    trace: Trace = read_trace(args.trace, limit=args.limit)
    read_s = time.time() - t0
    distinct = distinct_chunk_bytes(trace, BASE.chunk_tokens, BASE.kv_bytes_per_token)
    bound = upper_bound_hit_tokens(trace)
    print(f"{args.trace.name}: {len(trace.requests):,} requests over {trace.duration_s:,.0f} s, "
          f"{trace.input_tokens:,} input tokens, upper bound {bound / trace.input_tokens:.1%}, "
          f"distinct KV {distinct / 2**40:.2f} TiB at {BASE.chunk_tokens}-token chunks "
          f"(read in {read_s:.1f} s)")
    engines = [int(x) for x in args.engines.split(",")]
    caches = [float(x) for x in args.caches.split(",")]
    routings = ["random", "prefix-affinity"] + (["round-robin"] if args.full else [])
    cells = grid(engines, routings, caches)
    if not args.no_sensitivity:
        cells += sensitivity(max(engines), 1.0 if 1.0 in caches else caches[0])
    rows = []
    for i, cell in enumerate(cells, 1):
        report = replay(trace, cell.config(distinct))
        rows.append(summarise(cell, report))
        print(f"  [{i}/{len(cells)}] {cell}: {report.events / max(report.wall_s, 1e-9):,.0f} "
              f"events/s in {report.wall_s:.1f} s", file=sys.stderr)
    add_marginal(cells, rows)
    print()
    print(HEADER)
    for r in rows:
        print(table_line(r))
    line = bottom_line(rows)
    events = sum(r["events"] for r in rows)
    sim_s = sum(r["wall_s"] for r in rows)
    print(f"\n{len(rows)} replays, {events:,} events in {sim_s:.0f} s of simulation "
          f"({events / sim_s:,.0f} events/s); whole run {time.time() - t0:.0f} s")
    for label, b in (("grid (S3 Standard, 10k tokens/s)", line["grid_best"]),
                     ("any cell", line["any_best"])):
        if b is None or not b["extra_tokens_per_s3_dollar"]:
            print(f"bottom line, {label}: the S3 tier saved no prefill tokens")
            continue
        print(f"bottom line, {label}: {b['extra_tokens_per_s3_dollar'] / 1e6:,.2f}M prefill "
              f"tokens saved per S3 dollar, {b['gpu_dollars_per_s3_dollar']:.2f} GPU dollars "
              f"per S3 dollar ({b['engines']} engines, {b['routing']}, "
              f"{b['local_cache_pct']:g}% cache, {b['storage_class']}, {b['admission']}, "
              f"{b['prefill_tokens_per_s']:,.0f} tokens/s)")
    name = args.name or args.trace.stem.removesuffix("_trace")
    out = RESULTS / f"replay_{name}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "replay", "machine": machine_info([]),
        "loadavg_before": [round(x, 2) for x in load_before],
        "settings": {**vars(args), "trace": str(args.trace), "base": dataclasses.asdict(BASE)},
        "trace": {"requests": len(trace.requests), "duration_s": trace.duration_s,
                  "input_tokens": trace.input_tokens, "upper_bound_tokens": bound,
                  "distinct_kv_bytes": distinct},
        "rows": rows, "bottom_line": line,
        "events": events, "simulation_s": sim_s, "wall_seconds": time.time() - t0,
    }, indent=1, default=str))
    print(f"results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
