"""Capacity calculator: S3 requests, bandwidth, storage and dollars for a fleet.

    s3kv capacity --config path/to/config.json --tp 4 \\
        --prefill-tokens-per-s 6000 --reuse 0.3 --engines 16 [--class express]

The command (:mod:`s3kv.cli.capacity_cmd`) only parses options; the model
lives here so that benchmarks and tests use the same numbers. Request counts
follow the commit and load design exactly: every committed chunk costs one
PUT per stored shard (min(TP, KV heads): each KV head is stored once) plus
one manifest PUT; every hit chunk costs one manifest GET plus one GET per
rank (``bench/requests_cost.py`` counts the same numbers against a live
server). Prices are AWS us-east-1 list prices and can be overridden.
Per-prefix load assumes S3 has split the cache prefix along the two hex
characters s3kv puts in front of every chunk (up to 256 partitions); a
brand-new prefix starts as one partition and answers 503 SlowDown while it
scales, which the clients retry.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, cast

from s3kv.config import Settings

PRICES = {
    "standard": {"put_per_1k": 0.005, "get_per_1k": 0.0004, "storage_gb_month": 0.023,
                 "upload_per_gb_over_512k": 0.0, "retrieval_per_gb_over_512k": 0.0},
    "express": {"put_per_1k": 0.00113, "get_per_1k": 0.00003, "storage_gb_month": 0.11,
                "upload_per_gb_over_512k": 0.0032, "retrieval_per_gb_over_512k": 0.0006},
}
PUT_LIMIT_PER_PREFIX = 3500
GET_LIMIT_PER_PREFIX = 5500
SPREAD_PREFIXES = 256
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "fp8": 1}
# The same choices as types, so the command line offers exactly these.
Dtype = Literal["bfloat16", "float16", "float32", "float8_e4m3fn", "fp8"]
StorageClass = Literal["express", "standard"]
#: Well-known model shapes as (layers, KV heads, head size, dtype) from their
#: published ``config.json``, for sizing without the config file at hand.
MODEL_PRESETS: dict[str, tuple[int, int, int, str]] = {
    "llama-3-8b": (32, 8, 128, "bfloat16"),
    "llama-3-70b": (80, 8, 128, "bfloat16"),
    "llama-3.1-405b": (126, 8, 128, "bfloat16"),
    "qwen2.5-7b": (28, 4, 128, "bfloat16"),
    "qwen2.5-72b": (80, 8, 128, "bfloat16"),
}


@dataclass(frozen=True)
class Workload:
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype_bytes: int
    tp: int
    prefill_tokens_per_s: float  # tokens each engine prefills (computes) per second
    reuse: float  # fraction of prompt tokens served from the cache
    chunk_tokens: int = Settings.chunk_tokens
    ttl_days: float = 1.0
    engines: int = 1
    admitted: float = 1.0  # fraction of new chunks saved (admission policy)
    storage_class: str = "standard"

    @property
    def shards(self) -> int:
        """Shards per chunk: each KV head is stored once, by the lowest rank holding it."""
        return min(self.tp, self.num_kv_heads)

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_size,
                                  self.dtype_bytes)


def kv_bytes_per_token(layers: int, kv_heads: int, head_size: int, dtype_bytes: int) -> int:
    """KV bytes of one token over every layer: a key and a value per KV head."""
    return 2 * layers * kv_heads * head_size * dtype_bytes


SECONDS_PER_MONTH = 30 * 86400  # storage is priced per GB-month of 30 days
EXPRESS_FREE_SHARD_BYTES = 512 * 1024  # Express charges per GB beyond this, per request


def s3_dollars(storage_class: str, *, puts: float, gets: float, gb_months: float,
               shard_bytes: float, shards_put: float, shards_got: float) -> dict[str, float]:
    """S3's bill by kind (``put``, ``get``, ``storage``, ``transfer``,
    ``total``) for a number of requests, GB-months stored, and shards of
    ``shard_bytes`` uploaded and downloaded (Express bills the bytes of each
    beyond 512 KiB). The one place prices are applied: the calculator and
    ``s3kv replay`` both call it."""
    p = PRICES[storage_class]
    over_gb = max(0.0, shard_bytes - EXPRESS_FREE_SHARD_BYTES) / 1e9
    out = {
        "put": puts / 1000 * p["put_per_1k"],
        "get": gets / 1000 * p["get_per_1k"],
        "storage": gb_months * p["storage_gb_month"],
        "transfer": over_gb * (shards_put * p["upload_per_gb_over_512k"]
                               + shards_got * p["retrieval_per_gb_over_512k"]),
    }
    out["total"] = sum(out.values())
    return out


def estimate(w: Workload) -> dict[str, object]:
    if w.storage_class not in PRICES:
        raise ValueError(f"storage_class {w.storage_class!r}; valid: {sorted(PRICES)}")
    chunk_bytes = w.kv_bytes_per_token * w.chunk_tokens
    shard_bytes = chunk_bytes / w.shards
    # Computed tokens become new chunks; reused tokens arrive as hits.
    hit_tokens_s = w.prefill_tokens_per_s * w.reuse / max(1e-9, 1 - w.reuse)
    commits_s = w.prefill_tokens_per_s / w.chunk_tokens * w.admitted
    hits_s = hit_tokens_s / w.chunk_tokens
    per_engine = {
        "put_per_s": commits_s * (w.shards + 1),  # shards, then the manifest
        "get_per_s": hits_s * (w.tp + 1),  # the manifest, then >= 1 read per rank
        "write_mib_s": commits_s * chunk_bytes / 2**20,
        "read_mib_s": hits_s * chunk_bytes / 2**20,
        "chunks_committed_per_s": commits_s,
        "chunks_hit_per_s": hits_s,
    }
    fleet = {k: v * w.engines for k, v in per_engine.items()}
    stored_bytes = fleet["write_mib_s"] * 2**20 * 86400 * w.ttl_days
    day = s3_dollars(
        w.storage_class, puts=fleet["put_per_s"] * 86400, gets=fleet["get_per_s"] * 86400,
        gb_months=stored_bytes / 1e9 * 86400 / SECONDS_PER_MONTH, shard_bytes=shard_bytes,
        shards_put=86400 * w.shards * commits_s * w.engines,
        shards_got=86400 * w.shards * hits_s * w.engines)
    partitions = 1 if w.storage_class == "express" else SPREAD_PREFIXES
    return {
        "workload": asdict(w),
        "kv_bytes_per_token": w.kv_bytes_per_token,
        "shard_bytes": shard_bytes,
        "per_engine": per_engine,
        "fleet": fleet,
        "per_prefix": {
            "partitions_assumed": partitions,
            "put_per_s": fleet["put_per_s"] / partitions,
            "get_per_s": fleet["get_per_s"] / partitions,
            "put_limit": PUT_LIMIT_PER_PREFIX,
            "get_limit": GET_LIMIT_PER_PREFIX,
            "min_partitions_needed": max(
                math.ceil(fleet["put_per_s"] / PUT_LIMIT_PER_PREFIX),
                math.ceil(fleet["get_per_s"] / GET_LIMIT_PER_PREFIX), 1),
        },
        "stored_bytes": stored_bytes,
        "dollars_per_day": day,
    }


class InputError(ValueError):
    """A bad option value, with the option it came from so the CLI can name it."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


