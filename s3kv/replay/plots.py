"""Plots for ``s3kv replay --plot``: two sweeps that size a deployment.

1. **Hit rate vs local cache size**, one line per engine count: how much of
   the trace's reuse the engines' own prefix caches catch, and how much the
   shared S3 tier adds on top. With more engines each local cache sees a
   smaller share of the traffic, so the gap S3 fills grows.
2. **S3 dollars per day vs retention** (GC ``--older-than``) for S3 Standard
   and Express: what keeping chunks longer costs against the hits it buys.

Every point is a full :func:`s3kv.replay.sim.replay` run, so the figures come
from the same policy code as the report. matplotlib is an optional
dependency (``pip install 's3kv[replay]'``), imported only when drawing, so
the replay itself runs without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3kv.replay.chunks import distinct_chunk_bytes
from s3kv.replay.sim import FleetConfig, ReplayReport, replay
from s3kv.replay.trace import Trace

Progress = Callable[[int, int], None]

# Local cache per engine as a fraction of the trace's distinct KV bytes; None =
# unbounded (drawn at 100%: a cache that holds every distinct chunk never evicts).
CACHE_FRACTIONS: tuple[float | None, ...] = (0.001, 0.01, 0.1, None)
ENGINE_COUNTS: tuple[int, ...] = (1, 4, 16)
# Retention candidates; only those shorter than the trace's span are swept (a
# longer TTL deletes nothing the trace wrote, which is the "none" point).
RETENTIONS_S: tuple[float, ...] = (60, 300, 600, 1800, 3600, 6 * 3600, 24 * 3600)
MAX_RETENTIONS = 4
STORAGE_CLASSES: tuple[str, ...] = ("standard", "express")
INSTALL_HINT = "pip install 's3kv[replay]' (or pip install 'matplotlib>=3.8')"


class MissingMatplotlib(RuntimeError):
    """matplotlib is not installed; the message says how to get it."""


# --- sweeps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachePoint:
    engines: int
    fraction: float | None  # of distinct bytes; None = unbounded
    cache_bytes: int | None
    report: ReplayReport


@dataclass(frozen=True)
class RetentionPoint:
    storage_class: str
    ttl_s: float | None
    report: ReplayReport


def retentions_for(trace: Trace) -> list[float | None]:
    """The TTLs worth sweeping for this trace: the longest few shorter than its span."""
    inside = [t for t in RETENTIONS_S if t < trace.duration_s]
    return [*inside[-MAX_RETENTIONS:], None]


class _Runs:
    """Runs replays one after another and reports them as one progress bar."""

    def __init__(self, trace: Trace, runs: int, progress: Progress | None) -> None:
        self._trace, self._runs, self._progress = trace, runs, progress
        self._done = 0

    def __call__(self, cfg: FleetConfig) -> ReplayReport:
        unit = max(1, len(self._trace.requests))
        base = self._done * unit
        total = self._runs * unit

        def step(done: int, of: int) -> None:
            if self._progress is not None and of > 0:
                self._progress(base + done * unit // of, total)

        report = replay(self._trace, cfg, progress=step if self._progress else None)
        self._done += 1
        if self._progress is not None:
            self._progress(self._done * unit, total)
        return report


def cache_sweep(trace: Trace, base: FleetConfig, run: Callable[[FleetConfig], ReplayReport],
                engine_counts: Sequence[int] = ENGINE_COUNTS,
                fractions: Sequence[float | None] = CACHE_FRACTIONS) -> list[CachePoint]:
    """Hit rate over local cache sizes and engine counts, prefix-affinity routing."""
    distinct = distinct_chunk_bytes(trace, base.chunk_tokens, base.kv_bytes_per_token)
    points = []
    for engines in engine_counts:
        for frac in fractions:
            size = None if frac is None else int(frac * distinct)
            cfg = dataclasses.replace(base, engines=engines, routing="prefix-affinity",
                                      local_cache_bytes=size)
            points.append(CachePoint(engines, frac, size, run(cfg)))
    return points


def retention_sweep(trace: Trace, base: FleetConfig,
                    run: Callable[[FleetConfig], ReplayReport],
                    classes: Sequence[str] = STORAGE_CLASSES,
                    retentions: Sequence[float | None] | None = None) -> list[RetentionPoint]:
    """S3 cost over retention (GC --older-than) per storage class, S3 tier on.

    GC runs at least twice per TTL, as an operator who sets a short TTL would
    schedule it; otherwise a 1-minute TTL would act like the GC interval.
    """
    points = []
    for cls in classes:
        for ttl in retentions_for(trace) if retentions is None else retentions:
            interval = base.gc_interval_s if ttl is None else min(base.gc_interval_s, ttl / 2)
            cfg = dataclasses.replace(base, s3=True, storage_class=cls, ttl_s=ttl,
                                      gc_interval_s=interval)
            points.append(RetentionPoint(cls, ttl, run(cfg)))
    return points


# --- drawing ------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend; :class:`MissingMatplotlib` without it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib(f"plots need matplotlib, which is not installed: "
                                f"{INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _ttl_label(ttl: float | None) -> str:
    if ttl is None:
        return "none"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if ttl >= size and ttl % size == 0:
            return f"{ttl / size:g}{unit}"
    return f"{ttl:g}s"


def draw_cache_figure(plt: Any, points: Sequence[CachePoint], trace: Trace, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for engines in sorted({p.engines for p in points}):
        row = [p for p in points if p.engines == engines]
        xs = [100.0 if p.fraction is None else 100 * p.fraction for p in row]
        line = ax.plot(xs, [100 * p.report.hit_fraction for p in row], marker="o",
                       label=f"{engines} engine(s): local + S3")[0]
        ax.plot(xs, [100 * p.report.local_hit_tokens / max(1, p.report.input_tokens)
                     for p in row], marker="x", linestyle="--", color=line.get_color(),
                label=f"{engines} engine(s): local only")
    if points:
        r = points[0].report
        ax.axhline(100 * r.upper_bound_tokens / max(1, r.input_tokens), color="grey",
                   linestyle=":", label="upper bound (every earlier prefix)")
    ax.set_xscale("log")
    ticks = sorted({100.0 if p.fraction is None else 100 * p.fraction for p in points})
    ax.set_xticks(ticks)
    ax.set_xticklabels(["unbounded" if t == 100.0 else f"{t:g}%" for t in ticks])
    ax.set_xlabel("local prefix cache per engine (% of the trace's distinct KV bytes)")
    ax.set_ylabel("prefill tokens hit (% of input tokens)")
    cfg = points[0].report.config if points else None
    sub = (f"{cfg.storage_class} S3, admission {cfg.admission}, chunk {cfg.chunk_tokens}"
           if cfg is not None and cfg.s3 else "S3 tier off")
    ax.set_title(f"Hit rate vs local cache size, prefix-affinity routing\n"
                 f"{Path(trace.source).name}, {len(trace.requests):,} requests; {sub}",
                 fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_retention_figure(plt: Any, points: Sequence[RetentionPoint], trace: Trace,
                          path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    hits = ax.twinx()
    handles = []
    for cls in dict.fromkeys(p.storage_class for p in points):
        row = [p for p in points if p.storage_class == cls]
        xs = list(range(len(row)))
        line = ax.plot(xs, [p.report.dollars_per_day.get("total", 0.0) for p in row],
                       marker="o", label=f"S3 {cls}: $ per day")[0]
        handles.append(line)
        handles.append(hits.plot(
            xs, [100 * p.report.s3_hit_tokens / max(1, p.report.input_tokens) for p in row],
            marker="x", linestyle="--", color=line.get_color(),
            label=f"S3 {cls}: S3 hits (% of input)")[0])
    labels = [_ttl_label(p.ttl_s) for p in points if p.storage_class == points[0].storage_class]
    ax.set_xticks(list(range(len(labels))))
    ax.set_xticklabels(labels)
    ax.set_xlabel("retention (GC --older-than)")
    ax.set_ylabel("S3 dollars per day (scaled from the trace's span)")
    hits.set_ylabel("prefill tokens hit in S3 (% of input)")
    ax.set_ylim(bottom=0)
    hits.set_ylim(bottom=0)
    cfg = points[0].report.config if points else None
    fleet = (f"{cfg.engines} engine(s), {cfg.routing}, admission {cfg.admission}"
             if cfg is not None else "")
    ax.set_title(f"S3 cost vs retention; {fleet}\n{Path(trace.source).name}, "
                 f"{len(trace.requests):,} requests over {trace.duration_s:,.0f} s",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(trace: Trace, base: FleetConfig, out_dir: Path,
                progress: Progress | None = None) -> list[Path]:
    """Run both sweeps and write ``hit_rate_vs_cache.png`` and ``s3_cost_vs_retention.png``.

    ``base`` supplies everything a sweep does not vary (model, TP, chunk size,
    admission, prices); ``progress`` gets (done, total) across all runs.
    """
    plt = pyplot()  # fail before minutes of replays, not after
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = len(ENGINE_COUNTS) * len(CACHE_FRACTIONS) + len(STORAGE_CLASSES) * len(
        retentions_for(trace))
    run = _Runs(trace, runs, progress)
    cache = cache_sweep(trace, base, run)
    retention = retention_sweep(trace, base, run)
    return [
        draw_cache_figure(plt, cache, trace, out_dir / "hit_rate_vs_cache.png"),
        draw_retention_figure(plt, retention, trace, out_dir / "s3_cost_vs_retention.png"),
    ]


__all__ = ["CACHE_FRACTIONS", "ENGINE_COUNTS", "MissingMatplotlib", "cache_sweep",
           "pyplot", "retention_sweep", "retentions_for",
           "write_plots"]
