"""Chunks that lose their objects are saved again; a 404 on a load costs one request.

One real engine, through the fault proxy to moto. Prompt p is computed and
saved, then loaded from the cache (its manifests now sit in the engine's
manifest cache). While the engine waits on another request, p's objects are
deleted as the GC would delete them (manifests first, then shards). The next
request for p is offered p's chunks from the manifest cache, its loads get
404s, and vLLM recomputes. The cache must stay on (a 404 is an answer, not an
outage), p's recomputed chunks must be committed again, and every output must
equal an engine's without the connector.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from devtools.fault_proxy import FaultProxy, Hold
from s3kv.keys import KeyLayout, chain_chunk_ids
from tests.s3server import S3Endpoint
from tests.vllm.harness import (
    CHUNK,
    bucket_keys,
    distinct_prompts,
    expected_hit_tokens,
    job,
    run_engine,
    start_engine,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def manifest_path(ids: list[str]) -> str:
    return rf"/({'|'.join(re.escape(c) for c in ids)})/manifest\.json$"


def test_gc_deleted_chunks_are_saved_again_and_a_404_load_keeps_the_cache_on(
    tiny_model: Path, fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str,
) -> None:
    p, q = distinct_prompts(60, 2, chunks=2, tail=40)
    pid, qid = chain_chunk_ids(p, CHUNK), chain_chunk_ids(q, CHUNK)
    batches = [[p], [p], [q], [p], [q]]
    base = run_engine(job(tiny_model, [], batches=batches)).outputs
    fault_proxy.clear()
    # The second ask for p (and for q) waits until the first one's chunks are
    # committed, so it is a hit, never a race with the commit.
    p_committed = fault_proxy.trigger("PUT", manifest_path(pid), nth=len(pid), answered=True)
    q_committed = fault_proxy.trigger("PUT", manifest_path(qid), nth=len(qid), answered=True)
    fault_proxy.add("GET", manifest_path(pid[:1]), Hold(p_committed.event), nth=2)
    fault_proxy.add("GET", manifest_path(qid[:1]), Hold(q_committed.event), nth=2)
    # q's first lookup waits while p's objects are deleted.
    deleted = threading.Event()
    fault_proxy.add("GET", manifest_path(qid[:1]), Hold(deleted), nth=1)
    conn = {"bucket": fault_bucket, "endpoint_url": fault_proxy.url}
    eng = start_engine(job(tiny_model, [], conn, batches=batches, prefix_caching=False))
    try:
        assert fault_proxy.wait_for_requests(1, "GET", manifest_path(qid[:1]), timeout=300)
        s3 = moto_endpoint.client()
        layout = KeyLayout("s3kv")
        keys = bucket_keys(s3, fault_bucket)
        manifests = [k for k in keys if layout.parse(k) is not None
                     and k.endswith("/manifest.json") and any(f"/{c}/" in k for c in pid)]
        assert len(manifests) == len(pid)
        shards = [k for k in keys if any(f"/{c}/" in k for c in pid) and k not in manifests]
        assert shards
        for batch in (manifests, shards):  # as the GC does: manifests first
            s3.delete_objects(Bucket=fault_bucket,
                              Delete={"Objects": [{"Key": k} for k in batch]})
        deleted.set()
        res = eng.wait(timeout=300)
    finally:
        deleted.set()
        eng.kill_all()
    assert res.outputs == base
    c = res.counters
    assert c.get("breaker_opens", 0) == 0, "a 404 on a load turned the cache off"
    assert c.get("failed_loads", 0) == 1 and c.get("workers.load_failures", 0) >= 1
    hit = expected_hit_tokens(len(p), len(pid))
    assert c.get("hit_tokens", 0) == 2 * hit + expected_hit_tokens(len(q), len(qid))
    # p's chunks, recomputed after the failed load, are committed again.
    assert c.get("workers.chunks_committed", 0) == 2 * len(pid) + len(qid)
    keys = bucket_keys(moto_endpoint.client(), fault_bucket)
    assert all(any(k.endswith(f"/{cid}/manifest.json") for k in keys) for cid in pid)
