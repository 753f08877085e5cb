from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any, Literal, get_args, get_origin

import pytest

from s3kv.config import (
    ALL_KEYS,
    DEFAULT_BACKEND,
    DEFAULT_CHUNK_TOKENS,
    DEPRECATED_KEYS,
    Settings,
    StoreSettings,
    check_type,
    parse_settings,
    settings_to_mapping,
)
from s3kv.errors import ConfigError


def parse(**values: Any) -> Settings:
    return parse_settings({"bucket": "my-bucket", **values})


def config_error(**values: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_settings(values)
    return info.value


def test_minimal_mapping_gives_defaults() -> None:
    s = parse_settings({"bucket": "my-bucket"})
    assert s == Settings(store=StoreSettings(bucket="my-bucket"))
    assert s.store.backend == "obstore"
    assert s.store.prefix == "s3kv"
    assert s.chunk_tokens == 256


def test_all_keys_are_every_field_but_store() -> None:
    store = {f.name for f in dataclasses.fields(StoreSettings)}
    top = {f.name for f in dataclasses.fields(Settings)} - {"store"}
    assert store | top == ALL_KEYS
    assert "store" not in ALL_KEYS


def test_unknown_key_names_the_key_and_lists_valid_keys() -> None:
    err = config_error(bucket="my-bucket", max_attempt=3)
    assert err.key == "max_attempt"
    msg = str(err)
    assert "'max_attempt'" in msg
    assert "unknown key" in msg
    for key in ALL_KEYS:
        assert repr(key) in msg, key
    assert isinstance(err, ValueError)


def test_several_unknown_keys_name_the_first_in_order() -> None:
    err = config_error(bucket="my-bucket", zzz=1, aaa=2)
    assert err.key == "aaa"


@pytest.mark.parametrize(
    ("key", "bad", "choices"),
    [
        ("backend", "s3fs", ["aioboto3", "obstore"]),
        ("addressing_style", "dns", ["auto", "path", "virtual"]),
        ("admission", "none", ["all", "requested", "second_sighting"]),
    ],
)
def test_bad_enum_names_the_choices(key: str, bad: str, choices: list[str]) -> None:
    err = config_error(bucket="my-bucket", **{key: bad})
    assert err.key == key
    assert repr(bad) in str(err)
    assert f"(valid: {choices})" in str(err)


@pytest.mark.parametrize("value", ["obstore", "aioboto3"])
def test_good_backends_accepted(value: str) -> None:
    assert parse(backend=value).store.backend == value


@pytest.mark.parametrize(
    "key", ["max_attempts", "max_concurrency", "chunk_tokens", "max_inflight_mib"]
)
@pytest.mark.parametrize("bad", [True, False, "3", 2.5, 0, -1])
def test_int_fields_reject_bool_str_float_and_non_positive(key: str, bad: Any) -> None:
    err = config_error(bucket="my-bucket", **{key: bad})
    assert err.key == key
    assert repr(bad) in str(err)


@pytest.mark.parametrize(
    "key", ["connect_timeout_s", "request_timeout_s", "max_cache_wait_s", "commit_timeout_s",
            "lookup_ttl_s"]
)
@pytest.mark.parametrize("bad", [True, "1.0", 0, -0.5, [1]])
def test_float_fields_reject_bool_str_and_non_positive(key: str, bad: Any) -> None:
    err = config_error(bucket="my-bucket", **{key: bad})
    assert err.key == key


def test_numbers_are_coerced_to_the_field_type() -> None:
    s = parse(connect_timeout_s=1, max_attempts=5, lookup_ttl_s=0.25)
    assert s.store.connect_timeout_s == 1.0
    assert isinstance(s.store.connect_timeout_s, float)
    assert s.store.max_attempts == 5
    assert s.lookup_ttl_s == 0.25


@pytest.mark.parametrize("key", ["chunk_tokens", "backend", "prefix", "namespace_tag"])
def test_null_rejected_for_non_optional_fields(key: str) -> None:
    err = config_error(bucket="my-bucket", **{key: None})
    assert err.key == key


def test_null_accepted_for_optional_fields() -> None:
    s = parse(endpoint_url=None, region=None, weights_id=None)
    assert s.store.endpoint_url is None
    assert s.store.region is None
    assert s.weights_id is None


@pytest.mark.parametrize("key", ["region", "weights_id", "namespace_tag"])
def test_string_fields_reject_non_strings(key: str) -> None:
    err = config_error(bucket="my-bucket", **{key: 5})
    assert err.key == key
    assert "must be a string" in str(err)


@pytest.mark.parametrize(
    "bad",
    ["", "ab", "My-Bucket", "my_bucket", "-bucket", "bucket-", "a" * 64, "my bucket", None, 5],
)
def test_bad_bucket_rejected(bad: Any) -> None:
    err = config_error(bucket=bad)
    assert err.key == "bucket"


def test_missing_bucket_rejected() -> None:
    err = config_error(prefix="x")
    assert err.key == "bucket"
    assert "required" in str(err)


@pytest.mark.parametrize(
    "good", ["abc", "my-bucket", "my.bucket.1", "a" * 63, "kv-cache--usw2-az1--x-s3"]
)
def test_good_bucket_accepted(good: str) -> None:
    assert parse_settings({"bucket": good}).store.bucket == good


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("s3kv", "s3kv"),
        ("/s3kv/", "s3kv"),
        ("team/kv/", "team/kv"),
        ("///team/kv", "team/kv"),
        ("a.b-c_d", "a.b-c_d"),
    ],
)
def test_prefix_is_normalised(raw: str, norm: str) -> None:
    mapping = {"bucket": "my-bucket", "prefix": raw}
    assert parse_settings(mapping).store.prefix == norm
    assert mapping["prefix"] == raw  # the caller's mapping is left alone


