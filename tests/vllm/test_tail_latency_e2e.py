"""A store that is slow but healthy keeps the cache on (real engines, default deadlines).

A TP=1 writer stores a few prompts. Fresh readers, at TP=1 and TP=2, then ask
for them (and for longer prompts that start with them) through the fault
proxy, with the connector's default deadlines and seeded random delays on
*every* request they make, start-up request included:

* 20% of requests answered 250 ms late;
* every request answered 150 ms late.

Each reader must hit at least 90% of the tokens a healthy store gives
(``expected_hit_tokens``: exactly what the other end-to-end tests assert on a
healthy store), keep its outputs equal to an engine without the connector,
and never turn the cache off: a late answer costs one request at most.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from devtools.fault_proxy import Delay, FaultProxy
from s3kv.config import Settings
from s3kv.keys import chain_chunk_ids
from tests.s3server import S3Endpoint
from tests.vllm.harness import CHUNK, TMP, distinct_prompts, expected_hit_tokens, job, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)
            if f.name in ("min_lookup_wait_s", "min_load_wait_s")}
WRITTEN = distinct_prompts(41, 4, chunks=4, tail=70)


def reads(seed: int) -> list[list[int]]:
    """One request per batch, as users arrive: the writer's prompts, and longer
    ones that start with them (their own tails are new to every reader, so one
    reader's saves never add to another's hits). The first can only hit the
    writer's chunks. Twenty-four requests: an engine's very first lookups know
    the store's latency only from its start-up read, and a tail it has not
    seen yet may cost one of them, as a late load may cost another (a late
    answer costs one request; see docs/faults.md)."""
    extra = distinct_prompts(seed, 12, chunks=2, tail=30)
    w = WRITTEN
    out: list[list[int]] = []
    for i in range(12):
        out += [w[i % 4], w[(i + 1) % 4] + extra[i]]
    return out


# name: (delay in ms, share of requests delayed; None: all)
PROFILES: dict[str, tuple[int, float | None]] = {
    "20% of requests 250 ms late": (250, 0.2), "every request 150 ms late": (150, None)}


def healthy_hits(prompts: list[list[int]]) -> int:
    written = {c for p in WRITTEN for c in chain_chunk_ids(p, CHUNK)}
    total = 0
    for p in prompts:
        ids = chain_chunk_ids(p, CHUNK)
        n = next((i for i, c in enumerate(ids) if c not in written), len(ids))
        total += expected_hit_tokens(len(p), n)
    return total


@pytest.fixture(scope="module")
def written(tiny_model: Path, moto_endpoint: S3Endpoint) -> str:
    """The writer's chunks, stored straight to the server; the bucket's name."""
    bucket = moto_endpoint.new_bucket("tail")
    wrote = run_engine(job(tiny_model, WRITTEN, {"bucket": bucket,
                                                 "endpoint_url": moto_endpoint.url}))
    assert wrote.counters.get("workers.chunks_committed", 0) == 16
    return bucket


@pytest.mark.parametrize("tp", [1, 2])
def test_slow_but_healthy_store_keeps_hitting(
    tp: int, tiny_model: Path, fault_proxy: FaultProxy, written: str,
) -> None:
    conn = {"bucket": written, "endpoint_url": fault_proxy.url, **DEFAULTS}
    batches = {name: [[p] for p in reads(100 + 10 * tp + i)]
               for i, name in enumerate(PROFILES)}
    # An engine without the connector answers every run's prompts.
    base = run_engine(job(tiny_model, [], batches=[b for name in PROFILES
                                                   for b in batches[name]], tp=tp)).outputs
    report_file = TMP / "tail-latency-e2e.json"
    report: dict[str, Any] = json.loads(report_file.read_text()) if tp == 2 and \
        report_file.exists() else {}
    for k, (name, (ms, share)) in enumerate(PROFILES.items()):
        want = healthy_hits([b[0] for b in batches[name]])
        fault_proxy.clear()
        fault_proxy.add(None, "", Delay(ms=ms), probability=share, seed=tp)
        res = run_engine(job(tiny_model, [], conn, batches=batches[name], tp=tp,
                             warmup=True, prefix_caching=False))
        fault_proxy.clear()
        c = res.counters
        row = {key: c.get(key, 0) for key in (
            "hit_tokens", "lookups", "lookup_deadline_misses", "lookups_truncated",
            "breaker_opens", "hedged_gets", "hedge_wins", "failed_loads",
            "workers.load_deadline_misses", "workers.chunks_committed")}
        row["healthy_hit_tokens"] = want
        row["ratio"] = round(row["hit_tokens"] / want, 3)
        report[f"tp{tp} {name}"] = row
        report_file.write_text(json.dumps(report, indent=1))
        assert c.get("breaker_opens", 0) == 0, f"TP={tp} {name}: the cache turned off"
        # Offered and loaded: a load abandoned at its deadline is recomputed.
        loaded = c.get("workers.loaded_chunks", 0) / tp * CHUNK
        row["loaded_tokens"] = loaded
        report_file.write_text(json.dumps(report, indent=1))
        assert c.get("hit_tokens", 0) >= 0.9 * want, f"TP={tp} {name}: {row}"
        assert loaded >= 0.9 * want, f"TP={tp} {name}: {row}"
        n = len(res.outputs)
        assert res.outputs == base[k * n:(k + 1) * n], f"TP={tp} {name}: wrong outputs"
