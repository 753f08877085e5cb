"""``s3kv replay``: what s3kv would save, and cost, on a recorded request trace.

Only option parsing and the text report live here; the simulation is
:mod:`s3kv.replay.sim`, which replays arrivals through s3kv's own chunk ids,
admission, GC and prices. Like ``capacity`` it needs no bucket: it answers
"how many prefill tokens would we save on *our* traffic, and what would S3
cost per day" before anything is deployed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from s3kv.admission import Mode
from s3kv.capacity import (
    GET_LIMIT_PER_PREFIX,
    PUT_LIMIT_PER_PREFIX,
    InputError,
    StorageClass,
)
from s3kv.cli.common import (
    DURATION_FORMS,
    SIZE_FORMS,
    ExitCode,
    Progress,
    echo,
    emit_json,
    format_size,
    note,
    parse_duration,
    parse_size,
)
from s3kv.config import Settings
from s3kv.replay.chunks import distinct_chunk_bytes
from s3kv.replay.plots import MissingMatplotlib, pyplot, write_plots
from s3kv.replay.sim import (
    FleetConfig,
    FleetConfigError,
    ReplayReport,
    Routing,
    kv_from_hf_config,
    model_preset,
    replay,
)
from s3kv.replay.trace import Trace, TraceError, read_trace

# Each FleetConfig field and the option that sets it, so a ValueError from the
# config's own validation can be reported against what the user typed.
FIELD_OPTIONS: dict[str, str] = {
    "engines": "--engines",
    "routing": "--routing",
    "local_cache_bytes": "--local-cache",
    "kv_bytes_per_token": "--kv-bytes-per-token",
    "tp": "--tp",
    "num_kv_heads": "--kv-heads",
    "prefill_tokens_per_s": "--prefill-tokens-per-s",
    "chunk_tokens": "--chunk-tokens",
    "s3": "--no-s3",
    "storage_class": "--class",
    "admission": "--admission",
    "admission_window": "--admission-window",
    "ttl_s": "--ttl",
    "max_bytes": "--max-size",
    "gc_interval_s": "--gc-interval",
    "gpu_dollars_per_hour": "--gpu-dollars-per-hour",
    "seed": "--seed",
    "load_gbps": "--load-gbps",
}
_DEFAULTS = FleetConfig()
LOCAL_CACHE_FORMS = f"'unbounded', a percentage such as 1% or 0.1%, or {SIZE_FORMS}"


def register(app: typer.Typer) -> None:
    app.command(
        "replay",
        help="Replay a request trace through a simulated fleet: prefill tokens s3kv saves, "
             "TTFT, S3 requests, bytes stored and dollars per day.",
    )(replay_cmd)


# --- option values --------------------------------------------------------------------


@dataclass(frozen=True)
class LocalCache:
    """``--local-cache`` as given: bytes, a fraction of the trace's distinct bytes,
    or unbounded. A fraction can only be resolved once the trace is read."""

    bytes: int | None = None
    fraction: float | None = None

    def resolve(self, distinct_bytes: int) -> int | None:
        if self.fraction is None:
            return self.bytes
        return int(self.fraction * distinct_bytes)


def parse_local_cache(text: str) -> LocalCache:
    """``unbounded`` | ``N%`` | a size; raises ValueError naming the forms."""
    s = text.strip().lower()
    if s == "unbounded":
        return LocalCache()
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            raise ValueError(f"{text!r} is not a percentage; use {LOCAL_CACHE_FORMS}") from None
        if not math.isfinite(pct) or pct < 0:
            raise ValueError(f"{text!r}: a percentage must be >= 0")
        return LocalCache(fraction=pct / 100)
    if s.startswith("-"):
        raise ValueError(f"{text!r}: a size must not be negative")
    try:
        return LocalCache(bytes=parse_size(s))
    except ValueError:
        raise ValueError(f"{text!r} is not a cache size; use {LOCAL_CACHE_FORMS}") from None


def _negative(text: str, option: str, what: str) -> None:
    if text.strip().startswith("-"):
        raise typer.BadParameter(f"{text!r}: a {what} must not be negative",
                                 param_hint=f"'{option}'")


def _size_or_none(text: str | None, option: str) -> int | None:
    """A size, or None for "none" (no limit)."""
    if text is None or text.strip().lower() == "none":
        return None
    _negative(text, option, "size")
    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"'{option}'") from None


def _duration(text: str, option: str) -> float:
    _negative(text, option, "duration")
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"'{option}'") from None


def _duration_or_none(text: str | None, option: str) -> float | None:
    """A duration, or None for "none" (no limit)."""
    if text is None or text.strip().lower() == "none":
        return None
    return _duration(text, option)


def _kv_shape(model: str | None, config: Path | None,
              kv_bytes_per_token: int | None, kv_heads: int | None) -> tuple[int, int]:
    """KV bytes per token and KV heads from exactly one of the three ways to give them."""
    given = [o for o, v in (("--model", model), ("--config", config),
                            ("--kv-bytes-per-token", kv_bytes_per_token)) if v is not None]
    if len(given) > 1:
        raise typer.BadParameter(f"give one of --model, --config, --kv-bytes-per-token, "
                                 f"not {' and '.join(given)}", param_hint=f"'{given[1]}'")
    if model is not None:
        try:
            kv, heads = model_preset(model)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--model'") from None
    elif config is not None:
        try:
            kv, heads = kv_from_hf_config(config)
        except InputError as exc:
            raise typer.BadParameter(exc.problem, param_hint="'--config'") from None
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(str(exc), param_hint="'--config'") from None
    else:
        kv = _DEFAULTS.kv_bytes_per_token if kv_bytes_per_token is None else kv_bytes_per_token
        heads = _DEFAULTS.num_kv_heads
    return kv, heads if kv_heads is None else kv_heads


def build_config(**values: Any) -> FleetConfig:
    """A FleetConfig, its validation errors reported against the option."""
    try:
        return FleetConfig(**values)
    except FleetConfigError as exc:
        option = FIELD_OPTIONS.get(exc.field)
        raise typer.BadParameter(exc.problem if option else str(exc),
                                 param_hint=f"'{option}'" if option else None) from None


# --- the report ---------------------------------------------------------------------------


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _secs(x: float) -> str:
    """Seconds, three decimals while short (TTFTs of one engine), whole when long
    (an overloaded fleet queues requests for minutes)."""
    return f"{x:.3f} s" if x < 100 else f"{x:,.0f} s"


def _money(x: float) -> str:
    return f"${x:,.2f}"


def describe_fleet(cfg: FleetConfig) -> str:
    cache = ("unbounded" if cfg.local_cache_bytes is None
             else "none" if cfg.local_cache_bytes == 0 else format_size(cfg.local_cache_bytes))
    ttl = "none" if cfg.ttl_s is None else f"{cfg.ttl_s:g} s"
    max_size = "none" if cfg.max_bytes is None else format_size(cfg.max_bytes)
    s3 = (f"S3 {cfg.storage_class}, admission {cfg.admission}, ttl {ttl}, max-size {max_size}"
          if cfg.s3 else "S3 tier off")
    return (f"fleet: {cfg.engines} engine(s), {cfg.routing} routing, local cache {cache} per "
            f"engine, KV {cfg.kv_bytes_per_token:,} B/token, TP {cfg.tp}, "
            f"chunk {cfg.chunk_tokens} tokens, {cfg.prefill_tokens_per_s:,.0f} prefill tokens/s; "
            f"{s3}")


def _busiest(r: ReplayReport) -> str:
    """The busiest key-spread partition against S3's per-prefix limits (which are per kind)."""
    line = f"  busiest partition: {r.busiest_partition_rps:,.0f} requests/s"
    by_kind = r.busiest_partition_rps_by_kind
    if by_kind:
        line += (f" (PUT {by_kind.get('put', 0.0):,.0f}/s of {PUT_LIMIT_PER_PREFIX:,}, "
                 f"GET {by_kind.get('get', 0.0) + by_kind.get('get_miss', 0.0):,.0f}/s of "
                 f"{GET_LIMIT_PER_PREFIX:,} per prefix)")
    return line


