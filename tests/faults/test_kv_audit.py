"""The soak's KV audit against a bucket a real engine wrote.

One TP=1 engine with the connector writes two prompts' chunks. The audit must
pass on that bucket as written (so it can fail only for a reason), and fail,
naming the chunk, once a chunk's payload is replaced by another chunk's KV
with header, checksums and manifest re-sealed, which s3kv's own verification
cannot notice (anyone with write access to the bucket can do it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the vLLM CPU build is installed by scripts/bootstrap.sh")

from devtools.tiny_model import TinyModelSpec, create_tiny_model
from s3kv.keys import KeyLayout, chain_chunk_ids
from s3kv.manifest import decode_manifest
from s3kv.shard import encode_header, parse_header, seal
from tests.faults.kv_audit import TOLERANCE, ReferenceModel, StoredChunk, audit_kv, read_bucket
from tests.s3server import S3Endpoint
from tests.vllm.harness import CHUNK, TMP, bucket_keys, distinct_prompts, job, run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@dataclass(frozen=True)
class Written:
    model: Path
    bucket: str
    prompts: list[list[int]]
    outputs: list[list[int]]
    sequences: list[list[int]]  # what the engine computed KV for


@pytest.fixture(scope="module")
def written(s3_endpoint: S3Endpoint) -> Written:
    model = create_tiny_model(TMP / "models" / "tiny", TinyModelSpec())
    prompts = distinct_prompts(seed=7, n=2, chunks=2, tail=50)
    bucket = s3_endpoint.new_bucket("kvaudit")
    res = run_engine(job(model, prompts, {"bucket": bucket, "endpoint_url": s3_endpoint.url}))
    return Written(model, bucket, prompts, res.outputs,
                   [p + out[:-1] for p, out in zip(prompts, res.outputs, strict=True)])


@pytest.fixture(scope="module")
def reference(written: Written) -> ReferenceModel:
    return ReferenceModel(written.model)


def _copy_bucket(s3: Any, src: str, dst: str) -> None:
    for key in bucket_keys(s3, src):
        s3.copy_object(Bucket=dst, Key=key, CopySource={"Bucket": src, "Key": key})


def _reseal_with_payload_of(s3: Any, bucket: str, victim: StoredChunk,
                            donor: StoredChunk) -> None:
    """Give ``victim`` the donor's KV: its own header, new checksums, a manifest
    naming them. Every check s3kv runs on a read passes afterwards."""
    layout = KeyLayout("s3kv")
    shards = []
    for entry, theirs in zip(victim.manifest.shards, donor.shards, strict=True):
        body = s3.get_object(Bucket=bucket, Key=entry.key)["Body"].read()
        spec, off = parse_header(body)
        forged = encode_header(spec) + theirs.payload
        if len(forged) != len(body) or forged[off:] == body[off:]:
            raise AssertionError("the donor's payload must differ and fit the victim's shard")
        s3.put_object(Bucket=bucket, Key=entry.key, Body=forged)
        shards.append(seal(forged, entry.key))
    forged_manifest = dataclasses.replace(victim.manifest, shards=tuple(shards))
    key = layout.manifest(victim.manifest.namespace, victim.manifest.chunk_id)
    s3.put_object(Bucket=bucket, Key=key, Body=forged_manifest.encode())
    decode_manifest(forged_manifest.encode(), layout=layout)  # well-formed, as a reader sees it


def test_audit_passes_on_the_bucket_as_written(written: Written, s3_endpoint: S3Endpoint,
                                               reference: ReferenceModel) -> None:
    stored = read_bucket(s3_endpoint.url, written.bucket)
    want = {cid for p in written.prompts for cid in chain_chunk_ids(p, CHUNK)}
    assert set(stored) == want, "the engine should have committed every full prompt chunk"
    report, passes = audit_kv(stored, written.sequences, reference, chunk_tokens=CHUNK,
                              logit_positions=8)
    assert report.broken == {} and report.unknown == []
    assert report.mismatched == {}
    assert report.audited == len(want) == 4
    assert 0.0 <= report.max_rel_diff < TOLERANCE / 100  # measured: about 1e-6
    # The reference's argmax at the last 8 positions is what the engine generated.
    assert [tokens[:, 0].tolist() for _, tokens in passes] == written.outputs


def test_audit_names_a_chunk_resealed_with_another_chunks_kv(
        written: Written, s3_endpoint: S3Endpoint, reference: ReferenceModel) -> None:
    s3 = s3_endpoint.client()
    bucket = s3_endpoint.new_bucket("kvswap")
    _copy_bucket(s3, written.bucket, bucket)
    victim = chain_chunk_ids(written.prompts[0], CHUNK)[1]
    donor = chain_chunk_ids(written.prompts[1], CHUNK)[1]  # same position, other tokens
    before = read_bucket(s3_endpoint.url, bucket)
    a, b = before[victim], before[donor]
    assert isinstance(a, StoredChunk) and isinstance(b, StoredChunk)
    _reseal_with_payload_of(s3, bucket, a, b)

    stored = read_bucket(s3_endpoint.url, bucket)
    assert isinstance(stored[victim], StoredChunk), f"s3kv rejects the forgery: {stored[victim]}"
    report, _ = audit_kv(stored, written.sequences, reference, chunk_tokens=CHUNK)
    assert list(report.mismatched) == [victim], json.dumps(report.mismatched)
    assert "differs from the reference" in report.mismatched[victim]
    # Far apart on both sides of the tolerance: order 1 for other tokens' KV.
    assert report.diffs[victim] > 100 * TOLERANCE
    assert max(d for c, d in report.diffs.items() if c != victim) < TOLERANCE / 100
    assert report.audited == 4 and report.broken == {} and report.unknown == []
