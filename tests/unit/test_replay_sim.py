"""The fleet simulation against answers worked out by hand, and its invariants.

Expected figures here never come from the simulation's own helpers: hits are
re-derived from hash ids with the engine rules, chunk ids from
:func:`s3kv.keys.chunk_id` and the documented stand-in, money from the list
prices, and the small hand-made fleet is stepped through request by request
in comments.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3kv.capacity import PRICES
from s3kv.gc import Policies, select_chain_deletions
from s3kv.keys import chunk_id
from s3kv.replay import tier as tier_mod
from s3kv.replay.routing import route_all
from s3kv.replay.sim import (
    MIN_LOAD_WAIT_S,
    PROFILES,
    ROUTINGS,
    FleetConfig,
    FleetConfigError,
    model_preset,
    replay,
)
from s3kv.replay.trace import Trace, TraceRequest, read_trace, upper_bound_hit_tokens

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "bench" / "data" / "mooncake" / "conversation_trace.jsonl"


def req(t: float, tokens: int, blocks: Sequence[int], bt: int = 512) -> TraceRequest:
    return TraceRequest(t, tokens, 1, tuple(blocks), bt)


# --- (1) validation against an independent bound ----------------------------------------


def engine_rule_bound(trace: Trace) -> int:
    """Per request: leading full 512-token blocks seen as full blocks of earlier
    requests, at most (input - 1) // 512 of them; summed, in tokens."""
    seen: set[int] = set()
    total = 0
    for r in trace.requests:
        full = r.input_tokens // 512
        k = 0
        while k < (r.input_tokens - 1) // 512 and r.blocks[k] in seen:
            k += 1
        total += k * 512
        seen.update(r.blocks[:full])
    return total