def render(trace: Trace, r: ReplayReport) -> str:
    """The report for a person: what was saved, how fast, what it costs."""
    cfg = r.config
    lines = [
        f"trace {trace.source}: {r.requests:,} requests over {trace.duration_s:,.0f} s, "
        f"{r.input_tokens:,} input tokens",
        describe_fleet(cfg),
        "",
        f"{'prefill tokens':<22}{'tokens':>16}{'% of input':>12}{'% of bound':>12}",
    ]
    bound = r.upper_bound_tokens
    rows: list[tuple[str, int, bool]] = [
        ("local hits", r.local_hit_tokens, True), ("S3 hits", r.s3_hit_tokens, True),
        ("hits, total", r.local_hit_tokens + r.s3_hit_tokens, True),
        ("computed (misses)", r.computed_tokens, False),
    ]
    if r.s3_skipped_tokens:
        rows.append(("S3 found, computed*", r.s3_skipped_tokens, True))
    for name, n, of_bound in rows:
        lines.append(f"  {name:<20}{n:>16,}{_pct(n, r.input_tokens):>12}"
                     f"{_pct(n, bound) if of_bound else '':>12}".rstrip())
    lines.append(f"  {'upper bound':<20}{bound:>16,}{_pct(bound, r.input_tokens):>12}")
    if r.s3_skipped_tokens:
        p = cfg.profile
        lines.append(f"  * in S3 but computed: loading them ({p.first_byte_s * 1000:g} ms first "
                     f"byte, {cfg.load_bytes_per_s / 1e9:g} GB/s per engine for S3 {p.name}) "
                     f"would take longer than recomputing at "
                     f"{cfg.prefill_tokens_per_s:,.0f} tokens/s")
    lines += [
        f"prefill time saved: {r.prefill_seconds_saved:,.0f} engine-seconds",
        "",
        f"{'TTFT':<22}{'p50':>12}{'p99':>12}",
        f"  {'with S3' if cfg.s3 else 'as configured':<20}"
        f"{_secs(r.ttft_p50_s):>12}{_secs(r.ttft_p99_s):>12}",
        f"  {'without S3':<20}{_secs(r.ttft_p50_no_s3_s):>12}{_secs(r.ttft_p99_no_s3_s):>12}",
        "",
    ]
    if cfg.s3:
        lines.append(f"{'S3 requests':<22}{'count':>14}{'peak /s':>10}")
        for kind in ("put", "get", "get_miss", "delete"):
            lines.append(f"  {kind:<20}{r.s3_requests.get(kind, 0):>14,}"
                         f"{r.s3_peak_rps.get(kind, 0.0):>10,.0f}")
        series = [b for _, b in r.bytes_stored_series]
        end = series[-1] if series else 0
        peak = max(series, default=0)
        d = r.dollars_per_day
        lines += [
            _busiest(r),
            f"stored: {format_size(end)} at the end, peak {format_size(peak)}; GC deleted "
            f"{r.gc_deleted_chunks:,} chunks ({format_size(r.gc_deleted_bytes)})",
            f"S3 $ per day: total {_money(d.get('total', 0.0))} (PUT {_money(d.get('put', 0.0))}, "
            f"GET {_money(d.get('get', 0.0))}, storage {_money(d.get('storage', 0.0))}, "
            f"transfer {_money(d.get('transfer', 0.0))})",
        ]
    else:
        lines.append("S3 tier off: no S3 requests, bytes or dollars")
    lines += [
        f"GPU $ per day saved: {_money(r.gpu_dollars_per_day_saved)} "
        f"(at ${cfg.gpu_dollars_per_hour:g} per GPU-hour, TP {cfg.tp})",
    ]
    if cfg.s3:
        per_dollar = r.tokens_saved_per_s3_dollar
        lines.append("prefill tokens saved per S3 dollar: "
                     + (f"{per_dollar:,.0f}" if math.isfinite(per_dollar) else "unbounded"))
    rate = r.events / r.wall_s if r.wall_s > 0 else float("inf")
    lines.append(f"replayed {r.events:,} events in {r.wall_s:.2f} s ({rate:,.0f} events/s)")
    return "\n".join(line.rstrip() for line in lines)