def model_config_shape(path: Path) -> tuple[int, int, int, str]:
    """Layers, KV heads, head size and dtype from a Hugging Face ``config.json``."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError("--config", f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(cfg, dict):
        raise InputError("--config", f"{str(path)!r} is not a JSON object")
    try:
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        layers = cfg["num_hidden_layers"]
    except KeyError as exc:
        raise InputError("--config", f"{str(path)!r} lacks {exc.args[0]!r}; give "
                         "--layers --kv-heads --head-size instead") from None
    return layers, heads, head, str(cfg.get("torch_dtype", "bfloat16"))


def build_workload(
    *,
    prefill_tokens_per_s: float,
    config: Path | None = None,
    layers: int | None = None,
    kv_heads: int | None = None,
    head_size: int | None = None,
    dtype: str | None = None,
    tp: int = 1,
    reuse: float = 0.3,
    chunk_tokens: int = Settings.chunk_tokens,
    ttl_days: float = 1.0,
    engines: int = 1,
    admitted: float = 1.0,
    storage_class: str = "standard",
) -> Workload:
    """The workload the options describe; a bad value raises :class:`InputError`.

    Checked here rather than in the command so that any caller gets an error
    naming the option, not a division by zero or a nonsense estimate later.
    """
    if config is not None:
        layers, kv_heads, head_size, model_dtype = model_config_shape(config)
    elif not (layers and kv_heads and head_size):
        raise InputError("--config", "give --config, or all of --layers --kv-heads --head-size")
    else:
        model_dtype = "bfloat16"
    if dtype is not None and dtype not in DTYPE_BYTES:
        raise InputError("--dtype", f"{dtype!r}; valid: {sorted(DTYPE_BYTES)}")
    for option, value in (("--layers", layers), ("--kv-heads", kv_heads),
                          ("--head-size", head_size), ("--tp", tp),
                          ("--chunk-tokens", chunk_tokens), ("--engines", engines)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(option, f"must be a whole number >= 1, got {value!r}")
    if not prefill_tokens_per_s > 0:
        raise InputError("--prefill-tokens-per-s", f"must be > 0, got {prefill_tokens_per_s!r}")
    if not 0 <= reuse < 1:
        raise InputError("--reuse", f"must be in [0, 1), got {reuse!r}")
    if not 0 < admitted <= 1:
        raise InputError("--admitted", f"must be in (0, 1], got {admitted!r}")
    if not ttl_days > 0:
        raise InputError("--ttl-days", f"must be > 0, got {ttl_days!r}")
    if storage_class not in PRICES:
        raise InputError("--class", f"{storage_class!r}; valid: {sorted(PRICES)}")
    # A config.json dtype missing from the table (say "float64") counts as 2 bytes.
    dtype_bytes = DTYPE_BYTES.get(dtype or model_dtype, 2)
    return Workload(layers, kv_heads, head_size, dtype_bytes, tp, prefill_tokens_per_s, reuse,
                    chunk_tokens, ttl_days, engines, admitted, storage_class)


def render(w: Workload, r: dict[str, object]) -> str:
    """:func:`estimate`'s result for a person: the figures that decide a deployment."""
    pe, fl = cast(dict[str, float], r["per_engine"]), cast(dict[str, float], r["fleet"])
    pp, d = cast(dict[str, float], r["per_prefix"]), cast(dict[str, float], r["dollars_per_day"])
    shard_mib = cast(float, r["shard_bytes"]) / 2**20
    lines = [f"KV {w.kv_bytes_per_token / 1024:.0f} KiB/token, shard {shard_mib:.1f} MiB "
             f"({w.chunk_tokens} tokens / TP {w.tp})"]
    for name, vals in (("per engine", pe), (f"fleet of {w.engines}", fl)):
        lines.append(
            f"{name:>14}: PUT {vals['put_per_s']:.1f}/s  GET {vals['get_per_s']:.1f}/s  "
            f"write {vals['write_mib_s']:.0f} MiB/s  read {vals['read_mib_s']:.0f} MiB/s")
    lines.append(
        f"    per prefix: PUT {pp['put_per_s']:.1f}/s of {PUT_LIMIT_PER_PREFIX}, GET "
        f"{pp['get_per_s']:.1f}/s of {GET_LIMIT_PER_PREFIX} over {pp['partitions_assumed']} "
        f"partitions (needs >= {pp['min_partitions_needed']})")
    stored_tib = cast(float, r["stored_bytes"]) / 2**40
    lines.append(f"        stored: {stored_tib:.1f} TiB at {w.ttl_days} day TTL")
    lines.append(
        f"     $ per day: total {d['total']:.2f} (PUT {d['put']:.2f}, GET {d['get']:.2f}, "
        f"storage {d['storage']:.2f}, transfer {d['transfer']:.2f})")
    return "\n".join(lines)


__all__ = ["DTYPE_BYTES", "MODEL_PRESETS", "PRICES", "Dtype", "InputError", "StorageClass",
           "Workload", "build_workload", "estimate", "kv_bytes_per_token", "model_config_shape",
           "render", "s3_dollars"]
