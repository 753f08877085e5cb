"""SSM hybrids end to end: Mamba2 state stored at chunk ends and loaded at a hit's end.

Four Mamba2 hybrid shapes: Falcon-H1 (every layer's attention and Mamba2
mixer side by side: one full-attention KV cache group and one Mamba group),
Nemotron-H, Zamba2 and Granite 4.0-H (Mamba groups beside attention ones). vLLM's CPU
Mamba2 kernel keeps the state at block boundaries ("align" mode, which
prefix caching selects) only when no step computes more than one block, so
these engines schedule at most one block per step (``max_num_batched_tokens``
= the block size vLLM chooses, 256). Each test judges greedy outputs
against an engine without the connector, token for token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from s3kv.keys import chain_chunk_ids
from tests.s3server import S3Endpoint
from tests.vllm.harness import CHUNK, TMP, EngineResult, job, run_engine
from tests.vllm.models import (
    create_falcon_h1_model,
    create_granite_hybrid_model,
    create_nemotron_h_model,
    create_zamba2_model,
)
from tests.vllm.test_connector_e2e import manifests, unique_chunks
from tests.vllm.test_layouts_e2e import chunks_of, expected_hits

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FP32 = 4
BLOCK = 256  # vLLM raises the block size to fit a Mamba page (and with it the chunk's blocks)
LAYERS = 2
KV_HEADS, HEAD_DIM = 2, 64
# Mamba2 mixer of the test model: d_ssm 512 = 8 heads x 64, one group, d_state 64, kernel 4.
CONV_DIM = 512 + 2 * 64
STATE_BYTES = (CONV_DIM * 3 + 8 * 64 * 64) * FP32  # conv + SSM state, one layer
ATTN_BYTES = LAYERS * CHUNK * 2 * KV_HEADS * HEAD_DIM * FP32  # one chunk's K and V
ONE_BLOCK_STEPS: dict[str, Any] = {"max_num_batched_tokens": BLOCK}


def state_chunks(prompts: list[list[int]], block: int) -> set[str]:
    """The chunks that carry a state with ``ssm_states="prompt_end"``: each
    prompt's last full chunk at or before its last block boundary before the
    last token (vLLM's checkpoint of the prompt)."""
    out = set()
    for p in prompts:
        checkpoint = (len(p) - 1) // block * block
        n = checkpoint // CHUNK
        if n:
            out.add(chain_chunk_ids(p, CHUNK)[n - 1])
    return out


def ssm_groups(res: EngineResult) -> bool:
    kinds = sorted((g["kind"], g["layers"]) for g in res.raw["kv_cache_groups"])
    return (kinds == [("FullAttentionSpec", LAYERS), ("MambaSpec", LAYERS)]
            and "kv cache group sizes (256, 256)" in res.stderr
            and "Turning off hybrid kv cache manager" not in res.stderr)


@pytest.fixture(scope="module")
def model() -> Path:
    return create_falcon_h1_model(TMP / "models" / "tiny-falcon-h1")


@pytest.fixture(scope="module")
def baseline(model: Path, prompts: list[list[int]]) -> EngineResult:
    base = run_engine(job(model, prompts, **ONE_BLOCK_STEPS))
    assert ssm_groups(base), base.stderr[-2000:]
    return base


def test_state_is_stored_at_chunk_ends_and_a_hit_resumes_from_it(
    model: Path, prompts: list[list[int]], baseline: EngineResult, s3_endpoint: S3Endpoint,
    s3: Any,
) -> None:
    on = {"bucket": s3_endpoint.new_bucket("ssm"), "endpoint_url": s3_endpoint.url}
    cold = run_engine(job(model, prompts, on, **ONE_BLOCK_STEPS))
    assert cold.outputs == baseline.outputs
    assert ssm_groups(cold), cold.stderr[-2000:]
    # The engine tells s3kv where vLLM also writes states inside a step.
    assert "SSM states are stored where vLLM writes them: at step ends and prefill " \
        "checkpoints" in cold.stderr
    assert cold.raw["kv_cache_tokens"] == baseline.raw["kv_cache_tokens"]
    found = manifests(s3, on["bucket"])
    assert len(found) == unique_chunks(prompts)
    state_section = -(-LAYERS * STATE_BYTES // KV_HEADS) * KV_HEADS
    groups = [g["kind"] for g in cold.raw["kv_cache_groups"]]
    mamba = groups.index("MambaSpec")
    # Only the chunk each prompt resumes at holds its state (ssm_states
    # "prompt_end"); the shared chunks before it hold none.
    with_state = state_chunks(prompts, BLOCK)
    assert len(with_state) == len(prompts)
    for cid, m in found.items():
        has = cid in with_state
        assert m.starts == tuple(CHUNK if g == mamba and not has else 0
                                 for g in range(len(groups)))
        assert len(m.shards) == 1
        assert m.shards[0].size - m.shards[0].payload_offset == \
            ATTN_BYTES + (state_section if has else 0)

    # A fresh engine (its own prefix cache empty) resumes every prompt at its
    # last full chunk from the stored state, and generates the same tokens.
    warm = run_engine(job(model, prompts, on, kv_role="kv_consumer", **ONE_BLOCK_STEPS))
    assert warm.outputs == baseline.outputs
    assert warm.counters["hit_tokens"] == expected_hits(prompts, BLOCK) > 0
    assert warm.counters["workers.loaded_chunks"] == chunks_of(prompts)
    assert warm.counters.get("workers.load_failures", 0) == 0
    assert warm.counters.get("state_short_hits", 0) == 0
    # Every chunk's attention section, and one state per prompt: the last chunk's.
    assert warm.counters["workers.bytes_loaded"] == (
        chunks_of(prompts) * ATTN_BYTES + len(prompts) * state_section)

    # One flipped bit in the state section of prompt 0's last chunk: that
    # request's load fails as a whole and it is recomputed; outputs are unchanged.
    last = chain_chunk_ids(prompts[0], CHUNK)[-1]
    shard = found[last].shards[0]
    assert last in with_state
    state_at = shard.payload_offset + (ATTN_BYTES if mamba else 0)
    body = bytearray(s3.get_object(Bucket=on["bucket"], Key=shard.key)["Body"].read())
    body[state_at + 100] ^= 0x10
    s3.put_object(Bucket=on["bucket"], Key=shard.key, Body=bytes(body))
    bad = run_engine(job(model, prompts, on, kv_role="kv_consumer", **ONE_BLOCK_STEPS))
    assert bad.outputs == baseline.outputs
    assert bad.counters["workers.load_failures"] >= 1
    assert bad.counters["workers.loaded_chunks"] < warm.counters["workers.loaded_chunks"]


def test_without_align_mode_the_engine_is_refused_at_start_up(
    model: Path, prompts: list[list[int]], conn: dict[str, Any],
) -> None:
    """Without prefix caching vLLM keeps one running state per request (no
    state at chunk ends): s3kv stops the engine at start-up, naming the
    group and the setting, before any request."""
    res = run_engine(job(model, prompts[:1], conn, prefix_caching=False, **ONE_BLOCK_STEPS),
                     expect_ok=False)
    assert res.returncode != 0 and not res.outputs
    assert "(MambaSpec, layers" in res.stderr
    assert "mamba_cache_mode" in res.stderr and "--mamba-cache-mode align" in res.stderr


def test_tp2_state_is_read_by_tp2_and_never_by_tp1(
    model: Path, prompts: list[list[int]], baseline: EngineResult, s3_endpoint: S3Endpoint,
    s3: Any,
) -> None:
    """With ``ssm_states="all"`` every chunk stores its state. Each rank stores
    its own part of the state (its Mamba heads, and the
    conv channels of x, B and C interleaved), which only a rank of the same
    TP size can read back: the TP size is part of the namespace with SSM
    layers, so a TP=1 reader misses where a TP=2 reader hits."""
    # Every chunk's state ("all"), each rank its own part. Two TP=2 ranks spin
    # on both cores of a small test machine, and the scheduler's lookups wait
    # for CPU: this test checks what is read, not how long a lookup may take,
    # so its deadlines' floors are far above any answer the store gives.
    on: dict[str, Any] = {"bucket": s3_endpoint.new_bucket("ssm-tp2"),
                          "endpoint_url": s3_endpoint.url,
          "ssm_states": "all", "min_lookup_wait_s": 20.0, "min_load_wait_s": 20.0}
    base2 = run_engine(job(model, prompts, tp=2, **ONE_BLOCK_STEPS))
    cold = run_engine(job(model, prompts, on, tp=2, **ONE_BLOCK_STEPS))
    assert cold.outputs == base2.outputs
    found = manifests(s3, on["bucket"])
    assert len(found) == unique_chunks(prompts)
    assert all(len(m.shards) == 2 and m.starts == (0, 0) for m in found.values())
    warm = run_engine(job(model, prompts, on, tp=2, kv_role="kv_consumer", **ONE_BLOCK_STEPS))
    assert warm.outputs == base2.outputs
    # A lookup cut short by its deadline would be a (correct) shorter hit: say so.
    assert warm.counters.get("lookups_truncated", 0) == 0, warm.counters
    assert warm.counters.get("lookup_deadline_misses", 0) == 0, warm.counters
    assert warm.counters["hit_tokens"] == expected_hits(prompts, BLOCK) > 0, warm.counters
    assert warm.counters.get("workers.load_failures", 0) == 0
    tp1 = run_engine(job(model, prompts, on, kv_role="kv_consumer", **ONE_BLOCK_STEPS))
    assert tp1.outputs == baseline.outputs
    assert tp1.namespace != warm.namespace
    assert tp1.counters.get("hit_tokens", 0) == 0


def test_nemotron_h_shape_stores_each_mamba_group_as_its_own_section(
    prompts: list[list[int]], s3_endpoint: S3Endpoint, s3: Any,
) -> None:
    """Nemotron-H shape (Mamba2, MLP and attention layers): two Mamba groups
    of one layer each, before the attention group. Each group's state is a
    section of its own; a hit loads both from its last chunk."""
    nemo = create_nemotron_h_model(TMP / "models" / "tiny-nemotron-h")
    base = run_engine(job(nemo, prompts, **ONE_BLOCK_STEPS))
    kinds = [g["kind"] for g in base.raw["kv_cache_groups"]]
    assert sorted(kinds) == ["FullAttentionSpec", "MambaSpec", "MambaSpec"]
    on = {"bucket": s3_endpoint.new_bucket("ssm-nemo"), "endpoint_url": s3_endpoint.url}
    cold = run_engine(job(nemo, prompts, on, **ONE_BLOCK_STEPS))
    assert cold.outputs == base.outputs
    found = manifests(s3, on["bucket"])
    assert len(found) == unique_chunks(prompts)
    attn = CHUNK * 2 * KV_HEADS * HEAD_DIM * FP32  # one attention layer
    with_state = state_chunks(prompts, BLOCK)
    for cid, m in found.items():
        has = cid in with_state
        assert sorted(m.starts) == ([0, 0, 0] if has else [0, CHUNK, CHUNK])
        assert m.shards[0].size - m.shards[0].payload_offset == \
            attn + (2 * STATE_BYTES if has else 0)
    warm = run_engine(job(nemo, prompts, on, kv_role="kv_consumer", **ONE_BLOCK_STEPS))
    assert warm.outputs == base.outputs
    assert warm.counters["hit_tokens"] == expected_hits(prompts, BLOCK) > 0
    assert warm.counters.get("workers.load_failures", 0) == 0
    assert warm.counters["workers.bytes_loaded"] == (
        chunks_of(prompts) * attn + len(prompts) * 2 * STATE_BYTES)


@pytest.mark.parametrize(("build", "block"), [(create_zamba2_model, 128),
                                              (create_granite_hybrid_model, 256)],
                         ids=["zamba2", "granite-4.0-h"])
def test_other_mamba2_shapes_resume_from_their_state(
    build: Any, block: int, prompts: list[list[int]], s3_endpoint: S3Endpoint, s3: Any,
) -> None:
    """Zamba2 (shared attention every other layer, 128-token blocks: two per
    chunk, a state every second step) and Granite 4.0-H (three Mamba groups,
    MoE): each prompt's last chunk holds each group's state, and hits match."""
    model = build(TMP / "models" / f"tiny-{build.__name__}")
    steps: dict[str, Any] = {"max_num_batched_tokens": block}
    base = run_engine(job(model, prompts, **steps))
    groups = base.raw["kv_cache_groups"]
    assert {g["block_size"] for g in groups} == {block}
    assert sum(g["kind"] == "MambaSpec" for g in groups) >= 2
    on = {"bucket": s3_endpoint.new_bucket("ssm-more"), "endpoint_url": s3_endpoint.url}
    cold = run_engine(job(model, prompts, on, **steps))
    assert cold.outputs == base.outputs
    found = manifests(s3, on["bucket"])
    assert len(found) == unique_chunks(prompts)
    with_state = state_chunks(prompts, block)
    for cid, m in found.items():
        assert m.starts == tuple(CHUNK if g["kind"] == "MambaSpec" and cid not in with_state
                                 else 0 for g in groups)
    warm = run_engine(job(model, prompts, on, kv_role="kv_consumer", **steps))
    assert warm.outputs == base.outputs
    assert warm.counters["hit_tokens"] == expected_hits(prompts, block) > 0
    assert warm.counters.get("workers.load_failures", 0) == 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: vLLM's CPU Mamba2 kernel fails on steps longer "
                           "than one block (mamba_mixer2.py IndexError)")
def test_big_steps_store_state_only_where_a_step_ended(
    model: Path, prompts: list[list[int]], s3_endpoint: S3Endpoint, s3: Any,
) -> None:
    """vLLM's default budget (8192 tokens a step): each prompt's first step
    runs to its last block boundary (768 here), so only the chunk ending there
    holds a state; the shared chunks before it hold none. A hit resumes there."""
    base = run_engine(job(model, prompts))
    on = {"bucket": s3_endpoint.new_bucket("ssm-big"), "endpoint_url": s3_endpoint.url}
    cold = run_engine(job(model, prompts, on))
    assert cold.outputs == base.outputs
    found = manifests(s3, on["bucket"])
    mamba = [g["kind"] for g in cold.raw["kv_cache_groups"]].index("MambaSpec")
    ends = {cid: i for p in prompts for i, cid in enumerate(chain_chunk_ids(p, CHUNK))}
    assert {cid: m.starts[mamba] for cid, m in found.items()} == {
        cid: 0 if i == 2 else CHUNK for cid, i in ends.items()}
    warm = run_engine(job(model, prompts, on, kv_role="kv_consumer"))
    assert warm.outputs == base.outputs
    assert warm.counters["hit_tokens"] == expected_hits(prompts, BLOCK) > 0