@pytest.mark.parametrize("bad", ["", "/", "///", "a//b", "with space", "tab\there", "ü"])
def test_bad_prefix_rejected(bad: str) -> None:
    err = config_error(bucket="my-bucket", prefix=bad)
    assert err.key == "prefix"


@pytest.mark.parametrize("bad", ["localhost:9000", "ftp://host", "http://", "http:// host"])
def test_bad_endpoint_rejected(bad: str) -> None:
    err = config_error(bucket="my-bucket", endpoint_url=bad)
    assert err.key == "endpoint_url"


def test_namespace_tag_length_capped() -> None:
    assert parse(namespace_tag="t" * 128).namespace_tag == "t" * 128
    err = config_error(bucket="my-bucket", namespace_tag="t" * 129)
    assert err.key == "namespace_tag"


def test_non_mapping_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings([("bucket", "my-bucket")])  # type: ignore[arg-type]
    assert info.value.key == "kv_connector_extra_config"


def test_settings_to_mapping_round_trips() -> None:
    raw = {
        "bucket": "kv-bucket",
        "prefix": "/team/kv/",
        "endpoint_url": "http://127.0.0.1:9000",
        "region": "eu-west-1",
        "backend": "aioboto3",
        "addressing_style": "path",
        "connect_timeout_s": 1,
        "request_timeout_s": 12.5,
        "max_attempts": 7,
        "max_concurrency": 9,
        "chunk_tokens": 512,
        "max_inflight_mib": 2048,
        "max_cache_wait_s": 3.0,
        "commit_timeout_s": 4.0,
        "lookup_ttl_s": 0.5,
        "lookup_wait_fraction": 0.2,
        "load_wait_fraction": 2.0,
        "min_lookup_wait_s": 0.05,
        "min_load_wait_s": 0.5,
        "latency_factor": 3.0,
        "probe_interval_s": 0.5,
        "weights_id": "sha-abc",
        "namespace_tag": "blue",
        "admission": "second_sighting",
        "admission_window": 5000,
        "hedge_reads": False,
        "hedge_quantile": 0.9,
        "hedge_budget": 1,
        "ssm_states": "all",
    }
    assert set(raw) == ALL_KEYS
    settings = parse_settings(raw)
    mapping = settings_to_mapping(settings)
    assert set(mapping) == ALL_KEYS
    assert mapping["prefix"] == "team/kv"
    assert mapping["connect_timeout_s"] == 1.0
    assert parse_settings(mapping) == settings
    assert settings_to_mapping(parse_settings(mapping)) == mapping


def test_hedging_defaults() -> None:
    s = parse()
    assert (s.hedge_reads, s.hedge_quantile, s.hedge_budget) == (True, 0.95, 0.1)


@pytest.mark.parametrize("bad", ["false", "true", 0, 1, None, [True]])
def test_booleans_must_be_json_booleans(bad: Any) -> None:
    err = config_error(bucket="my-bucket", hedge_reads=bad)
    assert err.key == "hedge_reads"
    assert ("must not be null" if bad is None else repr(bad)) in str(err)


