"""A hit's chunks land in their own blocks, whatever happens while its lookup waits.

Two ways a lookup's answer once went into the wrong blocks (valid, checksummed
chunks, so nothing flagged them; the output was simply wrong), each made
deterministic with the fault proxy:

1. The local prefix-cache hit grows while the lookup is pending: another
   request with the same prefix loads it and vLLM caches those blocks, so
   vLLM asks again with more tokens computed locally. The answer used to be
   aligned to the first ask and chunk 0's KV went into chunk 3's blocks.
2. A chunk is marked bad (its load failed verification) while another
   request's lookup is pending. The answer used to skip the bad chunk and
   shift every later chunk one place down.

Both now answer for the candidates of the current ask, matched by chunk id,
ending at the first bad or unknown chunk.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from devtools.fault_proxy import Delay, FaultProxy, FlipBytes
from s3kv.keys import chain_chunk_ids
from tests.s3server import S3Endpoint
from tests.vllm.harness import CHUNK, bucket_keys, job, run_engine

_rng = random.Random(20)
P = [_rng.randrange(3, 1000) for _ in range(3 * CHUNK)]
A = P + [_rng.randrange(3, 1000) for _ in range(400)]  # 4 full chunks and a tail
B = P + [_rng.randrange(3, 1000) for _ in range(100)]  # A's first 3 chunks
A2 = A[: 4 * CHUNK] + [_rng.randrange(3, 1000) for _ in range(150)]  # A's 4 chunks
IDS = chain_chunk_ids(A, CHUNK)
BATCHES = [[B, A], [A, A2]]


@pytest.fixture(scope="module")
def written(tiny_model: Path, s3_endpoint: S3Endpoint) -> str:
    """A bucket holding A's four committed chunks."""
    bucket = s3_endpoint.new_bucket("align")
    res = run_engine(job(tiny_model, [A], {"bucket": bucket, "endpoint_url": s3_endpoint.url}))
    assert res.counters["workers.chunks_committed"] == 4
    return bucket


@pytest.fixture(scope="module")
def baseline(tiny_model: Path) -> list[list[list[int]]]:
    """Greedy outputs of an engine without the connector, per batch."""
    outs = run_engine(job(tiny_model, [], batches=BATCHES)).outputs
    return [outs[:2], outs[2:]]


def _copy(s3: Any, src: str, dst: str) -> None:
    for key in bucket_keys(s3, src):
        s3.copy_object(Bucket=dst, Key=key, CopySource={"Bucket": src, "Key": key})


def _reader(tiny_model: Path, proxy: FaultProxy, bucket: str, batch: list[list[int]],
            **extra: Any) -> Any:
    # No hedged reads: a hedge of the delayed manifest GET would answer the
    # lookup at once, and the interleavings below need it to wait.
    return run_engine(job(tiny_model, batch, {"bucket": bucket, "endpoint_url": proxy.url,
                                              "hedge_reads": False}, **extra))


def test_local_hit_growing_while_the_lookup_waits(
    tiny_model: Path, written: str, baseline: list[list[list[int]]], s3: Any,
    fault_proxy: FaultProxy, fault_bucket: str,
) -> None:
    """B loads A's first 3 chunks and vLLM caches them; A's lookup waits 3 s on
    its chunk 3, so vLLM asks again with 768 tokens computed locally. A must
    load exactly chunk 3 into chunk 3's blocks."""
    _copy(s3, written, fault_bucket)
    delayed = fault_proxy.add("GET", f"{IDS[3]}/manifest", Delay(ms=3000))
    res = _reader(tiny_model, fault_proxy, fault_bucket, BATCHES[0], prefix_caching=True)
    assert delayed.matched == 1  # the scenario happened: A's lookup waited on chunk 3
    assert res.outputs == baseline[0]
    c = res.counters
    assert c.get("hit_misalignments", 0) == 0
    # B: 3 chunks (768 tokens); A: 768 tokens from vLLM's own cache, then chunk 3.
    assert (c["hit_chunks"], c["hit_tokens"]) == (4, 3 * CHUNK + CHUNK)
    assert c.get("workers.load_failures", 0) == 0


def test_chunk_marked_bad_while_the_lookup_waits(
    tiny_model: Path, written: str, baseline: list[list[list[int]]], s3: Any,
    fault_proxy: FaultProxy, fault_bucket: str,
) -> None:
    """Two requests share A's 4 chunks (no local prefix cache). One lookup
    answers at once and its load of chunk 1 fails verification (a flipped
    byte): chunk 1 is marked bad. The other lookup waits 3 s on chunk 3; its
    answer must end before chunk 1, never skip it."""
    _copy(s3, written, fault_bucket)
    delayed = fault_proxy.add("GET", f"{IDS[3]}/manifest", Delay(ms=3000), nth=2)
    flipped = fault_proxy.add("GET", f"{IDS[1]}/tp", FlipBytes())
    res = _reader(tiny_model, fault_proxy, fault_bucket, BATCHES[1], prefix_caching=False)
    assert delayed.matched >= 2 and flipped.matched >= 1
    assert res.outputs == baseline[1]
    c = res.counters
    assert c.get("hit_misalignments", 0) == 0
    assert c["failed_loads"] == 1
    # The first request: 4 chunks; the second: chunk 0 only (chunk 1 is bad).
    assert (c["hit_chunks"], c["hit_tokens"]) == (5, 4 * CHUNK + CHUNK)