def conversation_trace(n: int, seed: int) -> Trace:
    """Requests that start new conversations on one of three system prompts, continue
    an earlier one (its full blocks and some new ones) or resend one verbatim."""
    rng = random.Random(seed)
    fresh = iter(range(1000, 10**9))
    systems = [[next(fresh) for _ in range(rng.randint(1, 3))] for _ in range(3)]
    out: list[TraceRequest] = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(4.0)
        roll = rng.random()
        if out and roll < 0.15:
            old = rng.choice(out)
            out.append(TraceRequest(t, old.input_tokens, 1, old.blocks))
            continue
        if out and roll < 0.6:
            old = rng.choice(out)
            prefix = list(old.blocks[:old.input_tokens // 512])
        else:
            prefix = list(rng.choice(systems))
        blocks = prefix + [next(fresh) for _ in range(rng.randint(1, 4))]
        tokens = (len(blocks) - 1) * 512 + rng.randint(1, 512)
        out.append(TraceRequest(t, tokens, 1, tuple(blocks)))
    return Trace(tuple(out), "generated")


ONE_ENGINE = FleetConfig(engines=1, local_cache_bytes=None, admission="all", chunk_tokens=512,
                         ttl_s=None, max_bytes=None)


def test_one_unbounded_engine_hits_exactly_the_engine_rule_bound() -> None:
    trace = conversation_trace(400, seed=3)
    bound = engine_rule_bound(trace)
    assert bound > 100 * 512  # the generator shares plenty
    report = replay(trace, ONE_ENGINE)
    assert report.local_hit_tokens + report.s3_hit_tokens == bound
    assert report.s3_hit_tokens == 0  # everything S3 holds, the engine holds too
    assert report.computed_tokens == trace.input_tokens - bound
    assert bound <= report.upper_bound_tokens == upper_bound_hit_tokens(trace)


def test_the_shipped_mooncake_trace_hits_the_engine_rule_bound() -> None:
    """Real trace (bench/data/mooncake): one engine, unbounded cache, 512-token chunks."""
    if not SHIPPED.exists():
        pytest.skip(f"the Mooncake trace is not in the repository yet ({SHIPPED})")
    trace = read_trace(SHIPPED)
    bound = engine_rule_bound(trace)
    report = replay(trace, ONE_ENGINE)
    assert report.local_hit_tokens + report.s3_hit_tokens == bound
    # The block bound (37.4%) counts each request's last, partial block too.
    assert 0.36 < bound / trace.input_tokens < report.upper_bound_tokens / trace.input_tokens


# --- (2) a hand-made fleet, every figure --------------------------------------------------

# Two engines, round-robin; 16-token blocks and chunks, so chunk j is block j.
# 1,000 bytes per token: a chunk is 16,000 bytes; TP 2 with 2 KV heads: 2 shards,
# a commit is 3 PUTs, a hit 1 + 2 GETs, a deletion 3 DELETEs. 16 tokens/s: one
# chunk's compute is 1 s. S3 Standard: 0.03 s round trip, 2 GB/s set, so loading one
# chunk takes 0.03 + 16000 / 2e9 = 0.030008 s. Local caches hold 2 chunks.
# A1..A3 are the chunks of blocks [1], [1,2], [1,2,3]; B4 of [1,2,3,6]; C1 of [7].
HAND = Trace((
    req(0, 49, [1, 2, 3, 4], bt=16),  # Q0 -> e0
    req(1, 40, [1, 2, 5], bt=16),  # Q1 -> e1
    req(3, 20, [7, 8], bt=16),  # Q2 -> e0
    req(4, 64, [1, 2, 3, 6], bt=16),  # Q3 -> e1
    req(8, 65, [1, 2, 3, 6, 9], bt=16),  # Q4 -> e0
), "hand")
HAND_CFG = FleetConfig(engines=2, routing="round-robin", local_cache_bytes=32_000,
                       kv_bytes_per_token=1000, tp=2, num_kv_heads=2, prefill_tokens_per_s=16,
                       chunk_tokens=16, storage_class="standard", admission="all", ttl_s=2,
                       gc_interval_s=7.5, gpu_dollars_per_hour=2.0, load_gbps=2.0)


def hand_ids() -> dict[str, str]:
    extra = {"block_tokens": 16}
    a1 = chunk_id(None, [1, 16], extra)
    a2 = chunk_id(a1, [2, 16], extra)
    a3 = chunk_id(a2, [3, 16], extra)
    return {"A1": a1, "A2": a2, "A3": a3, "B4": chunk_id(a3, [6, 16], extra),
            "C1": chunk_id(None, [7, 16], extra)}


def test_hand_made_fleet_every_figure() -> None:
    # Q0 e0 @0: no local, lookup 0.03 finds nothing (404 on A1 at second 0); 49 tokens
    #   computed (3.0625 s): ends 3.0925. e0 keeps A2, A1 (A3, the tail, evicted first).
    #   Commits A1 A2 A3 at 3.1225 (9 PUTs, second 3).
    # Q1 e1 @1: no local; nothing committed yet: 404 on A1 (second 1); 40 computed
    #   (2.5 s): ends 3.53. e1 keeps A2, A1; A1, A2 are in flight already.
    # Q2 e0: arrives 3, e0 free at 3.0925; C1 not local, 404 on C1 (second 3); 20
    #   computed (1.25 s): ends 4.3725. e0 keeps A1, C1. Commits C1 at 4.4025 (second 4).
    # Q3 e1 @4: local A1 A2; lookup finds A3 (committed 3.1225), limit (63 // 16 = 3)
    #   reached: 1 manifest GET, load 0.030008 s < 1 s recompute: 2 shard GETs at
    #   4.03; 16 computed: ends 4 + 0.03 + 0.030008 + 1 = 5.060008. Commits B4 at
    #   5.090008 (second 5).
    # GC @7.5 (older than 2 s: cutoff 5.5): the A chain's newest is B4 (5.090008) and
    #   C1 is 4.4025: all 5 deleted, 15 DELETEs at second 7; stored 0 after.
    # Q4 e0 @8: local A1 only (e0 holds A1, C1); A2 was deleted: 404 (second 8); 49
    #   computed (3.0625 s): ends 11.0925. A1..B4 are saved again: commit at 11.1225
    #   (12 PUTs, second 11). The replay ends at 11.1225 with a last GC (cutoff
    #   9.1225, nothing old) and 4 chunks stored.
    r = replay(HAND, HAND_CFG)
    assert (r.requests, r.input_tokens) == (5, 49 + 40 + 20 + 64 + 65)
    assert r.upper_bound_tokens == 0 + 32 + 0 + 48 + 64
    assert (r.local_hit_tokens, r.s3_hit_tokens, r.computed_tokens) == (3 * 16, 16, 174)
    assert r.s3_skipped_tokens == 0
    assert r.prefill_seconds_saved == pytest.approx(1.0)
    ttfts = sorted([3.0925, 2.53, 4.3725 - 3, 1.060008, 11.0925 - 8])
    assert r.ttft_p50_s == pytest.approx(ttfts[2])
    assert r.ttft_p99_s == pytest.approx(ttfts[3] + 0.96 * (ttfts[4] - ttfts[3]))
    # Without S3: no round trips, no S3 hit for Q3 (32 computed: 2 s).
    no_s3 = sorted([3.0625, 2.5, 4.3125 - 3, 2.0, 11.0625 - 8])
    assert r.ttft_p50_no_s3_s == pytest.approx(no_s3[2])
    assert r.ttft_p99_no_s3_s == pytest.approx(no_s3[3] + 0.96 * (no_s3[4] - no_s3[3]))
    assert r.s3_requests == {"put": 9 + 3 + 3 + 12, "get": 3, "get_miss": 4, "delete": 15}
    assert r.s3_peak_rps == {"put": 12.0, "get": 3.0, "get_miss": 1.0, "delete": 15.0}
    assert r.committed_chunks == 9
    assert (r.gc_deleted_chunks, r.gc_deleted_bytes, r.gc_runs) == (5, 5 * 16_000, 2)
    end = 11.1225
    assert r.span_s == pytest.approx(end)
    assert [t for t, _ in r.bytes_stored_series] == pytest.approx([7.5, end])
    assert [b for _, b in r.bytes_stored_series] == [0, 4 * 16_000]
    # Events: 5 arrivals + 5 finishes + 9 commits + 2 GC runs, then 5 + 5 without S3.
    assert r.events == 21 + 10

    # Per partition and second, every request of the story above.
    ids = hand_ids()
    part = {k: int(v[:2], 16) for k, v in ids.items()}
    requests = [  # (kind, second, chunk, count)
        *[("put", 3, c, 3) for c in ("A1", "A2", "A3")], ("put", 4, "C1", 3),
        ("put", 5, "B4", 3), *[("put", 11, c, 3) for c in ("A1", "A2", "A3", "B4")],
        ("get", 4, "A3", 3),
        ("get_miss", 0, "A1", 1), ("get_miss", 1, "A1", 1), ("get_miss", 3, "C1", 1),
        ("get_miss", 8, "A2", 1),
        *[("delete", 7, c, 3) for c in ("A1", "A2", "A3", "B4", "C1")],
    ]

    def busiest(kinds: set[str]) -> float:
        per: dict[tuple[int, int], int] = {}
        for kind, sec, c, n in requests:
            if kind in kinds:
                per[(sec, part[c])] = per.get((sec, part[c]), 0) + n
        return float(max(per.values()))

    assert r.busiest_partition_rps == busiest({"put", "get", "get_miss", "delete"})
    assert r.busiest_partition_rps_by_kind == {k: busiest({k}) for k in tier_mod.KINDS}

    # Money over the 11.1225 s span, scaled to a day. Stored byte-seconds: A1..A3
    # from 3.1225 and C1 from 4.4025 and B4 from 5.090008, all to 7.5; the second
    # A1..B4 from 11.1225 to the end: 0.
    byte_s = 16_000 * (3 * (7.5 - 3.1225) + (7.5 - 4.4025) + (7.5 - 5.090008))
    p = PRICES["standard"]
    day = 86_400 / end
    span = {"put": 27 / 1000 * p["put_per_1k"], "get": 7 / 1000 * p["get_per_1k"],
            "storage": byte_s / 1e9 / (30 * 86_400) * p["storage_gb_month"],
            "transfer": 0.0}
    span["total"] = sum(span.values())
    assert r.dollars_per_day == pytest.approx({k: v * day for k, v in span.items()})
    # GPU: 1 s of prefill on 2 GPUs at $2/h.
    assert r.gpu_dollars_per_day_saved == pytest.approx(1.0 * 2 / 3600 * 2.0 * day)
    assert r.tokens_saved_per_s3_dollar == pytest.approx(16 / span["total"])
    assert r.hit_fraction == pytest.approx(64 / 238)
    assert r.of_upper_bound == pytest.approx(64 / 144)
    assert r.wall_s > 0


def test_report_json_is_plain_and_complete() -> None:
    r = replay(HAND, HAND_CFG)
    doc = r.to_json()
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["version"] == 1
    assert doc["config"] == dataclasses.asdict(HAND_CFG)
    assert doc["bytes_stored_series"][1] == [pytest.approx(11.1225), 64_000]
    expected = {f.name for f in dataclasses.fields(r)} | {"version", "hit_fraction",
                                                          "of_upper_bound"}
    assert set(doc) == expected


def test_a_load_slower_than_recompute_is_not_made() -> None:
    # 1 GB per token: two chunks load in 0.03 + 32 GB / 6 GB/s, past both the
    # 1 s floor and their 32-microsecond recompute, so the hit is found, not loaded.
    cfg = FleetConfig(engines=2, routing="round-robin", local_cache_bytes=0,
                      kv_bytes_per_token=10**9, chunk_tokens=16, prefill_tokens_per_s=1e6)
    trace = Trace((req(0, 33, [1, 2, 3], bt=16), req(5, 33, [1, 2, 3], bt=16)), "slow")
    r = replay(trace, cfg)
    assert (r.local_hit_tokens, r.s3_hit_tokens, r.s3_skipped_tokens) == (0, 0, 32)
    assert r.computed_tokens == 66
    # The lookup found both manifests; no shard was read.
    assert r.s3_requests["get"] == 2 and r.s3_requests["get_miss"] == 1
    assert r.ttft_p50_s == pytest.approx(0.03 + 33 / 1e6)
    assert r.tokens_saved_per_s3_dollar == 0.0


def test_a_load_under_the_wait_floor_is_made_though_recompute_is_faster() -> None:
    # As the connector: a load deadline is never under min_load_wait_s (1 s), so
    # a 0.03 + 0.053 s load beats a 32-microsecond recompute estimate all the same.
    assert MIN_LOAD_WAIT_S == 1.0
    cfg = FleetConfig(engines=2, routing="round-robin", local_cache_bytes=0,
                      kv_bytes_per_token=10**7, chunk_tokens=16, prefill_tokens_per_s=1e6)
    trace = Trace((req(0, 33, [1, 2, 3], bt=16), req(5, 33, [1, 2, 3], bt=16)), "floor")
    r = replay(trace, cfg)
    assert (r.s3_hit_tokens, r.s3_skipped_tokens) == (32, 0)
    faster = replay(trace, dataclasses.replace(cfg, load_gbps=1e-3))  # 160 s per chunk
    assert (faster.s3_hit_tokens, faster.s3_skipped_tokens) == (0, 32)


def test_without_s3_nothing_is_stored_or_paid() -> None:
    r = replay(HAND, dataclasses.replace(HAND_CFG, s3=False))
    assert r.s3_hit_tokens == 0
    assert r.s3_requests == dict.fromkeys(tier_mod.KINDS, 0)
    assert r.dollars_per_day["total"] == 0.0 and r.tokens_saved_per_s3_dollar == 0.0
    assert r.bytes_stored_series == [] and r.gc_runs == 0
    assert (r.ttft_p50_s, r.ttft_p99_s) == (r.ttft_p50_no_s3_s, r.ttft_p99_no_s3_s)
    assert r.ttft_p50_s == pytest.approx(2.5)
    assert r.events == 10  # one run only


# --- (3) routing, admission, GC budget --------------------------------------------------


def test_routing_rules() -> None:
    trace = conversation_trace(300, seed=5)
    n = len(trace.requests)
    rr = route_all(trace, FleetConfig(engines=4, routing="round-robin"))
    assert rr == [i % 4 for i in range(n)]
    rnd = route_all(trace, FleetConfig(engines=4, routing="random", seed=1))
    assert rnd == route_all(trace, FleetConfig(engines=4, routing="random", seed=1))
    assert rnd != route_all(trace, FleetConfig(engines=4, routing="random", seed=2))
    assert set(rnd) == {0, 1, 2, 3}


def test_prefix_affinity_follows_the_longest_prefix_unless_its_engine_is_busy() -> None:
    # Every request starts with block 0 (a shared system prompt); conversations then
    # differ. 40 first turns arrive 10 ms apart, each 100 ms of prefill at 10,000
    # tokens/s: one engine cannot keep up, so they spread over every engine although
    # all match block 0. The second turns come after a pause, with every engine idle:
    # each goes where its conversation went.
    convs = 40
    first = [req(i / 100, 1024, [0, 100 + i]) for i in range(convs)]
    later = [req(100 + i, 1536, [0, 100 + i, 500 + i]) for i in range(convs)]
    trace = Trace(tuple(first + later), "conversations")
    cfg = FleetConfig(engines=4, routing="prefix-affinity", prefill_tokens_per_s=10_000)
    route = route_all(trace, cfg)
    assert route[convs:] == route[:convs]
    assert sorted(set(route[:convs])) == [0, 1, 2, 3]
    # Q0 takes engine 0 (all idle); Q1 matches block 0 on engine 0 only, but waiting
    # there (90 ms) exceeds recomputing the 512-token prefix (51.2 ms): engine 1.
    assert route[:4] == [0, 1, 2, 3]
    # Idle engines keep a shared prefix together: no load, no reason to leave it.
    idle = Trace(tuple(req(10.0 * i, 1024, [0, 100 + i]) for i in range(8)), "idle")
    assert route_all(idle, cfg) == [0] * 8


def conversations(n: int, seed: int) -> Trace:
    """Conversations of several turns, each turn extending the last, interleaved."""
    rng = random.Random(seed)
    fresh = iter(range(1, 10**9))
    system = next(fresh)
    live: list[list[int]] = []
    out: list[TraceRequest] = []
    for i in range(n):
        if not live or rng.random() < 0.3:
            live.append([system])
        conv = rng.choice(live)
        conv.extend(next(fresh) for _ in range(rng.randint(1, 3)))
        out.append(TraceRequest(float(i), len(conv) * 512, 1, tuple(conv)))
    return Trace(tuple(out), "conversations")


def test_prefix_affinity_beats_random_routing_on_local_hits() -> None:
    trace = conversations(300, seed=7)
    base = FleetConfig(engines=8, local_cache_bytes=None, s3=False, chunk_tokens=512)
    affinity = replay(trace, dataclasses.replace(base, routing="prefix-affinity"))
    rnd = replay(trace, dataclasses.replace(base, routing="random"))
    assert affinity.local_hit_tokens > 2 * rnd.local_hit_tokens
    # With the S3 tier every engine can read what any other computed: random
    # routing recovers most of the gap.
    rnd_s3 = replay(trace, dataclasses.replace(base, routing="random", s3=True,
                                               storage_class="express"))
    assert rnd_s3.local_hit_tokens + rnd_s3.s3_hit_tokens > 1.5 * rnd.local_hit_tokens


def test_second_sighting_saves_fewer_chunks_and_requested_saves_none() -> None:
    trace = conversation_trace(300, seed=11)
    base = FleetConfig(engines=4, routing="random", local_cache_bytes=0, chunk_tokens=512,
                       storage_class="express")
    everything = replay(trace, base)
    second = replay(trace, dataclasses.replace(base, admission="second_sighting"))
    requested = replay(trace, dataclasses.replace(base, admission="requested"))
    assert 0 < second.committed_chunks < everything.committed_chunks
    assert second.s3_requests["put"] == second.committed_chunks * (base.shards + 1)
    assert second.s3_hit_tokens < everything.s3_hit_tokens
    assert requested.committed_chunks == requested.s3_hit_tokens == 0
    assert requested.s3_requests["put"] == 0


def test_gc_max_size_keeps_stored_bytes_within_budget_at_every_sample() -> None:
    trace = conversation_trace(300, seed=13)
    base = FleetConfig(engines=4, local_cache_bytes=0, chunk_tokens=512,
                       storage_class="express", gc_interval_s=5.0)
    unbounded = replay(trace, base)
    budget = 20 * base.chunk_bytes
    assert max(b for _, b in unbounded.bytes_stored_series) > 2 * budget
    capped = replay(trace, dataclasses.replace(base, max_bytes=budget))
    assert len(capped.bytes_stored_series) > 10
    assert all(b <= budget for _, b in capped.bytes_stored_series)
    assert capped.gc_deleted_chunks > 0
    assert capped.gc_deleted_bytes == capped.gc_deleted_chunks * base.chunk_bytes
    assert capped.s3_requests["delete"] == capped.gc_deleted_chunks * (base.shards + 1)
    assert capped.s3_hit_tokens < unbounded.s3_hit_tokens
    assert capped.dollars_per_day["storage"] < unbounded.dollars_per_day["storage"]


def test_no_gc_without_a_policy() -> None:
    r = replay(HAND, dataclasses.replace(HAND_CFG, ttl_s=None))
    assert (r.gc_runs, r.gc_deleted_chunks, r.s3_requests["delete"]) == (0, 0, 0)
    assert [b for _, b in r.bytes_stored_series] == [5 * 16_000, 5 * 16_000]


# --- (4) configuration errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("engines", 0, ">= 1"), ("engines", 1.5, "whole number"), ("engines", True, "whole"),
        ("routing", "sticky", "valid"), ("local_cache_bytes", -1, ">= 0"),
        ("kv_bytes_per_token", 0, ">= 1"), ("tp", 0, ">= 1"), ("num_kv_heads", 0, ">= 1"),
        ("prefill_tokens_per_s", 0, "> 0"), ("prefill_tokens_per_s", float("inf"), "finite"),
        ("chunk_tokens", 100, "multiple of 16"), ("chunk_tokens", 0, "multiple of 16"),
        ("s3", "yes", "True or False"), ("storage_class", "glacier", "express"),
        ("admission", "some", "second_sighting"), ("admission_window", 0, ">= 1"),
        ("ttl_s", 0, "> 0"), ("ttl_s", float("nan"), "finite"), ("max_bytes", -5, ">= 0"),
        ("gc_interval_s", 0, "> 0"), ("gpu_dollars_per_hour", -1, ">= 0"),
        ("seed", "x", "whole number"),
    ],
)
def test_bad_config_values_name_their_field(field: str, value: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words) as err:
        FleetConfig(**{field: value})
    assert isinstance(err.value, FleetConfigError)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_config_defaults_and_presets() -> None:
    cfg = FleetConfig()
    assert cfg.routing in ROUTINGS and cfg.shards == 4
    assert cfg.profile == PROFILES["standard"]
    assert set(PROFILES) == set(PRICES)
    assert model_preset("llama-3-70b") == (cfg.kv_bytes_per_token, 8)
    assert model_preset("llama-3-8b") == (131_072, 8)
    with pytest.raises(ValueError, match="llama-3-70b"):
        model_preset("llama-9")
    with pytest.raises(ValueError, match="no requests"):
        replay(Trace((), "empty"), cfg)