def test_booleans_accepted_both_ways() -> None:
    assert parse(hedge_reads=False).hedge_reads is False
    assert parse(hedge_reads=True).hedge_reads is True
    assert check_type("k", False, bool, True) is False


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("hedge_quantile", [0.5, 0.99, 0.001], [0, 1, 1.5, -0.1, float("nan"), True, "0.9"]),
        ("hedge_budget", [1, 0.05, 0.5], [0, 1.01, 2, -0.1, float("nan"), True, "0.1"]),
    ],
)
def test_hedge_fractions_in_range(key: str, good: list[float], bad: list[Any]) -> None:
    for value in good:
        assert getattr(parse(**{key: value}), key) == value
    for value in bad:
        err = config_error(bucket="my-bucket", **{key: value})
        assert err.key == key, value
        assert f"'{key}'" in str(err)


def test_defaults_round_trip() -> None:
    settings = parse_settings({"bucket": "kv-bucket"})
    assert parse_settings(settings_to_mapping(settings)) == settings


# --- every field, by introspection ------------------------------------------------

FIELDS = [(cls, f) for cls in (StoreSettings, Settings) for f in dataclasses.fields(cls)
          if f.name != "store"]
HINTS = {**typing.get_type_hints(StoreSettings), **typing.get_type_hints(Settings)}


def wrong_value(hint: Any) -> Any:
    """A value of the wrong type for ``hint`` (None counts only where it is not allowed)."""
    args = get_args(hint)
    if type(None) in args:  # optional: a non-null value of the wrong type
        (hint,) = [a for a in args if a is not type(None)]
    if get_origin(hint) is Literal or hint is str:
        return 7
    return "7"  # numbers


def test_fields_are_checked_through_their_resolved_hints() -> None:
    """The parser sees string annotations (postponed evaluation); the hints are types."""
    assert all(isinstance(f.type, str) for _, f in FIELDS)
    assert set(HINTS) - {"store"} == ALL_KEYS


DEFAULTED = [(cls, f) for cls, f in FIELDS if f.default is not dataclasses.MISSING]


@pytest.mark.parametrize(("cls", "field"), DEFAULTED, ids=[f.name for _, f in DEFAULTED])
def test_every_field_accepts_its_default(cls: type, field: dataclasses.Field[Any]) -> None:
    parsed = parse(**{field.name: field.default})
    owner = parsed.store if cls is StoreSettings else parsed
    assert getattr(owner, field.name) == field.default


@pytest.mark.parametrize(("cls", "field"), FIELDS, ids=[f.name for _, f in FIELDS])
def test_every_field_rejects_a_wrong_type_naming_the_key(
    cls: type, field: dataclasses.Field[Any]
) -> None:
    bad = wrong_value(HINTS[field.name])
    with pytest.raises(ConfigError) as info:
        parse_settings({"bucket": "my-bucket", field.name: bad})
    assert info.value.key == field.name
    assert f"'{field.name}'" in str(info.value)
    if field.name != "bucket":  # bucket is checked first, as required, without the value
        assert repr(bad) in str(info.value)


def test_literal_error_lists_the_choices_and_survives_unhashable_values() -> None:
    err = config_error(bucket="my-bucket", backend=["obstore"])
    assert err.key == "backend"
    assert "(valid: ['aioboto3', 'obstore'])" in str(err)


@pytest.mark.parametrize("hint", [int | None, typing.Optional[int]])  # noqa: UP045
def test_optional_annotations_of_either_spelling(hint: Any) -> None:
    assert check_type("k", None, hint) is None
    assert check_type("k", 3, hint) == 3
    with pytest.raises(ConfigError, match="must be an integer"):
        check_type("k", True, hint)


def test_a_type_name_containing_int_is_not_an_int() -> None:
    """What the old text match got wrong: "Point" contains "int"."""

    class Point:
        pass

    with pytest.raises(ConfigError, match="unsupported annotation"):
        check_type("k", 3, Point)
    with pytest.raises(ConfigError, match="unsupported annotation"):
        check_type("k", 3, int | str)


def test_floats_accept_ints_and_coerce_but_ints_reject_floats() -> None:
    assert check_type("k", 2, float) == 2.0
    assert isinstance(check_type("k", 2, float), float)
    with pytest.raises(ConfigError, match=r"must be an integer, got float 2\.0"):
        check_type("k", 2.0, int)
    with pytest.raises(ConfigError, match=r"must be > 0, got -1"):
        check_type("k", -1, int | None)
    # The same rule on real fields, through the parser.
    timeout = parse(max_cache_wait_s=2).max_cache_wait_s
    assert timeout == 2.0 and isinstance(timeout, float)
    err = config_error(bucket="my-bucket", chunk_tokens=256.0)
    assert err.key == "chunk_tokens" and "must be an integer, got float 256.0" in str(err)


