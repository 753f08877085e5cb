"""Waiting for the cache never costs more than recomputing would (real engines).

Real vLLM engines (TP=2, then TP=1) talk to moto through the fault proxy,
with the connector's default deadlines. Every prompt is its own request,
measured alone (time to first token), and the same requests run on an
engine without the connector at the same TP size. Faults per prompt:

* blackholed: the server accepts the connection and never answers;
* delayed: every answer comes 3 s late;
* SlowDown: every request is refused with 503 SlowDown;
* then everything blackholed, probes included.

The probe interval is short here so that the breaker closes between
prompts and every faulted prompt pays its full lookup deadline (with a
store that stays down, only the first request would pay it). A TP=1 writer
first stores a few healthy prompts, which the TP=1 engine must then hit with
the default deadlines: no false deadline misses on a healthy store. (The
writer runs with the generous floors of the other end-to-end tests: its
own lookups are cold misses, and a false deadline miss there would only
switch its saves off and leave the reader nothing to find.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from devtools.fault_proxy import Blackhole, Delay, FaultProxy, SlowDown
from s3kv.config import Settings
from tests.s3server import S3Endpoint
from tests.vllm.harness import TMP, expected_hit_tokens, job, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)
            if f.name in ("min_lookup_wait_s", "min_load_wait_s")}
ABS_SLACK_S, REL_SLACK = 0.2, 1.1  # the bound: +200 ms or +10%, whichever is larger


def bound(base: float) -> float:
    return max(REL_SLACK * base, base + ABS_SLACK_S)


def chunk_ids(prompts: list[list[int]]) -> list[str]:
    from s3kv.keys import chain_chunk_ids

    return [c for p in prompts for c in chain_chunk_ids(p, 256)]


def any_of(prompts: list[list[int]]) -> str:
    return "(" + "|".join(re.escape(c) for c in chunk_ids(prompts)) + ")"


def distinct(seed: int, n: int, chunks: int, tail: int = 70) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(chunks * 256 + tail)] for _ in range(n)]


HEALTHY = distinct(30, 2, chunks=3)
BLACKHOLED, DELAYED, REFUSED = distinct(31, 2, 4), distinct(32, 2, 4), distinct(33, 2, 4)
ALL_DOWN = distinct(34, 2, 4)
FAULTED = [("blackholed", BLACKHOLED), ("delayed 3 s", DELAYED), ("SlowDown", REFUSED),
           ("everything blackholed", ALL_DOWN)]
FAULTED_BATCHES = [[p] for _, ps in FAULTED for p in ps]


def arm(proxy: FaultProxy) -> None:
    proxy.clear()
    proxy.add(None, any_of(BLACKHOLED), Blackhole())
    proxy.add(None, any_of(DELAYED), Delay(ms=3000))
    proxy.add(None, any_of(REFUSED), SlowDown())
    down = proxy.trigger("GET", any_of(ALL_DOWN[:1]))
    proxy.add(None, "", Blackhole(), when=down)


def run_pair(model: Path, tp: int, conn: dict[str, Any],
             batches: list[list[list[int]]]) -> tuple[Any, Any]:
    base = run_engine(job(model, [], batches=batches, tp=tp, ttft=True, warmup=True))
    res = run_engine(job(model, [], conn, batches=batches, tp=tp, ttft=True, warmup=True,
                         prefix_caching=False))
    return base, res


def test_stalled_s3_costs_no_more_than_recompute(
    tiny_model: Path, fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str,
) -> None:
    conn = {"bucket": fault_bucket, "endpoint_url": fault_proxy.url,
            **DEFAULTS, "probe_interval_s": 0.05,
            "connect_timeout_s": 1.0, "request_timeout_s": 3.0, "max_attempts": 2,
            "commit_timeout_s": 10.0}
    report: dict[str, Any] = {"bound": f"max({REL_SLACK} x base, base + {ABS_SLACK_S} s)"}
    late: list[str] = []
    fault_proxy.clear()
    writer = {k: v for k, v in conn.items() if k not in DEFAULTS}
    wrote = run_engine(job(tiny_model, HEALTHY, writer))
    assert wrote.counters.get("workers.chunks_committed", 0) == len(chunk_ids(HEALTHY))
    for tp in (2, 1):
        arm(fault_proxy)
        healthy = HEALTHY if tp == 1 else []
        base, res = run_pair(tiny_model, tp, conn, [[p] for p in healthy] + FAULTED_BATCHES)
        c = res.counters
        rows = []
        i = len(healthy)
        for name, prompts in FAULTED:
            for _ in prompts:
                b, t = base.raw["ttft_seconds"][i], res.raw["ttft_seconds"][i]
                rows.append({"fault": name, "base_s": round(b, 4), "cache_s": round(t, 4),
                             "extra_s": round(t - b, 4)})
                if t > bound(b):
                    late.append(f"TP={tp} {name}: {t:.3f}s vs {b:.3f}s without the connector")
                i += 1
        report[f"tp{tp}"] = {"faulted": rows, "counters": {
            k: c.get(k, 0) for k in ("lookups", "lookup_deadline_misses", "lookups_truncated",
                                     "lookups_skipped_store_down", "breaker_opens",
                                     "breaker_probes", "saves_skipped_store_down",
                                     "hit_tokens", "workers.load_deadline_misses")}}
        (TMP / "deadlines-e2e.json").write_text(json.dumps(report, indent=1))
        assert res.outputs == base.outputs, f"TP={tp}: outputs differ from no connector"
        assert "serving without the cache" in res.stderr
        assert c.get("lookup_deadline_misses", 0) >= 1 and c.get("breaker_opens", 0) >= 1
        if tp == 1:
            # The writer stored the healthy prompts: hits, at the default deadlines.
            first = res.raw["first_pass_counters"]
            want = sum(expected_hit_tokens(len(p)) for p in HEALTHY)
            report["tp1"]["healthy"] = {
                "hit_tokens": first.get("hit_tokens", 0), "expected": want,
                "ttft_s": res.raw["ttft_seconds"][: len(HEALTHY)],
                "base_ttft_s": base.raw["ttft_seconds"][: len(HEALTHY)],
                "first_pass_counters": first}
            (TMP / "deadlines-e2e.json").write_text(json.dumps(report, indent=1))
            assert first.get("hit_tokens", 0) == want
            assert first.get("failed_loads", 0) == 0
    (TMP / "deadlines-e2e.json").write_text(json.dumps(report, indent=1))
    assert not late, "time to first token over the bound:\n" + "\n".join(late)