def test_hf_config_gives_the_kv_shape(tmp_path: Path) -> None:
    from s3kv.replay.sim import kv_from_hf_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_hidden_layers": 32, "num_attention_heads": 32,
                                "num_key_value_heads": 8, "hidden_size": 4096,
                                "torch_dtype": "bfloat16"}))
    assert kv_from_hf_config(path) == (2 * 32 * 8 * 128 * 2, 8)
    with pytest.raises(ValueError, match="--config"):
        kv_from_hf_config(tmp_path / "absent.json")


def test_progress_reaches_the_total_of_both_runs() -> None:
    seen: list[tuple[int, int]] = []
    replay(HAND, HAND_CFG, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (10, 10)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# --- (5) properties over random small fleets -------------------------------------------


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    bt = draw(st.sampled_from([16, 32, 48]))
    fresh = iter(range(1, 10**6))
    out: list[TraceRequest] = []
    t = 0.0
    for _ in range(draw(st.integers(1, 10))):
        t += draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0]))
        prefix: list[int] = []
        share: bool = draw(st.booleans())
        if out and share:
            old = draw(st.sampled_from(out))
            prefix = list(old.blocks[:draw(st.integers(0, old.input_tokens // bt))])
        blocks = prefix + [next(fresh) for _ in range(draw(st.integers(1, 4)))]
        tokens = (len(blocks) - 1) * bt + draw(st.integers(1, bt))
        out.append(TraceRequest(t, tokens, 1, tuple(blocks), bt))
    return Trace(tuple(out), "hypothesis")


configs = st.builds(
    FleetConfig,
    engines=st.integers(1, 3),
    routing=st.sampled_from(ROUTINGS),
    local_cache_bytes=st.sampled_from([None, 0, 2_000, 50_000]),
    kv_bytes_per_token=st.sampled_from([1, 100, 10**6]),
    tp=st.integers(1, 4),
    num_kv_heads=st.integers(1, 8),
    prefill_tokens_per_s=st.sampled_from([16.0, 1_000.0, 1e6]),
    chunk_tokens=st.sampled_from([16, 32, 48]),
    s3=st.booleans(),
    storage_class=st.sampled_from(sorted(PROFILES)),
    admission=st.sampled_from(["all", "second_sighting", "requested"]),
    admission_window=st.sampled_from([1, 1000]),
    ttl_s=st.sampled_from([None, 0.05, 1.0]),
    max_bytes=st.sampled_from([None, 0, 100_000]),
    gc_interval_s=st.sampled_from([0.1, 1.0]),
    seed=st.integers(0, 3),
)


def chunk_rule_bound(trace: Trace, chunk_tokens: int) -> int:
    """Per request, its leading hittable chunks that an earlier request had as full
    chunks: a chunk is the hash ids up to the block of its last token and its end."""
    seen: set[tuple[tuple[int, ...], int, int]] = set()
    total = 0
    for r in trace.requests:
        def key(j: int, r: TraceRequest = r) -> tuple[tuple[int, ...], int, int]:
            end = (j + 1) * chunk_tokens
            return r.blocks[:(end - 1) // r.block_tokens + 1], end, r.block_tokens

        k = 0
        while k < (r.input_tokens - 1) // chunk_tokens and key(k) in seen:
            k += 1
        total += k * chunk_tokens
        seen.update(key(j) for j in range(r.input_tokens // chunk_tokens))
    return total


class Recorder:
    """Watches the tier: commits (chunk, visible from), GC deletions and lookups
    (chunk found at time), in the order the simulation makes them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, int, float]] = []
        Tier = tier_mod.Tier
        orig_offer: Callable[..., None] = Tier.offer
        orig_gc: Callable[..., None] = Tier.gc
        orig_lookup: Callable[..., int] = Tier.lookup
        log = self.log

        def offer(self: Any, ids: Sequence[int], finish: float, policy: Any) -> None:
            before = {c for c in ids if self.scheduled[c]}
            orig_offer(self, ids, finish, policy)
            log.extend(("commit", c, self.commit_t[c]) for c in ids
                       if c not in before and self.scheduled[c])

        def gc(self: Any, now: float) -> None:
            self.flush(now)  # what GC sees: everything committed by now
            before = set(self.stored)
            # s3kv gc's own selection over the whole inventory, every time: the
            # tier may skip a run only when this deletes nothing.
            expected = select_chain_deletions(
                {tier_mod.NAMESPACE: list(self.stored.values())},
                Policies(older_than_s=self.cfg.ttl_s, max_bytes=self.cfg.max_bytes), now)
            orig_gc(self, now)
            deleted = before - set(self.stored)
            assert {self.table.ids[c] for c in deleted} == {cid for _, cid in expected}
            log.extend(("delete", c, now) for c in deleted)

        def lookup(self: Any, ids: Sequence[int], start: int, limit: int, now: float) -> int:
            found: int = orig_lookup(self, ids, start, limit, now)
            log.extend(("found", c, now) for c in ids[start:start + found])
            return found

        monkeypatch.setattr(Tier, "offer", offer)
        monkeypatch.setattr(Tier, "gc", gc)
        monkeypatch.setattr(Tier, "lookup", lookup)

    def check_visibility(self) -> int:
        """Every chunk a lookup found was committed at or before that moment and not
        deleted since; returns how many were found."""
        visible_from: dict[int, float] = {}
        found = 0
        for kind, c, t in self.log:
            if kind == "commit":
                assert c not in visible_from, "a committed chunk was saved again"
                visible_from[c] = t
            elif kind == "delete":
                assert visible_from.pop(c) <= t
            else:
                assert c in visible_from and visible_from[c] <= t, (c, t)
                found += 1
        return found


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trace=traces(), cfg=configs)
def test_properties(trace: Trace, cfg: FleetConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    r = replay(trace, cfg)
    assert r.local_hit_tokens + r.s3_hit_tokens + r.computed_tokens == trace.input_tokens
    assert min(r.local_hit_tokens, r.s3_hit_tokens, r.computed_tokens) >= 0
    assert r.local_hit_tokens + r.s3_hit_tokens <= chunk_rule_bound(trace, cfg.chunk_tokens)
    assert r.s3_hit_tokens + r.s3_skipped_tokens <= rec.check_visibility() * cfg.chunk_tokens
    if not cfg.s3:
        assert r.s3_hit_tokens == r.s3_skipped_tokens == 0
        assert r.s3_requests == dict.fromkeys(tier_mod.KINDS, 0)
    if cfg.max_bytes is not None and cfg.s3:
        assert all(b <= cfg.max_bytes for _, b in r.bytes_stored_series)
    assert r.ttft_p50_s <= r.ttft_p99_s
    assert json.loads(json.dumps(r.to_json(), allow_nan=False))["requests"] == len(trace.requests)
