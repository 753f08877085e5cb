"""Settings, parsed once into frozen dataclasses.

The connector receives ``kv_connector_extra_config`` as a loose mapping; the
CLI receives flags. Both funnel into :func:`parse_settings`, which rejects
unknown keys and bad values with a :class:`~s3kv.errors.ConfigError` naming
the key and the valid choices. Nothing else in the code base reads raw
mappings, so a typo can never silently fall back to a default.

Credentials are deliberately absent: they come only from the standard AWS
chain (environment, shared config/credentials files, SSO, instance or task
metadata), resolved by the client libraries.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from s3kv.admission import Mode as Admission
from s3kv.errors import ConfigError

log = logging.getLogger("s3kv.config")

Backend = Literal["obstore", "aioboto3"]
AddressingStyle = Literal["auto", "path", "virtual"]
# "prompt_end": the chunk a repeat of the prompt resumes at; "all": every chunk
# whose state vLLM wrote (s3kv.groups, README "Hybrid models").
SsmStates = Literal["prompt_end", "all"]

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](--[a-z0-9\-]+--x-s3)?$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9!\-_.*'()/]+$")


@dataclass(frozen=True)
class StoreSettings:
    """Where the objects live and how to talk to the endpoint.

    Every default is written here and in :class:`Settings`, nowhere else:
    code that needs one reads the class attribute (``StoreSettings.prefix``).
    """

    bucket: str
    prefix: str = "s3kv"
    endpoint_url: str | None = None
    region: str | None = None
    backend: Backend = "obstore"
    addressing_style: AddressingStyle = "auto"
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 30.0
    max_attempts: int = 3
    max_concurrency: int = 16


@dataclass(frozen=True)
class Settings:
    """Everything the connector needs; ``store`` is shared with the CLI."""

    store: StoreSettings
    chunk_tokens: int = 256
    max_inflight_mib: int = 1024
    # The absolute bound on any wait for the cache: lookups and loads alike.
    max_cache_wait_s: float = 30.0
    lookup_wait_fraction: float = 0.1
    load_wait_fraction: float = 1.0
    # The floors of the lookup and the load deadlines (s3kv.deadlines).
    min_lookup_wait_s: float = 0.1
    min_load_wait_s: float = 1.0
    latency_factor: float = 4.0
    probe_interval_s: float = 1.0
    commit_timeout_s: float = 120.0
    lookup_ttl_s: float = 10.0
    weights_id: str | None = None
    namespace_tag: str = ""
    admission: Admission = "all"
    admission_window: int = 1_000_000
    hedge_reads: bool = True
    hedge_quantile: float = 0.95
    hedge_budget: float = 0.1
    # Which chunks of an SSM hybrid carry their recurrent state (s3kv.groups).
    ssm_states: SsmStates = "prompt_end"


DEFAULT_BACKEND: Backend = StoreSettings.backend
DEFAULT_CHUNK_TOKENS = Settings.chunk_tokens

_STORE_KEYS = {f.name for f in fields(StoreSettings)}
_TOP_KEYS = {f.name for f in fields(Settings)} - {"store"}
ALL_KEYS = frozenset(_STORE_KEYS | _TOP_KEYS)

# Old key -> the key that replaced it. An old key still works, with a warning;
# giving both for one setting is an error. Not in ALL_KEYS: never advertised.
DEPRECATED_KEYS: Mapping[str, str] = MappingProxyType({
    "load_timeout_s": "max_cache_wait_s",
    "min_wait_s": "min_lookup_wait_s",
})


def check_type(key: str, value: Any, annotation: Any, default: Any = None) -> Any:
    """Coerce ``value`` to the field's type or raise a ConfigError naming ``key``.

    The rule :func:`parse_settings` applies to every field, for any annotation
    (a type, ``X | None``, ``Optional[X]``, a ``Literal``, or a settings
    field's annotation text, resolved by ``key``): JSON booleans only for
    ``bool``, positive numbers for ``int`` and ``float`` (an int is accepted
    and returned as a float, never the reverse), one of the choices for a
    ``Literal``. The type comes from the resolved hint, not the annotation's
    text, so a field whose type name merely contains "int" or "str" is never
    mistaken for one, and a new field of an unhandled type fails loudly here
    (``default`` is only named in that error).
    """
    hint = _field_hint(key, annotation)
    base, nullable = _split_optional(hint)
    if value is None:
        if nullable:
            return None
        raise ConfigError(key, "must not be null")
    if get_origin(base) is Literal:
        choices = _literal_choices(base)
        if value not in choices:
            raise ConfigError(key, f"got {value!r}", choices=sorted(choices))
        return value
    if base is bool:
        # Only a real JSON boolean: "false" or 0 reading as a truthy or falsy
        # switch is exactly the silent fallback this parser exists to prevent.
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {type(value).__name__} {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {type(value).__name__} {value!r}")
        if value <= 0:
            raise ConfigError(key, f"must be > 0, got {value!r}")
        return float(value)
    if base is int:
        # bool is an int subclass, but ``true`` for a count is always a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {type(value).__name__} {value!r}")
        if value <= 0:
            raise ConfigError(key, f"must be > 0, got {value!r}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(key, f"unsupported annotation {annotation!r} (default {default!r})")


@functools.cache
def _field_hints() -> dict[str, Any]:
    """Every field's resolved type: with postponed annotations ``fields()``
    gives strings, which only ``get_type_hints`` turns back into types."""
    hints: dict[str, Any] = {}
    for cls in (StoreSettings, Settings):
        hints.update(get_type_hints(cls))
    return hints


def _field_hint(key: str, annotation: Any) -> Any:
    if not isinstance(annotation, str):
        return annotation
    return _field_hints().get(key, annotation)


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` and ``Optional[X]`` as ``(X, True)``; anything else as ``(hint, False)``."""
    if get_origin(hint) not in (Union, types.UnionType):
        return hint, False
    args = get_args(hint)
    rest = [a for a in args if a is not type(None)]
    nullable = len(rest) < len(args)
    if len(rest) != 1:  # a real union: no setting has one, so check_type rejects it
        return hint, nullable
    return rest[0], nullable


def _literal_choices(literal: Any) -> list[Any]:
    """A list, not a set: membership of an unhashable value must be False, not a crash."""
    return list(get_args(literal))  # typing already flattens nested Literals


def _validate_semantics(values: dict[str, Any], written: Mapping[str, str]) -> None:
    """``written``: the key each value was given under, where that was a
    deprecated alias, so that an error names what the user wrote."""
    bucket = values.get("bucket")
    if not isinstance(bucket, str) or not bucket:
        raise ConfigError("bucket", "is required (the S3 bucket that holds the cache)")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError("bucket", f"{bucket!r} is not a valid S3 bucket name")
    prefix = values.get("prefix", StoreSettings.prefix)
    if isinstance(prefix, str):
        norm = prefix.strip("/")
        if not norm or "//" in norm or not _PREFIX_RE.match(norm):
            raise ConfigError(
                "prefix", f"{prefix!r} must be non-empty, use S3-safe characters, no '//'"
            )
        values["prefix"] = norm
    endpoint = values.get("endpoint_url")
    if isinstance(endpoint, str) and not re.match(r"^https?://[^/\s]+", endpoint):
        raise ConfigError("endpoint_url", f"{endpoint!r} must start with http:// or https://")
    bound = "max_cache_wait_s"
    ceiling = values.get(bound, Settings.max_cache_wait_s)
    for key in ("min_lookup_wait_s", "min_load_wait_s"):
        floor = values.get(key, getattr(Settings, key))
        if (isinstance(floor, (int, float)) and isinstance(ceiling, (int, float))
                and not isinstance(floor, bool) and not isinstance(ceiling, bool)
                and ceiling > 0 and floor > ceiling):
            raise ConfigError(written.get(key, key),
                              f"{floor!r} exceeds {written.get(bound, bound)}={ceiling!r}, "
                              "the absolute bound on every wait")
    for key in ("lookup_wait_fraction", "load_wait_fraction"):
        frac = values.get(key)
        if isinstance(frac, (int, float)) and not isinstance(frac, bool) and frac > 10:
            raise ConfigError(key, f"{frac!r} is a fraction of the recompute time; "
                              "use a value in (0, 10]")
    for key, closed in (("hedge_quantile", False), ("hedge_budget", True)):
        val = values.get(key)
        # Written so that NaN fails too: every comparison with it is false.
        if (isinstance(val, (int, float)) and not isinstance(val, bool)
                and not (0 < val < 1 or (closed and val == 1))):
            interval = "(0, 1]" if closed else "(0, 1)"
            raise ConfigError(key, f"{val!r} is out of range; use a value in {interval}")
    tag = values.get("namespace_tag", Settings.namespace_tag)
    if isinstance(tag, str) and len(tag) > 128:
        raise ConfigError("namespace_tag", "must be at most 128 characters")


def parse_settings(raw: Mapping[str, Any]) -> Settings:
    """Parse a flat mapping (``kv_connector_extra_config``) into :class:`Settings`."""
    if not isinstance(raw, Mapping):
        raise ConfigError("kv_connector_extra_config", "must be a mapping of keys to values")
    unknown = sorted(set(raw) - ALL_KEYS - set(DEPRECATED_KEYS))
    if unknown:
        raise ConfigError(unknown[0], "unknown key", choices=sorted(ALL_KEYS))
    values, written = _rename_deprecated(raw)
    _validate_semantics(values, written)
    store_kwargs: dict[str, Any] = {}
    top_kwargs: dict[str, Any] = {}
    hints = _field_hints()
    for cls, target in ((StoreSettings, store_kwargs), (Settings, top_kwargs)):
        for f in fields(cls):
            if f.name == "store" or f.name not in values:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            target[f.name] = check_type(written.get(f.name, f.name), values[f.name],
                                        hints[f.name], default)
    return Settings(store=StoreSettings(**store_kwargs), **top_kwargs)


def _rename_deprecated(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``raw`` with deprecated keys under their new names, and the new name of
    each one that was used mapped to the old name it was given under."""
    values = dict(raw)
    written: dict[str, str] = {}
    for old, new in DEPRECATED_KEYS.items():
        if old not in values:
            continue
        if new in values:
            raise ConfigError(old, f"is the deprecated name of {new!r}, which is given too; "
                              f"keep only {new!r}")
        log.warning("s3kv: config key %r is deprecated; use %r (the same setting)", old, new)
        values[new] = values.pop(old)
        written[new] = old
    return values, written


def settings_to_mapping(settings: Settings) -> dict[str, Any]:
    """The flat form accepted by :func:`parse_settings` (round-trips)."""
    out = {k: v for k, v in dataclasses.asdict(settings.store).items()}
    out.update({k: v for k, v in dataclasses.asdict(settings).items() if k != "store"})
    return out


__all__ = [
    "ALL_KEYS",
    "DEFAULT_BACKEND",
    "DEFAULT_CHUNK_TOKENS",
    "DEPRECATED_KEYS",
    "Settings",
    "StoreSettings",
    "check_type",
    "parse_settings",
    "settings_to_mapping",
]