# --- deprecated names ---------------------------------------------------------------

RENAMED = [("load_timeout_s", "max_cache_wait_s", 7.0), ("min_wait_s", "min_lookup_wait_s", 0.5)]


def test_deprecated_keys_name_real_fields_and_are_not_advertised() -> None:
    assert dict(DEPRECATED_KEYS) == {old: new for old, new, _ in RENAMED}
    assert set(DEPRECATED_KEYS.values()) <= ALL_KEYS
    assert not set(DEPRECATED_KEYS) & ALL_KEYS


@pytest.mark.parametrize(("old", "new", "value"), RENAMED)
def test_old_name_sets_the_new_field_with_one_warning(
    old: str, new: str, value: float, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="s3kv.config"):
        s = parse(**{old: value})
    assert getattr(s, new) == value
    assert s == parse(**{new: value})
    warnings = [r for r in caplog.records if r.name == "s3kv.config"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert repr(old) in warnings[0].getMessage() and repr(new) in warnings[0].getMessage()


def test_new_names_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="s3kv.config"):
        parse(max_cache_wait_s=7.0, min_lookup_wait_s=0.5)
    assert not [r for r in caplog.records if r.name == "s3kv.config"]


@pytest.mark.parametrize(("old", "new", "value"), RENAMED)
def test_old_and_new_name_together_is_an_error_naming_both(
    old: str, new: str, value: float
) -> None:
    for same in (True, False):  # even when they agree: which one wins is not obvious
        err = config_error(bucket="my-bucket", **{old: value, new: value if same else 2 * value})
        assert err.key == old
        assert repr(old) in str(err) and repr(new) in str(err)


@pytest.mark.parametrize(("old", "new", "value"), RENAMED)
def test_a_bad_value_under_an_old_name_names_the_old_name(
    old: str, new: str, value: float
) -> None:
    err = config_error(bucket="my-bucket", **{old: "soon"})
    assert err.key == old and "'soon'" in str(err)


def test_the_floor_check_names_the_keys_as_written() -> None:
    err = config_error(bucket="my-bucket", load_timeout_s=1.0, min_wait_s=2.0)
    assert err.key == "min_wait_s" and "load_timeout_s=1.0" in str(err)
    err = config_error(bucket="my-bucket", max_cache_wait_s=1.0, min_lookup_wait_s=2.0)
    assert err.key == "min_lookup_wait_s" and "max_cache_wait_s=1.0" in str(err)


# --- defaults live in the dataclasses alone -----------------------------------------


def test_the_floor_check_uses_the_field_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # min_load_wait_s defaults to more than this bound: the check must know it.
    below = Settings.min_load_wait_s / 2
    err = config_error(bucket="my-bucket", max_cache_wait_s=below)
    assert err.key == "min_load_wait_s"
    parse(max_cache_wait_s=below, min_load_wait_s=below)
    # ... and it reads the defaults from the dataclass, not from a copy of them.
    monkeypatch.setattr(Settings, "min_lookup_wait_s", Settings.max_cache_wait_s * 2)
    assert config_error(bucket="my-bucket").key == "min_lookup_wait_s"
    monkeypatch.setattr(Settings, "max_cache_wait_s", Settings.max_cache_wait_s * 4)
    parse()


def test_prefix_default_is_normalised_from_the_field() -> None:
    assert parse().store.prefix == StoreSettings.prefix


def test_module_constants_are_the_field_defaults() -> None:
    assert StoreSettings.backend == DEFAULT_BACKEND
    assert Settings.chunk_tokens == DEFAULT_CHUNK_TOKENS


def test_ssm_states_takes_its_choices_only() -> None:
    assert parse_settings({"bucket": "kv-bucket"}).ssm_states == "prompt_end"
    assert parse_settings({"bucket": "kv-bucket", "ssm_states": "all"}).ssm_states == "all"
    with pytest.raises(ConfigError) as err:
        parse_settings({"bucket": "kv-bucket", "ssm_states": "every"})
    assert "ssm_states" in str(err.value) and "prompt_end" in str(err.value)