# --- the command --------------------------------------------------------------------------


def replay_cmd(
    trace_path: Annotated[
        Path, typer.Argument(metavar="TRACE", dir_okay=False,
                             help="Trace file: Mooncake FAST'25 JSONL (timestamp, input_length, "
                                  "output_length, hash_ids) or s3kv's JSONL (the same keys, "
                                  "optional block_tokens).", show_default=False)
    ],
    engines: Annotated[
        int, typer.Option("--engines", metavar="N", min=1,
                          help="Engines (vLLM instances) in the fleet.")
    ] = _DEFAULTS.engines,
    routing: Annotated[
        Routing, typer.Option("--routing", help="How requests are spread over the engines.")
    ] = _DEFAULTS.routing,
    local_cache: Annotated[
        str, typer.Option("--local-cache", metavar="SIZE|N%|unbounded",
                          help="Each engine's local prefix cache (its KV cache in GPU and CPU "
                               "memory): a size (80GiB, 1.5TB, 0 for none), 'unbounded', or a "
                               "percentage of the trace's distinct KV bytes (its distinct full "
                               "chunks by s3kv's chunk ids x chunk-tokens x KV bytes per "
                               "token), e.g. 1%.")
    ] = "unbounded",
    model: Annotated[
        str | None, typer.Option("--model", metavar="PRESET",
                                 help="A model preset for the KV size (e.g. llama-3-70b, "
                                      "llama-3-8b). Default: a 70B-class model, 327,680 KV "
                                      "bytes per token, 8 KV heads.", show_default=False)
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", exists=True, dir_okay=False, metavar="FILE",
                                  help="A model's Hugging Face config.json for the KV size.",
                                  show_default=False)
    ] = None,
    kv_bytes_per_token: Annotated[
        int | None, typer.Option("--kv-bytes-per-token", metavar="N", min=1,
                                 help="KV bytes per token, all layers (instead of --model).",
                                 show_default=False)
    ] = None,
    kv_heads: Annotated[
        int | None, typer.Option("--kv-heads", metavar="N", min=1,
                                 help="KV heads in total: shards per chunk are min(TP, heads) "
                                      "[default: the model's, else 8].", show_default=False)
    ] = None,
    tp: Annotated[
        int, typer.Option("--tp", metavar="N", min=1, help="Tensor-parallel size.")
    ] = _DEFAULTS.tp,
    prefill_tokens_per_s: Annotated[
        float, typer.Option("--prefill-tokens-per-s", metavar="TOKENS",
                            help="Tokens each engine prefills (computes) per second.")
    ] = _DEFAULTS.prefill_tokens_per_s,
    chunk_tokens: Annotated[
        int, typer.Option("--chunk-tokens", metavar="N", min=1,
                          help="Tokens per stored chunk (the connector's chunk_tokens), a "
                               "multiple of 16. Traces hash 512-token blocks: a chunk ending "
                               "inside a block is shared only with requests sharing that "
                               "whole block.")
    ] = _DEFAULTS.chunk_tokens,
    s3: Annotated[
        bool, typer.Option("--s3/--no-s3", help="Whether the S3 tier is on (off: local "
                                                 "prefix caches only).")
    ] = _DEFAULTS.s3,
    storage_class: Annotated[
        StorageClass, typer.Option("--class",
                                   help="S3 storage class: its latency, bandwidth and prices.")
    ] = "standard",
    load_gbps: Annotated[
        float | None, typer.Option("--load-gbps", metavar="GBPS",
                                   help="S3 load bandwidth per engine in GB/s [default: the "
                                        "class's: standard 6, express 8; every rank of an "
                                        "engine loads at once].", show_default=False)
    ] = None,
    admission: Annotated[
        Mode, typer.Option("--admission",
                           help="Which new chunks are saved (the connector's admission).")
    ] = Settings.admission,
    admission_window: Annotated[
        int, typer.Option("--admission-window", metavar="N", min=1,
                          help="Distinct chunks second_sighting remembers.")
    ] = _DEFAULTS.admission_window,
    ttl: Annotated[
        str | None, typer.Option("--ttl", metavar="DURATION",
                                 help=f"GC --older-than: delete chunks older than this, a "
                                      f"prefix as young as its newest extension "
                                      f"({DURATION_FORMS}) [default: none].",
                                 show_default=False)
    ] = None,
    max_size: Annotated[
        str | None, typer.Option("--max-size", metavar="SIZE",
                                 help="GC --max-size: a budget for bytes stored, oldest leaf "
                                      "evicted first [default: none].", show_default=False)
    ] = None,
    gc_interval: Annotated[
        str, typer.Option("--gc-interval", metavar="DURATION",
                          help="How often GC runs (and bytes stored are sampled).")
    ] = "10m",
    gpu_dollars_per_hour: Annotated[
        float, typer.Option("--gpu-dollars-per-hour", metavar="USD",
                            help="Price of one GPU-hour, for the prefill time S3 hits save "
                                 "(TP GPUs per engine).")
    ] = _DEFAULTS.gpu_dollars_per_hour,
    seed: Annotated[
        int, typer.Option("--seed", metavar="N", help="Seed for random routing.")
    ] = _DEFAULTS.seed,
    limit: Annotated[
        int | None, typer.Option("--limit", metavar="N", min=1,
                                 help="Replay only the first N requests of the trace.",
                                 show_default=False)
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole report as one JSON document.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", metavar="DIR", file_okay=False,
                                  help="Also sweep cache sizes, engine counts and retention and "
                                       "write PNG plots into DIR (needs matplotlib: "
                                       "pip install 's3kv[replay]').", show_default=False)
    ] = None,
) -> None:
    try:
        cache = parse_local_cache(local_cache)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--local-cache'") from None
    ttl_s = _duration_or_none(ttl, "--ttl")
    max_bytes = _size_or_none(max_size, "--max-size")
    gc_interval_s = _duration(gc_interval, "--gc-interval")
    kv, heads = _kv_shape(model, config, kv_bytes_per_token, kv_heads)
    values: dict[str, Any] = dict(
        engines=engines, routing=routing, kv_bytes_per_token=kv, tp=tp, num_kv_heads=heads,
        prefill_tokens_per_s=prefill_tokens_per_s, chunk_tokens=chunk_tokens, s3=s3,
        storage_class=storage_class, admission=admission, admission_window=admission_window,
        ttl_s=ttl_s, max_bytes=max_bytes, gc_interval_s=gc_interval_s,
        gpu_dollars_per_hour=gpu_dollars_per_hour, seed=seed, load_gbps=load_gbps,
    )
    # Validate everything but the cache size before the (possibly long) read.
    build_config(**values, local_cache_bytes=cache.bytes)
    if plot is not None:
        _require_matplotlib()

    try:
        trace = read_trace(trace_path, limit=limit)
    except TraceError as exc:
        note(f"s3kv replay: {trace_path} line {exc.line}: {exc.field}: {exc.problem}")
        raise typer.Exit(ExitCode.USAGE) from None
    except UnicodeDecodeError:
        note(f"s3kv replay: {trace_path} is not a UTF-8 text file (JSON lines)")
        raise typer.Exit(ExitCode.USAGE) from None
    except OSError as exc:
        note(f"s3kv replay: cannot read {str(trace_path)!r}: {exc.strerror or exc}")
        raise typer.Exit(ExitCode.USAGE) from None
    if not trace.requests:
        note(f"s3kv replay: {trace_path} holds no requests")
        raise typer.Exit(ExitCode.USAGE)

    local = cache.resolve(distinct_chunk_bytes(trace, chunk_tokens, kv)
                          if cache.fraction is not None else 0)
    cfg = build_config(**values, local_cache_bytes=local)
    bar = Progress("replay")
    try:
        report = replay(trace, cfg, progress=bar.update)
    finally:
        bar.close()

    written: list[Path] = []
    if plot is not None:
        written = _plots(trace, cfg, plot)
    if as_json:
        doc = report.to_json()
        if plot is not None:
            doc["plots"] = [str(p) for p in written]
        emit_json(doc)
        return
    echo(render(trace, report))
    for path in written:
        echo(f"plot: {path}")


def _require_matplotlib() -> None:
    """Before minutes of replays, not after them."""
    try:
        pyplot()
    except MissingMatplotlib as exc:
        raise typer.BadParameter(str(exc), param_hint="'--plot'") from None


def _plots(trace: Trace, cfg: FleetConfig, out_dir: Path) -> list[Path]:
    bar = Progress("plots")
    try:
        return write_plots(trace, cfg, out_dir, progress=bar.update)
    finally:
        bar.close()


__all__ = ["LocalCache", "build_config", "parse_local_cache", "register", "render"]
