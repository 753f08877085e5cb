"""bench/tail_sim.py: its store is the latency it claims, and a short run against
a fast store reports hits and a breaker that never opened."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.common import percentile
from bench.tail_sim import Profile, SlowStore, main, make_pool, run_case


def test_store_latency_has_the_profiles_median_and_p99_and_repeats_per_key() -> None:
    store = SlowStore(Profile(30, 200), "seed")
    draws = sorted(store.latency("get", f"k{i}") for i in range(4000))
    assert percentile(draws, 50) == pytest.approx(0.030, rel=0.1)
    assert percentile(draws, 99) == pytest.approx(0.200, rel=0.25)
    one, two = SlowStore(Profile(30, 200), "seed"), SlowStore(Profile(30, 200), "seed")
    first = [one.latency("get", "k7") for _ in range(3)]
    assert first == [two.latency("get", "k7") for _ in range(3)]  # the n-th GET of a key
    assert len(set(first)) == 3  # retries of one key are independent draws


def test_pool_plants_only_committed_prefixes() -> None:
    pool = make_pool(3, 50, 4, 0.5)
    planted = {cid for cid, _, _ in pool.committed}
    assert 0 < len(planted) < len({c for p in pool.prompts for c in p})
    for ids in pool.prompts:
        inside = [cid in planted for cid in ids]
        assert inside == sorted(inside, reverse=True)  # never a planted chunk after a gap


def test_a_fast_store_never_opens_the_breaker_and_serves_hits() -> None:
    # The floor is raised so that a busy test machine cannot make a 5 ms store
    # miss a deadline: this checks the simulation's accounting, not the policy.
    row = run_case(Profile(5, 10), 60, 0.8, seed=2, settings={"min_lookup_wait_s": 2.0})
    assert row["breaker_open_frac"] == 0.0
    assert row["breaker_opens"] == 0
    assert row["lookups_skipped"] == 0 and row["saves_skipped"] == 0
    assert row["saves_dropped_frac"] == 0.0 and row["deadline_misses"] == 0
    assert row["arrived"] >= 20 and row["asked"] == row["arrived"]
    assert row["answered"] >= 0.8 * row["arrived"]  # all but the last steps' arrivals
    assert 0 < row["hit_chunks"] <= row["store_prefix_chunks"]
    assert row["hit_chunks"] <= row["candidate_chunks"]
    assert row["planned"] > 0 and row["saves_ok"] > 0 and row["saves_failed"] == 0
    assert row["saves_wanted"] == row["planned"] + row["counters"].get("admission_skipped", 0)
    assert row["store_requests"]["get"] >= row["gets_asked"] > 0
    # every save is one PUT, plus the start-up's two of the namespace document
    # (created, then refused: the server honours create-only puts); some saves
    # may still be in flight
    assert row["saves_ok"] + 2 <= row["store_requests"]["put"] <= row["planned"] + 2
    assert row["lookup_wait_ms"]["max"] < 2000
    assert 0.0 <= row["hedged_frac"] <= 1.0


def test_the_command_writes_the_results_and_prints_a_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tail.json"
    assert main(["--profiles", "5/10,40/80", "--rates", "40", "--seconds", "0.4",
                 "--repeats", "1", "--label", "t", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "tail_sim" and doc["label"] == "t"
    assert doc["settings"]["profiles"] == ["5/10 ms", "40/80 ms"]
    assert [r["profile"] for r in doc["results"]] == ["5/10 ms", "40/80 ms"]
    for r in doc["results"]:
        for key in ("breaker_open_frac", "lookups_skipped_frac", "saves_dropped_frac"):
            assert 0.0 <= r[key] <= 1.0
        assert r["seconds"] == pytest.approx(0.4, abs=0.2)
        assert r["hedging"]
    assert [s["runs"] for s in doc["summary"]] == [1, 1]
    assert not math.isnan(doc["summary"][0]["breaker_open_frac"]["mean"])
    printed = capsys.readouterr().out
    assert "| profile (median/p99 ms) | lookups/s | breaker open |" in printed
    assert "| 40/80 ms | 40 |" in printed
