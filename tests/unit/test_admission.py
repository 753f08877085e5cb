from __future__ import annotations

import hashlib

import pytest

from s3kv.admission import AdmissionPolicy, SightingTracker
from s3kv.config import parse_settings
from s3kv.errors import ConfigError


def cid(i: int, salt: str = "") -> str:
    return hashlib.sha256(f"{salt}{i}".encode()).hexdigest()


def test_second_sighting_admits_only_the_second_time() -> None:
    p = AdmissionPolicy("second_sighting", window=1000)
    assert not p.admit(cid(1), requested=False)
    assert p.admit(cid(1), requested=False)
    assert not p.admit(cid(2), requested=False)


def test_requested_and_all() -> None:
    assert AdmissionPolicy("requested").admit(cid(1), requested=True)
    assert not AdmissionPolicy("requested").admit(cid(1), requested=False)
    assert AdmissionPolicy("all").admit(cid(1), requested=False)
    with pytest.raises(ValueError, match="valid"):
        AdmissionPolicy("sometimes")  # type: ignore[arg-type]


def test_config_names_the_admission_choices() -> None:
    assert parse_settings({"bucket": "my-bucket", "admission": "second_sighting"}).admission \
        == "second_sighting"
    with pytest.raises(ConfigError, match="second_sighting"):
        parse_settings({"bucket": "my-bucket", "admission": "maybe"})


def test_tracker_memory_is_bounded_under_a_long_unique_stream() -> None:
    t = SightingTracker(window=10_000, fp_rate=0.01)
    size = t.nbytes
    assert size <= 2 * 12_000  # ~9.6 bits per id per filter
    false_pos = sum(t.seen_then_add(cid(i, "u")) for i in range(200_000))
    assert t.nbytes == size  # 20 rotations later, not one byte more
    assert false_pos / 200_000 < 0.03  # both filters probed: at most ~2x the 1% target


def test_window_forgets_old_sightings_but_keeps_recent_ones() -> None:
    t = SightingTracker(window=1000)
    t.seen_then_add(cid(0, "old"))
    for i in range(2500):  # two and a half windows of other ids
        t.seen_then_add(cid(i, "fill"))
    assert not t.seen_then_add(cid(0, "old"))
    recent = cid(7, "recent")
    t.seen_then_add(recent)
    for i in range(500):
        t.seen_then_add(cid(i, "more"))
    assert t.seen_then_add(recent)
