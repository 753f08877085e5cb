"""Hybrid models end to end, with vLLM's hybrid KV cache manager on.

The Gemma-3 shape (sliding-window layers between full ones) runs with two KV
cache groups when s3kv is its connector, exactly as without one. Each test
judges greedy outputs against an engine without the connector, token for
token, and checks what the bucket holds for each group: every token of the
full-attention layers, and of the window layers only the blocks a later hit
can need (``s3kv.groups``).
"""

from __future__ import annotations

from typing import Any

import pytest

from s3kv.groups import first_needed_token, store_start
from s3kv.keys import chain_chunk_ids
from tests.s3server import S3Endpoint
from tests.vllm.harness import CHUNK, TMP, EngineResult, job, run_engine
from tests.vllm.models import (
    create_gpt_oss_model,
    create_sliding_window_model,
)
from tests.vllm.test_connector_e2e import manifests, unique_chunks
from tests.vllm.test_layouts_e2e import chunks_of, expected_hits

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FP32 = 4
WINDOW = 128
BLOCK = 128
HEADS, HEAD_DIM = 2, 64
TOKEN_BYTES = 2 * HEADS * HEAD_DIM * FP32  # K and V of one layer, one token
WINDOW_LAYERS = FULL_LAYERS = 2
HMA_OFF = {"disable_hybrid_kv_cache_manager": True}


def groups_of(res: EngineResult) -> list[tuple[str, int]]:
    return [(g["kind"], g["layers"]) for g in res.raw["kv_cache_groups"]]


def two_groups(res: EngineResult) -> bool:
    """vLLM runs the model with its hybrid manager: one group per kind of layer."""
    return (sorted(groups_of(res)) == [("FullAttentionSpec", 2), ("SlidingWindowSpec", 2)]
            and "kv cache group sizes (128, 128)" in res.stderr
            and "Turning off hybrid kv cache manager" not in res.stderr)


