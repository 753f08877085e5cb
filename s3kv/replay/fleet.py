"""What a replayed fleet looks like: engines, routing, caches, the S3 tier, prices.

Every field is checked when a :class:`FleetConfig` is built, with an error
naming the field and what it accepts (:class:`FleetConfigError`), so a
nonsense fleet never runs for minutes and reports nonsense figures. Model
shapes and prices come from :mod:`s3kv.capacity`, the same numbers the
capacity calculator uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from s3kv.admission import MODES
from s3kv.capacity import DTYPE_BYTES, MODEL_PRESETS, PRICES, kv_bytes_per_token, model_config_shape
from s3kv.config import Settings

Routing = Literal["random", "round-robin", "prefix-affinity"]
ROUTINGS: tuple[Routing, ...] = ("random", "round-robin", "prefix-affinity")


@dataclass(frozen=True)
class StoreProfile:
    """Latency and bandwidth of one S3 storage class (its prices are in
    :data:`s3kv.capacity.PRICES` under the same name)."""

    name: str  # "standard" | "express" (keys of s3kv.capacity.PRICES)
    first_byte_s: float  # per GET/PUT round trip
    gbps_per_engine: float  # load bandwidth per engine, GB/s (1e9 bytes per second)


# Load bandwidth per engine: a TP=4 node loads with every rank at once, each
# keeping s3kv's 16 GETs in flight (``max_concurrency``); at the ~95 MB/s one
# S3 connection typically sustains that is about 6 GB/s per engine on
# Standard, a little more on Express One Zone. ``--load-gbps`` overrides it.
PROFILES: dict[str, StoreProfile] = {
    "standard": StoreProfile("standard", first_byte_s=0.03, gbps_per_engine=6.0),
    "express": StoreProfile("express", first_byte_s=0.005, gbps_per_engine=8.0),
}


class FleetConfigError(ValueError):
    """A bad :class:`FleetConfig` value; ``field`` names it, the message says what is valid."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class FleetConfig:
    """One simulated fleet. Defaults: one 70B-class engine (TP 4) on S3 Standard."""

    engines: int = 1
    routing: Routing = "random"
    local_cache_bytes: int | None = None  # per engine; None = unbounded; 0 = no local cache
    kv_bytes_per_token: int = 327_680  # 70B-class (80 layers, 8 KV heads, head 128, bf16)
    tp: int = 4
    num_kv_heads: int = 8
    prefill_tokens_per_s: float = 10_000.0  # per engine
    chunk_tokens: int = Settings.chunk_tokens
    s3: bool = True  # S3 tier on/off
    storage_class: str = "standard"
    admission: str = Settings.admission  # s3kv.admission.MODES
    admission_window: int = Settings.admission_window
    ttl_s: float | None = None  # GC --older-than
    max_bytes: int | None = None  # GC --max-size
    gc_interval_s: float = 600.0
    gpu_dollars_per_hour: float = 2.0  # for "GPU-hours of prefill saved" in dollars
    seed: int = 0
    load_gbps: float | None = None  # load bandwidth per engine, GB/s; None: the class's

    def __post_init__(self) -> None:
        def whole(name: str, low: int) -> None:
            value = getattr(self, name)
            if not _whole(value) or value < low:
                raise FleetConfigError(name, f"must be a whole number >= {low}, got {value!r}")

        whole("engines", 1)
        if self.routing not in ROUTINGS:
            raise FleetConfigError("routing", f"{self.routing!r}; valid: {list(ROUTINGS)}")
        if self.local_cache_bytes is not None and (
                not _whole(self.local_cache_bytes) or self.local_cache_bytes < 0):
            raise FleetConfigError("local_cache_bytes", "must be a whole number of bytes >= 0 "
                                   f"or None (unbounded), got {self.local_cache_bytes!r}")
        whole("kv_bytes_per_token", 1)
        whole("tp", 1)
        whole("num_kv_heads", 1)
        if not _number(self.prefill_tokens_per_s) or self.prefill_tokens_per_s <= 0:
            raise FleetConfigError("prefill_tokens_per_s", "must be a finite number > 0, got "
                                   f"{self.prefill_tokens_per_s!r}")
        if not _whole(self.chunk_tokens) or self.chunk_tokens < 16 or self.chunk_tokens % 16:
            raise FleetConfigError("chunk_tokens", "must be a positive multiple of 16 (vLLM's "
                                   f"block size divides it), got {self.chunk_tokens!r}")
        if not isinstance(self.s3, bool):
            raise FleetConfigError("s3", f"must be True or False, got {self.s3!r}")
        if self.storage_class not in PROFILES or self.storage_class not in PRICES:
            raise FleetConfigError("storage_class",
                                   f"{self.storage_class!r}; valid: {sorted(PROFILES)}")
        if self.admission not in MODES:
            raise FleetConfigError("admission", f"{self.admission!r}; valid: {list(MODES)}")
        whole("admission_window", 1)
        if self.ttl_s is not None and (not _number(self.ttl_s) or self.ttl_s <= 0):
            raise FleetConfigError("ttl_s", "must be a finite number of seconds > 0 or None "
                                   f"(no --older-than), got {self.ttl_s!r}")
        if self.max_bytes is not None and (not _whole(self.max_bytes) or self.max_bytes < 0):
            raise FleetConfigError("max_bytes", "must be a whole number of bytes >= 0 or None "
                                   f"(no --max-size), got {self.max_bytes!r}")
        if not _number(self.gc_interval_s) or self.gc_interval_s <= 0:
            raise FleetConfigError("gc_interval_s",
                                   f"must be a finite number of seconds > 0, got "
                                   f"{self.gc_interval_s!r}")
        if not _number(self.gpu_dollars_per_hour) or self.gpu_dollars_per_hour < 0:
            raise FleetConfigError("gpu_dollars_per_hour",
                                   f"must be a finite number >= 0, got "
                                   f"{self.gpu_dollars_per_hour!r}")
        if not _whole(self.seed):
            raise FleetConfigError("seed", f"must be a whole number, got {self.seed!r}")
        if self.load_gbps is not None and (not _number(self.load_gbps) or self.load_gbps <= 0):
            raise FleetConfigError("load_gbps", "must be a finite number of GB/s > 0 or None "
                                   f"(the storage class's), got {self.load_gbps!r}")

    @property
    def profile(self) -> StoreProfile:
        return PROFILES[self.storage_class]

    @property
    def load_bytes_per_s(self) -> float:
        gbps = self.load_gbps if self.load_gbps is not None else self.profile.gbps_per_engine
        return gbps * 1e9

    @property
    def shards(self) -> int:
        """Shards per chunk: each KV head is stored once (as :class:`s3kv.capacity.Workload`)."""
        return min(self.tp, self.num_kv_heads)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_tokens * self.kv_bytes_per_token

    @property
    def gc_enabled(self) -> bool:
        return self.s3 and (self.ttl_s is not None or self.max_bytes is not None)


def _kv_bytes(layers: int, kv_heads: int, head_size: int, dtype: str) -> int:
    return kv_bytes_per_token(layers, kv_heads, head_size, DTYPE_BYTES.get(dtype, 2))


def model_preset(name: str) -> tuple[int, int]:
    """``(kv_bytes_per_token, num_kv_heads)`` of a named model shape."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"model preset {name!r}; valid: {sorted(MODEL_PRESETS)}")
    layers, heads, head, dtype = MODEL_PRESETS[name]
    return _kv_bytes(layers, heads, head, dtype), heads


def kv_from_hf_config(path: Path) -> tuple[int, int]:
    """``(kv_bytes_per_token, num_kv_heads)`` from a Hugging Face ``config.json``, read by
    the capacity calculator's reader (its errors are :class:`s3kv.capacity.InputError`)."""
    layers, heads, head, dtype = model_config_shape(Path(path))
    return _kv_bytes(layers, heads, head, dtype), heads


__all__ = ["PROFILES", "ROUTINGS", "FleetConfig", "FleetConfigError", "Routing",
           "StoreProfile", "kv_from_hf_config", "model_preset"]
