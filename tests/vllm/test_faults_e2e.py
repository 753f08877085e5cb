"""Faults at the engine level: real vLLM engines talking to moto through the
fault-injecting proxy.

Every scenario asserts the same three things: zero wrong tokens (greedy
output equal to an engine without the connector, batch for batch), zero
committed chunks lost (every manifest PUT the server acknowledged is still
readable and verifies), and zero half-written chunks ever read (every
manifest in the bucket names shards that all exist and verify, and a later
engine hits exactly the committed chunks).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import psutil
import pytest

from devtools.fault_proxy import (
    Blackhole,
    Delay,
    Drop,
    Error,
    FaultProxy,
    FlipBytes,
    Hold,
    InternalError,
    SlowDown,
    Truncate,
)
from s3kv.keys import KeyLayout, chain_chunk_ids
from s3kv.manifest import MAX_MANIFEST_BYTES
from tests.s3server import S3Endpoint
from tests.vllm.harness import (
    CHUNK,
    audit,
    bucket_keys,
    committed_prefix,
    distinct_prompts,
    expected_hit_tokens,
    job,
    run_engine,
    start_engine,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
LAYOUT = KeyLayout("s3kv")
# Short enough that a dead server costs seconds, long enough for a loaded CI box.
FAST = {"connect_timeout_s": 1.0, "request_timeout_s": 3.0, "max_attempts": 2,
        "max_cache_wait_s": 5.0, "commit_timeout_s": 20.0}


def ids_of(prompts: list[list[int]]) -> list[str]:
    return [c for p in prompts for c in chain_chunk_ids(p, CHUNK)]


def any_of(ids: list[str]) -> str:
    return "(" + "|".join(re.escape(c) for c in ids) + ")"


def acknowledged_manifests(proxy: FaultProxy) -> set[str]:
    """Chunks whose manifest PUT the server answered with success."""
    return {
        r.target.split("?", 1)[0].rsplit("/", 2)[-2] for r in proxy.requests
        if r.method == "PUT" and r.target.split("?", 1)[0].endswith("/manifest.json")
        and r.status == 200 and r.fault is None
    }


def expect_hits(batches: list[list[list[int]]], committed: set[str]) -> int:
    return sum(expected_hit_tokens(len(p), committed_prefix(p, committed))
               for batch in batches for p in batch)


def check_bucket(moto_endpoint: S3Endpoint, bucket: str, proxy: FaultProxy) -> set[str]:
    """Every manifest verifies, none acknowledged was lost; returns the committed set."""
    found = audit(moto_endpoint.url, bucket)
    bad = {c: v for c, v in found.items() if v != "ok"}
    assert not bad, f"half-written or corrupt chunks committed: {bad}"
    lost = acknowledged_manifests(proxy) - set(found)
    assert not lost, f"acknowledged commits lost: {lost}"
    return set(found)


def via(proxy: FaultProxy, bucket: str, **overrides: Any) -> dict[str, Any]:
    """Connector settings that reach the bucket through the proxy, fast timeouts."""
    return {"bucket": bucket, "endpoint_url": proxy.url, **FAST, **overrides}


def warm_check(tiny_model: Path, batches: list[list[list[int]]], base: list[list[int]],
               committed: set[str], bucket: str, endpoint: str, **extra: Any) -> None:
    """A fresh engine, straight to the server: right tokens, exactly the committed hits."""
    warm = run_engine(job(tiny_model, [], {"bucket": bucket, "endpoint_url": endpoint},
                          batches=batches, prefix_caching=False, **extra))
    assert warm.outputs == base
    assert warm.counters.get("hit_tokens", 0) == expect_hits(batches, committed)
    assert warm.counters.get("workers.load_failures", 0) == 0


# --- S3 going away ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["refused", "hung"])
def test_s3_dies_in_the_middle_of_a_run(
    how: str, tiny_model: Path, fault_proxy: FaultProxy, moto_endpoint: S3Endpoint,
    fault_bucket: str,
) -> None:
    a, b = distinct_prompts(10, 2), distinct_prompts(11, 2)
    batches = [a, b, a]
    base = run_engine(job(tiny_model, [], batches=batches)).outputs
    # S3 dies the moment the server has acknowledged every manifest of batch a
    # (so there is something committed to lose). a's manifest PUTs are slowed
    # so that batch b's requests arrive while they are in flight; those are held
    # until a is committed, so none of b can be committed before S3 is gone.
    a_manifests = rf"/{any_of(ids_of(a))}/manifest\.json$"
    a_committed = fault_proxy.trigger("PUT", a_manifests, nth=len(ids_of(a)), answered=True)
    fault_proxy.add(None, "", Drop(reset=True) if how == "refused" else Blackhole(),
                    when=a_committed)
    fault_proxy.add("PUT", a_manifests, Delay(ms=1500), times=len(ids_of(a)))
    held = fault_proxy.add(None, any_of(ids_of(b)), Hold(a_committed.event))
    conn = via(fault_proxy, fault_bucket)
    res = run_engine(job(tiny_model, [], conn, batches=batches, prefix_caching=False))
    assert res.outputs == base
    assert a_committed.fired and held.injected >= 1 and fault_proxy.faults > 1
    assert "serving without the cache" in res.stderr
    c = res.counters
    assert (c.get("lookup_errors", 0) + c.get("lookup_deadline_misses", 0)
            + c.get("lookups_skipped_store_down", 0)) >= len(a)  # the second pass over a
    assert c.get("workers.chunks_committed", 0) == len(ids_of(a))
    committed = check_bucket(moto_endpoint, fault_bucket, fault_proxy)
    assert committed == set(ids_of(a))
    warm_check(tiny_model, batches, base, committed, fault_bucket, moto_endpoint.url)


def test_slowdown_storm(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str,
) -> None:
    storm = fault_proxy.add(None, "", SlowDown(), probability=0.5, seed=7)
    conn = via(fault_proxy, fault_bucket, max_attempts=3)
    cold = run_engine(job(tiny_model, prompts, conn))
    assert cold.outputs == baseline_tp1
    committed = check_bucket(moto_endpoint, fault_bucket, fault_proxy)
    warm = run_engine(job(tiny_model, prompts, conn, prefix_caching=False))
    assert warm.outputs == baseline_tp1
    assert storm.injected >= 5
    # Under the storm a lookup may give up early (a miss), never hit beyond the commits.
    assert warm.counters.get("hit_tokens", 0) <= expect_hits([prompts], committed)
    assert check_bucket(moto_endpoint, fault_bucket, fault_proxy) >= committed


# --- one rank's uploads --------------------------------------------------------------


def test_tp2_rank_uploads_fail_after_retries(
    tiny_model: Path, prompts: list[list[int]], baseline_tp2: list[list[int]],
    fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str,
) -> None:
    base = baseline_tp2
    failing = fault_proxy.add("PUT", r"/r1$", InternalError())
    conn = via(fault_proxy, fault_bucket)
    res = run_engine(job(tiny_model, prompts, conn, tp=2))
    assert res.outputs == base
    unique = set(ids_of(prompts))
    assert failing.injected >= len(unique)  # every chunk, after its retries
    assert res.counters["workers.upload_failures"] >= len(unique)
    assert res.counters.get("workers.chunks_committed", 0) == 0
    assert check_bucket(moto_endpoint, fault_bucket, fault_proxy) == set()
    # rank 0's shards are stored but never named: orphans for GC, never read.
    # Every chunk at least once; a chunk computed again after its failed save
    # was reported is saved again (a new round, new keys).
    stored = bucket_keys(moto_endpoint.client(), fault_bucket)
    assert sum(k.endswith("/r0") for k in stored) >= len(unique)
    assert {k.split("/")[-3] for k in stored if k.endswith("/r0")} == unique
    warm_check(tiny_model, [prompts], base, set(), fault_bucket, moto_endpoint.url, tp=2)


def _worker_process(engine_pid: int, tp_rank: int) -> psutil.Process:
    for child in psutil.Process(engine_pid).children(recursive=True):
        try:
            if any(f"Worker_TP{tp_rank}" in part for part in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no vLLM worker process for TP rank {tp_rank}")


def test_tp2_rank_dies_mid_upload(
    tiny_model: Path, fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str,
) -> None:
    a, b = distinct_prompts(20, 1), distinct_prompts(21, 1)
    batches = [a, b]
    base = run_engine(job(tiny_model, [], batches=batches, tp=2)).outputs
    b_r1 = rf"/{any_of(ids_of(b))}/[^/]+/r1$"
    b_r0 = rf"/{any_of(ids_of(b))}/[^/]+/r0$"
    fault_proxy.add("PUT", b_r1, Blackhole())  # rank 1's uploads of b never finish...
    conn = via(fault_proxy, fault_bucket, request_timeout_s=60.0)
    eng = start_engine(job(tiny_model, [], conn, batches=batches, tp=2))
    try:
        assert fault_proxy.wait_for_requests(1, "PUT", b_r1, timeout=300), "rank 1 never uploaded b"
        assert fault_proxy.wait_for_requests(len(ids_of(b)), "PUT", b_r0, timeout=60)
        assert fault_proxy.wait_for_requests(len(ids_of(a)), "PUT", r"/manifest\.json$", timeout=60)
        _worker_process(eng.pid, 1).kill()  # ...because rank 1 dies while they are in flight
        res = eng.wait(timeout=240, expect_ok=False)
    finally:
        eng.kill_all()
    assert res.returncode != 0 or res.outputs == base  # the engine may or may not survive it
    committed = check_bucket(moto_endpoint, fault_bucket, fault_proxy)
    assert committed == set(ids_of(a))  # nothing of b: rank 1's shards never landed
    stored = bucket_keys(moto_endpoint.client(), fault_bucket)
    assert all(any(k.endswith("/r0") and f"/{c}/" in k for k in stored) for c in ids_of(b))
    warm_check(tiny_model, batches, base, committed, fault_bucket, moto_endpoint.url, tp=2)


# --- writers racing -------------------------------------------------------------------


def test_two_engines_write_the_same_prefix_at_once(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str,
) -> None:
    unique = len(set(ids_of(prompts)))
    # No manifest lands until both engines have uploaded every chunk: both
    # miss, both save, and the two commits of every chunk truly race.
    both = fault_proxy.trigger("PUT", r"/r0$", nth=2 * unique)
    fault_proxy.add("PUT", r"/manifest\.json$", Hold(both.event))
    conn = via(fault_proxy, fault_bucket, request_timeout_s=120.0, commit_timeout_s=120.0)
    engines = [start_engine(job(tiny_model, prompts, conn)) for _ in range(2)]
    results = [e.wait() for e in engines]
    assert [r.outputs for r in results] == [baseline_tp1, baseline_tp1]
    won = sum(r.counters.get("workers.chunks_committed", 0) for r in results)
    lost = sum(r.counters.get("workers.chunks_already_committed", 0) for r in results)
    assert (won, lost) == (unique, unique)
    committed = check_bucket(moto_endpoint, fault_bucket, fault_proxy)
    assert committed == set(ids_of(prompts))
    warm_check(tiny_model, [prompts], baseline_tp1, committed, fault_bucket, moto_endpoint.url)


# --- the upload queue ---------------------------------------------------------------------


def test_upload_queue_full_drops_saves_and_serves(
    tiny_model: Path, fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str,
) -> None:
    d = distinct_prompts(30, 4)  # each: two chunks of 0.5 MiB on the tiny model
    # d1 comes back once the queue has room: its dropped save is planned again.
    batches = [[p] for p in d] + [[d[1]]]
    base = run_engine(job(tiny_model, [], batches=batches)).outputs
    # The server accepts d0's shards but answers only once batch d3 begins;
    # meanwhile the 2 MiB upload budget is full and d1, d2 must be dropped.
    d3_lookup = fault_proxy.trigger(None, re.escape(ids_of([d[3]])[0]))
    fault_proxy.add("PUT", rf"/{any_of(ids_of([d[0]]))}/[^/]+/r0$", Hold(d3_lookup.event))
    conn = via(fault_proxy, fault_bucket, request_timeout_s=120.0, max_inflight_mib=2)
    res = run_engine(job(tiny_model, [], conn, batches=batches, prefix_caching=False))
    assert res.outputs == base
    assert res.counters["workers.saves_dropped"] >= 4
    assert res.counters.get("save_plans_failed", 0) >= 4
    committed = check_bucket(moto_endpoint, fault_bucket, fault_proxy)
    assert set(ids_of([d[0], d[1]])) <= committed
    assert not committed & set(ids_of([d[2]]))
    warm_check(tiny_model, batches, base, committed, fault_bucket, moto_endpoint.url)


# --- bytes and manifests that lie --------------------------------------------------------


def test_shard_bytes_damaged_in_transit_recompute(
    tiny_model: Path, fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str,
) -> None:
    d = distinct_prompts(40, 3)
    base = run_engine(job(tiny_model, d)).outputs
    run_engine(job(tiny_model, d, {"bucket": fault_bucket, "endpoint_url": moto_endpoint.url}))
    flip = fault_proxy.add("GET", rf"/{re.escape(ids_of([d[0]])[0])}/[^/]+/r0$", FlipBytes())
    cut = fault_proxy.add("GET", rf"/{re.escape(ids_of([d[1]])[0])}/[^/]+/r0$", Truncate())
    conn = via(fault_proxy, fault_bucket, max_attempts=1)
    warm = run_engine(job(tiny_model, d, conn, prefix_caching=False))
    assert warm.outputs == base
    assert flip.injected >= 1 and cut.injected >= 1
    assert warm.counters["workers.load_failures"] >= 2
    assert warm.counters["failed_loads"] >= 2
    assert warm.counters["workers.loaded_chunks"] >= len(ids_of([d[2]]))  # d2 untouched


def _tamper(kind: str, body: bytes, other_cid: str, s3: Any, bucket: str) -> bytes:
    doc = json.loads(body)
    if kind == "truncated":
        return body[: len(body) // 2]
    if kind == "oversized":
        return body + b" " * MAX_MANIFEST_BYTES
    if kind == "not_json":
        return b"\x89PNG\r\n\x1a\n not a manifest"
    if kind == "other_namespace":
        # self-consistent, but written for another model or layout
        mine, other = doc["namespace"], "f" * 32
        doc["namespace"] = other
        for s in doc["shards"]:
            s["key"] = s["key"].replace(f"s3kv/{mine}/", f"s3kv/{other}/", 1)
        return json.dumps(doc).encode()
    if kind == "other_chunk":
        # a well-formed, verifiable manifest, but of another chunk
        theirs: bytes = s3.get_object(
            Bucket=bucket, Key=LAYOUT.manifest(doc["namespace"], other_cid))["Body"].read()
        return theirs
    if kind == "key_outside_prefix":
        for s in doc["shards"]:
            outside = "elsewhere/" + s["key"]
            s3.copy_object(Bucket=bucket, Key=outside,
                           CopySource={"Bucket": bucket, "Key": s["key"]})
            s["key"] = outside  # same bytes, same checksums, wrong place
        return json.dumps(doc).encode()
    raise ValueError(kind)


TAMPERINGS = ("truncated", "oversized", "not_json", "other_namespace", "other_chunk",
              "key_outside_prefix")


def test_tampered_manifests_are_misses(
    tiny_model: Path, fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str,
) -> None:
    d = distinct_prompts(50, len(TAMPERINGS) + 1)
    base = run_engine(job(tiny_model, d)).outputs
    direct = {"bucket": fault_bucket, "endpoint_url": moto_endpoint.url}
    cold = run_engine(job(tiny_model, d, direct))
    ns = cold.namespace
    assert ns is not None
    s3 = moto_endpoint.client()
    for kind, p in zip(TAMPERINGS, d, strict=False):
        first, second = chain_chunk_ids(p, CHUNK)[:2]
        key = LAYOUT.manifest(ns, first)
        body = s3.get_object(Bucket=fault_bucket, Key=key)["Body"].read()
        s3.put_object(Bucket=fault_bucket, Key=key,
                      Body=_tamper(kind, body, second, s3, fault_bucket))
    conn = via(fault_proxy, fault_bucket)
    warm = run_engine(job(tiny_model, d, conn, prefix_caching=False))
    assert warm.outputs == base
    # only the untouched last prompt hits; every tampered one is a plain miss
    assert warm.counters.get("hit_tokens", 0) == expected_hit_tokens(len(d[-1]))
    assert warm.counters.get("workers.load_failures", 0) == 0
    assert warm.stderr.count("ignoring invalid manifest") >= len(TAMPERINGS)
    outside = [r.target for r in fault_proxy.requests
               if r.method == "GET" and not r.target.startswith(f"/{fault_bucket}/s3kv/")]
    assert outside == [], "a reader fetched a key outside its prefix"


# --- credentials -----------------------------------------------------------------------------

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSecretNeverLogged"


def test_wrong_credentials_serve_without_cache_and_never_log_the_secret(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    s3_endpoint: S3Endpoint, bucket: str, moto_endpoint: S3Endpoint,
) -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_SESSION_TOKEN": None, "VLLM_LOGGING_LEVEL": "DEBUG"}
    proxy = None
    endpoint = s3_endpoint.url
    if s3_endpoint.kind == "moto":
        # moto accepts any keys: the proxy answers as AWS does for an unknown key
        proxy = FaultProxy(moto_endpoint.url).start()
        proxy.add(None, "", Error(403, "InvalidAccessKeyId",
                                  "The AWS Access Key Id you provided does not exist in our "
                                  "records."))
        endpoint = proxy.url
    try:
        res = run_engine(job(tiny_model, prompts, {"bucket": bucket, "endpoint_url": endpoint,
                                                   **FAST}), env_update=env)
    finally:
        if proxy is not None:
            proxy.stop()
    assert res.outputs == baseline_tp1
    assert res.counters.get("hit_tokens", 0) == 0
    assert "refused this engine's credentials" in res.stderr
    assert "serving without the cache" in res.stderr
    assert SECRET not in res.stderr
    assert SECRET.split("/")[-1] not in res.stderr