def window_bytes_loaded(prompts: list[list[int]], chunk: int) -> int:
    """Window-layer bytes the hits load: the stored window section of each
    chunk that holds a block the window still covers at the hit's end (a
    section is read whole: its tokens are not the outermost dimension)."""
    stored = (chunk - store_start(WINDOW, chunk, BLOCK)) * WINDOW_LAYERS * TOKEN_BYTES
    total = 0
    for p in prompts:
        end = expected_hits([p], BLOCK)
        need = first_needed_token(WINDOW, end, BLOCK)
        total += stored * sum(1 for i in range(end // chunk) if (i + 1) * chunk > need)
    return total


@pytest.fixture(scope="module")
def model() -> Any:
    return create_sliding_window_model(TMP / "models" / "tiny-gemma3")


def test_hma_on_outputs_match_and_hits_load_fewer_bytes(
    model: Any, prompts: list[list[int]], s3_endpoint: S3Endpoint, s3: Any,
) -> None:
    base = run_engine(job(model, prompts))
    assert two_groups(base)
    on = {"bucket": s3_endpoint.new_bucket("hma"), "endpoint_url": s3_endpoint.url}
    cold = run_engine(job(model, prompts, on))
    assert cold.outputs == base.outputs
    assert two_groups(cold), cold.stderr[-2000:]
    # Same KV cache room as without a connector.
    assert cold.raw["kv_cache_tokens"] == base.raw["kv_cache_tokens"]
    found = manifests(s3, on["bucket"])
    assert len(found) == unique_chunks(prompts)
    full_bytes = FULL_LAYERS * CHUNK * TOKEN_BYTES
    window_start = store_start(WINDOW, CHUNK, BLOCK)
    for m in found.values():
        assert len(m.shards) == 1
        # Group order is vLLM's: the first group holds the first layer (a window one).
        assert m.starts == (window_start, 0)
        window = WINDOW_LAYERS * (CHUNK - window_start) * TOKEN_BYTES
        assert m.shards[0].size - m.shards[0].payload_offset == full_bytes + window

    warm = run_engine(job(model, prompts, on, prefix_caching=False, kv_role="kv_consumer"))
    assert warm.outputs == base.outputs
    assert two_groups(warm)
    assert warm.counters["hit_tokens"] == expected_hits(prompts, BLOCK) > 0
    assert warm.counters["workers.loaded_chunks"] == chunks_of(prompts)
    assert warm.counters.get("workers.load_failures", 0) == 0
    assert warm.counters.get("window_short_hits", 0) == 0

    # One corrupt byte in the window section of prompt 0's last chunk: vLLM
    # takes no per-block load errors with two groups, so that request fails
    # its load as a whole and is recomputed; the other prompts still hit.
    last = chain_chunk_ids(prompts[0], CHUNK)[-1]
    shard = found[last].shards[0]
    body = bytearray(s3.get_object(Bucket=on["bucket"], Key=shard.key)["Body"].read())
    body[shard.payload_offset + 5] ^= 0x40
    s3.put_object(Bucket=on["bucket"], Key=shard.key, Body=bytes(body))
    bad = run_engine(job(model, prompts, on, prefix_caching=False, kv_role="kv_consumer"))
    assert bad.outputs == base.outputs
    assert bad.counters["workers.load_failures"] >= 1
    assert bad.counters["workers.loaded_chunks"] < warm.counters["workers.loaded_chunks"]

    # The same engine with the hybrid manager off (how vLLM ran s3kv before it
    # supported hybrid groups): one group, every layer's every token loaded.
    off = {"bucket": s3_endpoint.new_bucket("hma-off"), "endpoint_url": s3_endpoint.url}
    cold_off = run_engine(job(model, prompts, off, llm_kwargs=HMA_OFF))
    assert cold_off.outputs == base.outputs
    assert groups_of(cold_off) == [("FullAttentionSpec", 4)]
    assert cold_off.namespace != cold.namespace
    warm_off = run_engine(job(model, prompts, off, prefix_caching=False, kv_role="kv_consumer",
                              llm_kwargs=HMA_OFF))
    assert warm_off.outputs == base.outputs
    assert warm_off.counters["hit_tokens"] == warm.counters["hit_tokens"]

    loaded_on = warm.counters["workers.bytes_loaded"]
    loaded_off = warm_off.counters["workers.bytes_loaded"]
    hit_tokens = warm.counters["hit_tokens"]
    assert loaded_off == hit_tokens * (FULL_LAYERS + WINDOW_LAYERS) * TOKEN_BYTES
    # Full layers load every hit token; window layers only the sections of the
    # chunks whose blocks the window still covers at the hit's end.
    assert loaded_on == (hit_tokens * FULL_LAYERS * TOKEN_BYTES
                         + window_bytes_loaded(prompts, CHUNK))
    assert loaded_on < loaded_off
    print(f"bytes loaded per hit token: HMA on {loaded_on / hit_tokens:.0f}, "
          f"off {loaded_off / hit_tokens:.0f}, ratio {loaded_on / loaded_off:.3f}")


def test_long_chunks_store_only_the_window_tail_and_read_at_tp2(
    model: Any, prompts: list[list[int]], s3_endpoint: S3Endpoint, s3: Any,
) -> None:
    """512-token chunks: a window section stores only its last blocks (those a
    hit at the chunk's end needs). A TP=2 reader, one KV head per rank, loads
    what a TP=1 writer stored, section by section."""
    chunk = 512
    bucket = s3_endpoint.new_bucket("hma512")
    conn: dict[str, Any] = {"bucket": bucket, "endpoint_url": s3_endpoint.url,
                            "chunk_tokens": chunk}
    base1 = run_engine(job(model, prompts)).outputs
    cold = run_engine(job(model, prompts, conn))
    assert cold.outputs == base1
    start = store_start(WINDOW, chunk, BLOCK)
    assert 0 < start < chunk
    found = manifests(s3, bucket)
    assert len(found) == 1  # the 520-token shared prefix holds one 512-token chunk
    (m,) = found.values()
    assert m.starts == (start, 0)
    stored = m.shards[0].size - m.shards[0].payload_offset
    assert stored == (FULL_LAYERS * chunk + WINDOW_LAYERS * (chunk - start)) * TOKEN_BYTES

    base2 = run_engine(job(model, prompts, tp=2)).outputs
    warm = run_engine(job(model, prompts, conn, tp=2, prefix_caching=False,
                          kv_role="kv_consumer"))
    assert warm.outputs == base2
    assert two_groups(warm)
    assert warm.counters["hit_tokens"] == len(prompts) * chunk
    # Both ranks load their head of both sections of the one chunk, per prompt.
    assert warm.counters["workers.loaded_chunks"] == 2 * len(prompts)
    assert warm.counters["workers.bytes_loaded"] == len(prompts) * stored
    assert warm.counters.get("workers.load_failures", 0) == 0


def test_gpt_oss_shape_alternating_windows_with_sinks(
    prompts: list[list[int]], s3_endpoint: S3Endpoint, s3: Any,
) -> None:
    """gpt-oss shape (128-token windows alternating with full attention, attention
    sinks, MoE): two groups with s3kv too, identical output, hits."""
    model = create_gpt_oss_model(TMP / "models" / "tiny-gpt-oss")
    base = run_engine(job(model, prompts))
    assert two_groups(base)
    conn = {"bucket": s3_endpoint.new_bucket("gptoss"), "endpoint_url": s3_endpoint.url}
    cold = run_engine(job(model, prompts, conn))
    assert cold.outputs == base.outputs
    assert two_groups(cold)
    assert all(m.starts == (store_start(WINDOW, CHUNK, BLOCK), 0)
               for m in manifests(s3, conn["bucket"]).values())
    warm = run_engine(job(model, prompts, conn, prefix_caching=False, kv_role="kv_consumer"))
    assert warm.outputs == base.outputs
    assert warm.counters["hit_tokens"] == expected_hits(prompts, BLOCK) > 0
    assert warm.counters["workers.loaded_chunks"] == chunks_of(prompts)
    assert warm.counters.get("workers.load_failures", 0) == 0
