"""End-to-end: a real vLLM engine (CPU build), a tiny random model, a real HTTP S3.

Every engine runs in its own process, as a second machine would. Correctness
is always judged against an engine with no connector at all, token for token.
The no-connector baselines and the cold TP=1 writer (``cold_tp1``: a copy of
one session-wide writer's bucket) are shared session fixtures
(tests/vllm/conftest.py): an engine start costs tens of seconds on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from s3kv.keys import KeyLayout
from s3kv.manifest import decode_manifest
from tests.vllm.harness import (
    CHUNK,
    EngineResult,
    bucket_keys,
    expected_hit_tokens,
    job,
    run_engine,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
LAYOUT = KeyLayout("s3kv")


def manifests(s3: Any, bucket: str) -> dict[str, Any]:
    found = {}
    for k in bucket_keys(s3, bucket):
        if k.endswith("/manifest.json"):
            body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
            m = decode_manifest(body, layout=LAYOUT)
            found[m.chunk_id] = m
    return found


def unique_chunks(prompts: list[list[int]]) -> int:
    from s3kv.keys import chain_chunk_ids

    return len({c for p in prompts for c in chain_chunk_ids(p, CHUNK)})


def warm_expected(prompts: list[list[int]]) -> int:
    return sum(expected_hit_tokens(len(p)) for p in prompts)


def test_a_tp1_second_engine_hits_and_matches(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    cold_tp1: EngineResult, conn: dict[str, Any], s3: Any, bucket: str,
) -> None:
    cold = cold_tp1
    assert cold.outputs == baseline_tp1
    found = manifests(s3, bucket)
    assert len(found) == unique_chunks(prompts)
    assert all(len(m.shards) == 1 for m in found.values())
    # The second engine, in a new process, enabled through kv_connector_module_path.
    warm = run_engine(job(tiny_model, prompts, conn, prefix_caching=False, module_path=True))
    assert warm.outputs == baseline_tp1
    assert warm.counters["hit_tokens"] == warm_expected(prompts)
    assert warm.counters["workers.loaded_chunks"] == sum(len(p) // CHUNK for p in prompts)
    assert warm.counters.get("workers.load_failures", 0) == 0
    assert warm.counters.get("planned_chunks", 0) == 0  # committed chunks are not saved again


def test_b_tp2_both_ranks_one_manifest_read_at_tp2_and_tp1(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    baseline_tp2: list[list[int]], conn: dict[str, Any], s3: Any, bucket: str,
) -> None:
    cold = run_engine(job(tiny_model, prompts, conn, tp=2))
    assert cold.outputs == baseline_tp2
    found = manifests(s3, bucket)
    assert len(found) == unique_chunks(prompts)
    for m in found.values():
        assert [s.rank for s in m.shards] == [0, 1]
        assert [(s.head_start, s.head_end) for s in m.shards] == [(0, 1), (1, 2)]
        assert m.tp_size == 2
    shard_keys = [k for k in bucket_keys(s3, bucket) if k.rsplit("/", 1)[-1] in ("r0", "r1")]
    assert len(shard_keys) == 2 * len(found)  # no orphans, no duplicates
    warm = run_engine(job(tiny_model, prompts, conn, tp=2, prefix_caching=False))
    assert warm.outputs == baseline_tp2
    assert warm.counters["hit_tokens"] == warm_expected(prompts)
    assert warm.counters["workers.loaded_chunks"] == 2 * sum(len(p) // CHUNK for p in prompts)
    # A TP=1 engine reads the same chunks: its one rank assembles both heads
    # from the two shards (two whole GETs per chunk).
    tp1 = run_engine(job(tiny_model, prompts, conn, prefix_caching=False, kv_role="kv_consumer"))
    assert tp1.namespace == cold.namespace
    assert tp1.outputs == baseline_tp1
    assert tp1.counters["hit_tokens"] == warm_expected(prompts)
    assert tp1.counters["workers.loaded_chunks"] == sum(len(p) // CHUNK for p in prompts)
    assert tp1.counters.get("workers.load_failures", 0) == 0


def test_b2_tp1_writer_tp2_reader(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    baseline_tp2: list[list[int]], cold_tp1: EngineResult, conn: dict[str, Any], s3: Any,
    bucket: str,
) -> None:
    cold = cold_tp1
    assert cold.outputs == baseline_tp1
    found = manifests(s3, bucket)
    assert all([(s.rank, s.head_start, s.head_end) for s in m.shards] == [(0, 0, 2)]
               and m.tp_size == 1 for m in found.values())
    # Each TP=2 rank takes its one head out of the TP=1 shard with a ranged GET.
    warm = run_engine(job(tiny_model, prompts, conn, tp=2, prefix_caching=False,
                          kv_role="kv_consumer"))
    assert warm.namespace == cold.namespace
    assert warm.outputs == baseline_tp2
    assert warm.counters["hit_tokens"] == warm_expected(prompts)
    assert warm.counters["workers.loaded_chunks"] == 2 * sum(len(p) // CHUNK for p in prompts)
    assert warm.counters.get("workers.load_failures", 0) == 0


def test_b3_block_size_128_writer_block_size_256_reader(
    tiny_model: Path, prompts: list[list[int]], cold_tp1: EngineResult, conn: dict[str, Any],
    s3: Any, bucket: str,
) -> None:
    """The payload is token-major: a chunk is the same bytes in any block size."""
    base256 = run_engine(job(tiny_model, prompts, block_size=256))
    cold = cold_tp1  # written at block size 128
    warm = run_engine(job(tiny_model, prompts, conn, block_size=256, prefix_caching=False,
                          kv_role="kv_consumer"))
    assert warm.namespace == cold.namespace
    assert warm.outputs == base256.outputs
    assert warm.counters["hit_tokens"] == sum(
        min(len(p) // CHUNK * CHUNK, (len(p) - 1) // 256 * 256) for p in prompts)
    assert warm.counters.get("workers.load_failures", 0) == 0


def test_c_corrupted_shard_recomputes(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    cold_tp1: EngineResult, conn: dict[str, Any], s3: Any, bucket: str,
) -> None:
    found = manifests(s3, bucket)
    # corrupt the shard of the shared first chunk: every prompt depends on it
    from s3kv.keys import chain_chunk_ids

    first = chain_chunk_ids(prompts[0], CHUNK)[0]
    key = found[first].shards[0].key
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x40
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    warm = run_engine(job(tiny_model, prompts, conn, prefix_caching=False))
    assert warm.outputs == baseline_tp1
    assert warm.counters["workers.load_failures"] >= 1
    assert warm.counters["failed_loads"] >= 1


def test_d_deleted_manifest_is_a_miss(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    cold_tp1: EngineResult, conn: dict[str, Any], s3: Any, bucket: str,
) -> None:
    from s3kv.keys import chain_chunk_ids

    ns = next(iter(manifests(s3, bucket).values())).namespace
    second = chain_chunk_ids(prompts[0], CHUNK)[1]  # shared by all prompts
    s3.delete_object(Bucket=bucket, Key=LAYOUT.manifest(ns, second))
    warm = run_engine(job(tiny_model, prompts, conn, prefix_caching=False, kv_role="kv_consumer"))
    assert warm.outputs == baseline_tp1
    # only the first chunk of each prompt is still a hit
    assert warm.counters["hit_tokens"] == CHUNK * len(prompts)
    assert warm.counters.get("workers.load_failures", 0) == 0


def test_e_unreachable_endpoint_serves_without_cache(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]], bucket: str,
) -> None:
    conn = {"bucket": bucket, "endpoint_url": "http://127.0.0.1:9", "max_attempts": 1,
            "connect_timeout_s": 0.5, "request_timeout_s": 2.0}
    res = run_engine(job(tiny_model, prompts, conn))
    assert res.outputs == baseline_tp1
    assert res.counters.get("hit_tokens", 0) == 0
    assert "object store unavailable" in res.stderr or "serving without the cache" in res.stderr


@pytest.mark.parametrize("change", ["weights", "dtype"])
def test_f_other_config_never_hits(
    change: str, tiny_model: Path, other_model: Path, prompts: list[list[int]],
    cold_tp1: EngineResult, conn: dict[str, Any], s3: Any, bucket: str,
) -> None:
    cold = cold_tp1
    extra: dict[str, Any] = {"prefix_caching": False}
    model = tiny_model
    if change == "weights":
        model = other_model
    else:
        extra["dtype"] = "bfloat16"
    other = run_engine(job(model, prompts, conn, **extra))
    assert other.namespace != cold.namespace
    assert other.counters.get("hit_tokens", 0) == 0
    assert other.counters.get("hit_chunks", 0) == 0
    assert other.counters["lookups"] >= len(prompts)


def test_bad_config_fails_startup_naming_the_key(
    tiny_model: Path, prompts: list[list[int]], conn: dict[str, Any],
) -> None:
    res = run_engine(job(tiny_model, prompts[:1], {**conn, "chunk_tokenz": 256}),
                     expect_ok=False)
    assert res.returncode != 0
    assert "chunk_tokenz" in res.stderr and "valid:" in res.stderr
    res = run_engine(job(tiny_model, prompts[:1], {**conn, "chunk_tokens": 200}),
                     expect_ok=False)
    assert res.returncode != 0
    assert "chunk_tokens" in res.stderr and "multiple" in res.stderr


def test_namespace_document_describes_fingerprint(
    cold_tp1: EngineResult, s3: Any, bucket: str,
) -> None:
    res = cold_tp1
    assert res.namespace is not None
    doc = json.loads(s3.get_object(Bucket=bucket,
                                   Key=LAYOUT.namespace_doc(res.namespace))["Body"].read())
    fp = doc["fingerprint"]
    assert doc["namespace"] == res.namespace
    assert fp["dtype"] == "float32" and fp["attention"] == "mha" and fp["chunk_tokens"] == CHUNK
    assert fp["weights_id"].startswith("sampled:")
    assert fp["num_layers"] == 2 and fp["num_kv_heads"] == 2 and fp["head_size"] == 64
    # What does not change the stored bytes is not part of the namespace.
    assert not {"tp_size", "block_size", "kv_layout"} & set(fp)


def test_no_credentials_serves_without_cache_and_says_why(
    tiny_model: Path, prompts: list[list[int]], baseline_tp1: list[list[int]],
    conn: dict[str, Any], tmp_path: Path,
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    res = run_engine(job(tiny_model, prompts, conn), env_update={
        "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None, "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "AWS_CONFIG_FILE": str(empty), "AWS_EC2_METADATA_DISABLED": "true",
    })
    assert res.outputs == baseline_tp1
    assert "serving without the cache" in res.stderr
    assert "credentials" in res.stderr
    assert res.counters.get("hit_tokens", 0) == 0
