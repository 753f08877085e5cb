"""SSM state save and load plans against vLLM's real scheduler, at any step size.

What s3kv stores of a Mamba group rests on vLLM's "align" mode: block ``p``
of the group's table holds the state after ``(p + 1) * block_size`` tokens,
and a chunk stores that block only when the step that computed its last
token wrote it: the step ended exactly there, or it is the step's internal
prefill checkpoint (``s3kv.groups.state_stored``). vLLM's CPU Mamba2
kernel fails on steps longer than one block, so the end-to-end tests
(``test_ssm_e2e``) schedule one block per step; a GPU engine schedules up to
8192 tokens a step by default. These tests run vLLM's own ``Scheduler`` and
``KVCacheManager`` (no model, no forward: each step's output is simulated)
with the connector over a real S3 endpoint, and check the save plans, the
hit ends and the load plans against the block tables vLLM allocates, with
big steps and with one-block steps.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm.config import KVTransferConfig, VllmConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.mamba.checkpoint import compute_mamba_prefill_checkpoints
from vllm.model_executor.models.falcon_h1 import FalconH1ForCausalLM
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import (
    get_request_block_hasher,
    init_none_hash,
    resolve_cache_hit_alignment_tokens,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from s3kv.keys import KeyLayout, chain_chunk_ids
from s3kv.manifest import ShardEntry, new_manifest
from s3kv.vllm.connector import S3KVConnector
from s3kv.vllm.metadata import LoadRequest, S3KVMetadata
from tests.s3server import S3Endpoint
from tests.vllm.harness import TMP
from tests.vllm.models import create_falcon_h1_model

pytestmark = [pytest.mark.vllm]

BLOCK = CHUNK = 256  # the block size vLLM picks for this model (test_ssm_e2e checks it)
ATTN, MAMBA = 0, 1  # KV cache groups, in vLLM's order (attention is built first)
NUM_BLOCKS = 128  # what a 64 MiB KV cache gives this model


@dataclass
class Step:
    start: int
    end: int
    meta: S3KVMetadata
    table: tuple[list[int], ...]  # vLLM's block ids per group, as this step was built


def vllm_config(model: Path, budget: int, s3_endpoint: S3Endpoint, bucket: str,
                ssm_states: str = "all") -> VllmConfig:
    # "all": every state vLLM writes is stored, the rule these tests check.
    extra = {"bucket": bucket, "endpoint_url": s3_endpoint.url, "chunk_tokens": CHUNK,
             "min_lookup_wait_s": 5.0, "min_load_wait_s": 5.0, "ssm_states": ssm_states}
    ktc = KVTransferConfig(kv_connector="S3KVConnector", kv_role="kv_both",
                           kv_connector_module_path="s3kv.vllm.connector",
                           kv_connector_extra_config=extra)
    return EngineArgs(model=str(model), dtype="float32", enforce_eager=True,
                      max_model_len=4096, block_size=128, skip_tokenizer_init=True, seed=0,
                      max_num_batched_tokens=budget, enable_prefix_caching=True,
                      kv_transfer_config=ktc).create_engine_config()


def kv_cache_config(cfg: VllmConfig) -> KVCacheConfig:
    """The groups an engine builds from the model's layers, as a started
    engine reports them: vLLM raises the block size to 256 so one attention
    page holds a Mamba state, pads the Mamba page to the attention page, and
    Mamba2 layers export the checkpoint state inside a step
    (``MambaMixer2.get_kv_cache_spec``: one prefill checkpoint block)."""
    mc, cc = cfg.model_config, cfg.cache_config
    cc.block_size = cc.mamba_block_size = BLOCK
    assert mc.architecture == "FalconH1ForCausalLM"
    attn = FullAttentionSpec(block_size=BLOCK, head_size=mc.get_head_size(), dtype=torch.float32,
                             num_kv_heads=mc.get_num_kv_heads(cfg.parallel_config))
    mamba = MambaSpec(shapes=tuple(FalconH1ForCausalLM.get_mamba_state_shape_from_config(cfg)),
                      dtypes=tuple(FalconH1ForCausalLM.get_mamba_state_dtype_from_config(cfg)),
                      block_size=BLOCK, page_size_padded=attn.page_size_bytes,
                      mamba_cache_mode=cc.mamba_cache_mode, num_prefill_checkpoint_blocks=1,
                      prefill_checkpoint_alignment=1)
    assert mamba.shapes == ((3, 640), (8, 64, 64)) and cc.mamba_cache_mode == "align"
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([f"model.layers.{i}.attn" for i in range(2)], attn),
        KVCacheGroupSpec([f"model.{i}.mixer" for i in (2, 3)], mamba)])


@pytest.fixture(scope="module")
def model() -> Path:
    return create_falcon_h1_model(TMP / "models" / "tiny-falcon-h1")


def scheduler(model: Path, budget: int, s3_endpoint: S3Endpoint, bucket: str,
              ssm_states: str = "all") -> tuple[Scheduler, S3KVConnector]:
    """vLLM's scheduler as ``EngineCore`` builds it, with the connector."""
    cfg = vllm_config(model, budget, s3_endpoint, bucket, ssm_states)
    kcc = kv_cache_config(cfg)
    cfg.cache_config.num_gpu_blocks = NUM_BLOCKS
    block_size, hash_block = resolve_kv_cache_block_sizes(kcc, cfg)
    align = resolve_cache_hit_alignment_tokens(kcc, cfg, block_size, hash_block)
    cfg.cache_config.hash_block_size = kcc.hash_block_size = hash_block
    cfg.cache_config.cache_hit_alignment_tokens = kcc.cache_hit_alignment_tokens = align
    sched = Scheduler(vllm_config=cfg, kv_cache_config=kcc, block_size=block_size,
                      structured_output_manager=StructuredOutputManager(cfg),
                      hash_block_size=hash_block)
    assert (block_size, hash_block, sched.need_mamba_block_aligned_split) == (256, 256, True)
    conn = sched.get_kv_connector()
    assert isinstance(conn, S3KVConnector) and conn.fingerprint is not None
    return sched, conn


def add_request(sched: Scheduler, prompt: list[int]) -> Request:
    hash_fn = get_hash_fn_by_name(sched.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    req = Request("r0", prompt, SamplingParams(max_tokens=4), None,
                  block_hasher=get_request_block_hasher(BLOCK, hash_fn))
    sched.add_request(req)
    return req


def step(sched: Scheduler, req: Request, done: KVConnectorOutput | None = None) -> Step | None:
    """One scheduler step and its simulated output; None while nothing was
    scheduled (the connector's lookup has not answered yet)."""
    before = req.num_computed_tokens
    so = sched.schedule()
    meta = so.kv_connector_metadata
    assert isinstance(meta, S3KVMetadata)
    n = so.num_scheduled_tokens.get(req.request_id, 0)
    table = sched.kv_cache_manager.get_block_ids(req.request_id)
    rid = [req.request_id] if n else []
    sampled = [[7] if before + n >= req.num_prompt_tokens else []] if n else []
    sched.update_from_output(so, ModelRunnerOutput(
        req_ids=rid, req_id_to_index={r: 0 for r in rid}, sampled_token_ids=sampled,
        kv_connector_output=done))
    if not n and not meta.loads:
        return None
    return Step(before, before + n, meta, tuple(list(ids) for ids in table))


def next_step(sched: Scheduler, req: Request) -> Step:
    deadline = time.monotonic() + 30
    while (got := step(sched, req)) is None:
        assert time.monotonic() < deadline, "vLLM scheduled nothing for 30 s"
        time.sleep(0.01)
    return got


def prefill(sched: Scheduler, req: Request) -> list[Step]:
    steps = [next_step(sched, req)]
    while steps[-1].end < req.num_prompt_tokens:
        steps.append(next_step(sched, req))
    return steps


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def checkpoint_of(s: Step) -> int:
    """vLLM's own answer (the worker's rule): the position whose state the step
    writes inside it, as its internal prefill checkpoint; 0 if none."""
    offsets, cols = compute_mamba_prefill_checkpoints(
        [s.end], [s.end - s.start], hash_block_size=BLOCK, mamba_block_size=BLOCK,
        checkpoint_alignment=1, drop_eagle_block=False, cache_hit_alignment_tokens=BLOCK)
    return s.start + offsets[0] if cols[0] >= 0 else 0


def check_state_rule(steps: list[Step]) -> dict[int, tuple[int, ...]]:
    """Every planned chunk against vLLM's tables: the attention blocks are the
    chunk's own, and the state is stored, from the block at the chunk's
    index, exactly when its step wrote the state at the chunk's end (the
    step's end, or its internal checkpoint). Returns chunk -> state blocks
    stored."""
    stored: dict[int, tuple[int, ...]] = {}
    for s in steps:
        for c in s.meta.saves:
            i = c.ref.index
            assert c.block_ids[ATTN] == (s.table[ATTN][i],) and c.starts[ATTN] == 0
            if (i + 1) * CHUNK in (s.end, checkpoint_of(s)):
                assert s.table[MAMBA][i] != 0
                assert (c.starts[MAMBA], c.block_ids[MAMBA]) == (0, (s.table[MAMBA][i],))
            else:
                assert (c.starts[MAMBA], c.block_ids[MAMBA]) == (CHUNK, ())
            stored[i] = c.block_ids[MAMBA]
    return stored


@pytest.fixture(scope="module")
def big_steps(model: Path, s3_endpoint: S3Endpoint) -> list[Step]:
    """A 2000-token prompt at the GPU default of 8192 tokens a step."""
    sched, _ = scheduler(model, 8192, s3_endpoint, s3_endpoint.new_bucket("ssm"))
    try:
        return prefill(sched, add_request(sched, prompt(2000, 0)))
    finally:
        sched.shutdown()


def test_big_steps_prefill_the_prompt_in_one_step(big_steps: list[Step]) -> None:
    # Scheduler._mamba_block_aligned_split clips a chunk that stops short of
    # the prompt's end to a block boundary; the prompt's last chunk is not
    # clipped to the last boundary (1792) because Mamba2 has a prefill
    # checkpoint block: the step runs to 2000 and the worker writes the state
    # after 1792 tokens from inside it, into column cdiv(2000, 256) - 2 = 6.
    assert [(s.start, s.end) for s in big_steps] == [(0, 2000)]
    assert compute_mamba_prefill_checkpoints(
        [2000], [2000], hash_block_size=BLOCK, mamba_block_size=BLOCK, checkpoint_alignment=1,
        drop_eagle_block=False, cache_hit_alignment_tokens=BLOCK) == ([1792], [6])
    table = big_steps[0].table
    assert table[MAMBA][:6] == [0] * 6 and 0 not in table[MAMBA][6:] and len(table[MAMBA]) == 8
    assert [c.ref.index for c in big_steps[0].meta.saves] == list(range(7))
    stored = check_state_rule(big_steps)
    assert [stored[i] for i in range(6)] == [()] * 6  # states vLLM never held


def test_big_steps_store_the_prefill_checkpoint_state(big_steps: list[Step]) -> None:
    """The state after 1792 tokens, written inside the one step [0, 2000) into
    block 6, is chunk 6's: a later request resumes there."""
    chunk6 = big_steps[0].meta.saves[6]
    assert (chunk6.starts[MAMBA], chunk6.block_ids[MAMBA]) == (0, (big_steps[0].table[MAMBA][6],))


def test_a_big_step_that_ends_at_a_chunk_end_stores_its_state(
        model: Path, s3_endpoint: S3Endpoint, bucket: str) -> None:
    # 1024 tokens a step: the first step ends at the budget (a block
    # boundary, the end of chunk 3) and, as its internal checkpoint, writes
    # the state at 768 (chunk 2's end) into block 2; the second runs to the
    # prompt's end and writes its checkpoint at 1792, the end of chunk 6.
    sched, _ = scheduler(model, 1024, s3_endpoint, bucket)
    try:
        steps = prefill(sched, add_request(sched, prompt(2000, 1)))
    finally:
        sched.shutdown()
    assert [(s.start, s.end) for s in steps] == [(0, 1024), (1024, 2000)]
    assert [[c.ref.index for c in s.meta.saves] for s in steps] == [[0, 1, 2, 3], [4, 5, 6]]
    stored = check_state_rule(steps)
    assert {i for i, b in stored.items() if b} == {2, 3, 6}
    assert checkpoint_of(steps[0]) == 768 and checkpoint_of(steps[1]) == 1792
    assert stored[2] == (steps[0].table[MAMBA][2],)
    assert stored[3] == (steps[0].table[MAMBA][3],)
    assert stored[6] == (steps[1].table[MAMBA][6],)


def test_by_default_only_the_chunk_a_repeat_resumes_at_stores_its_state(
        model: Path, s3_endpoint: S3Endpoint, bucket: str) -> None:
    """``ssm_states="prompt_end"``: of the states vLLM writes for a 2000-token
    prompt in 1024-token steps (at 768, 1024 and 1792), only the one at the
    prompt's checkpoint (1792, chunk 6) is stored."""
    sched, _ = scheduler(model, 1024, s3_endpoint, bucket, ssm_states="prompt_end")
    try:
        steps = prefill(sched, add_request(sched, prompt(2000, 3)))
    finally:
        sched.shutdown()
    assert [(s.start, s.end) for s in steps] == [(0, 1024), (1024, 2000)]
    stored = {c.ref.index: c.block_ids[MAMBA] for s in steps for c in s.meta.saves}
    assert stored == {i: ((steps[1].table[MAMBA][6],) if i == 6 else ()) for i in range(7)}
    assert steps[1].table[MAMBA][6] != 0


def test_one_block_steps_store_every_chunks_state_from_its_own_block(
        model: Path, s3_endpoint: S3Endpoint, bucket: str) -> None:
    sched, _ = scheduler(model, BLOCK, s3_endpoint, bucket)
    try:
        steps = prefill(sched, add_request(sched, prompt(1000, 2)))
    finally:
        sched.shutdown()
    assert [(s.start, s.end) for s in steps] == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert [[c.ref.index for c in s.meta.saves] for s in steps] == [[0], [1], [2], []]
    stored = check_state_rule(steps)
    assert stored == {i: (steps[i].table[MAMBA][i],) for i in range(3)}
    assert len({b for ids in stored.values() for b in ids}) == 3


def commit(s3: Any, conn: S3KVConnector, tokens: list[int], chunks: int, state_in: set[int]
           ) -> None:
    """Manifests of the first ``chunks`` chunks of ``tokens``; only those in
    ``state_in`` hold the state at their end (the others' section is empty)."""
    assert conn.fingerprint is not None
    ns, layout = conn.fingerprint.namespace, KeyLayout(conn.settings.store.prefix)
    ids = chain_chunk_ids(tokens, CHUNK)[:chunks]
    for i, cid in enumerate(ids):
        starts = (0, 0 if i in state_in else CHUNK)
        shard = ShardEntry(0, layout.shard(ns, cid, "tp1-w", 0, 0), 1088, "0" * 32, 0, 2, 64,
                           ("0" * 32,) * 4, starts)
        m = new_manifest(namespace=ns, chunk_id=cid, parent_id=ids[i - 1] if i else None,
                         chunk_index=i, num_tokens=CHUNK, writer="tp1-w", shards=[shard],
                         tp_size=1)
        s3.put_object(Bucket=conn.settings.store.bucket, Key=layout.manifest(ns, cid),
                      Body=m.encode())


def test_a_hit_ends_at_the_last_chunk_with_state_and_loads_that_state(
        model: Path, s3_endpoint: S3Endpoint, bucket: str, s3: Any) -> None:
    sched, conn = scheduler(model, 8192, s3_endpoint, bucket)
    tokens = prompt(2000, 3)
    # Chunks 0..5 are committed (a hit could reach 1536); the state is stored
    # only at the ends of chunks 1 and 4, so the hit ends at 1280.
    commit(s3, conn, tokens, 6, state_in={1, 4})
    try:
        req = add_request(sched, tokens)
        first = next_step(sched, req)
        assert (first.start, first.end, req.num_computed_tokens) == (0, 0, 1280)
        assert conn.counters.get("state_short_hits") == 1
        assert conn.counters.get("hit_tokens") == 1280
        assert first.meta.saves == []
        [load] = first.meta.loads
        assert isinstance(load, LoadRequest) and load.req_id == req.request_id
        table = first.table
        # vLLM allocated the state block for the hit's end only: every
        # earlier entry of the Mamba group's table is the null block.
        assert table[MAMBA][:4] == [0] * 4 and table[MAMBA][4] != 0
        assert [c.manifest.chunk_index for c in load.chunks] == [0, 1, 2, 3, 4]
        assert [c.groups[ATTN] for c in load.chunks] == [((0, b),) for b in table[ATTN][:5]]
        assert [c.groups[MAMBA] for c in load.chunks] == [()] * 4 + [((0, table[MAMBA][4]),)]
        assert load.refused_blocks == ()
        # The load done, vLLM computes the rest of the prompt from token 1280.
        assert step(sched, req, KVConnectorOutput(finished_recving={req.request_id})) is None
        resumed = prefill(sched, req)
        assert [(s.start, s.end) for s in resumed] == [(1280, 2000)]
        # It reads the initial state from column (1280 - 1) // 256 = 4: the loaded block.
        assert resumed[0].table[MAMBA][4] == table[MAMBA][4]
        # Chunk 5 is committed already; chunk 6 ends inside the step, at its
        # internal checkpoint (1792): its state is the checkpoint's block.
        assert [c.ref.index for c in resumed[0].meta.saves] == [6]
        assert checkpoint_of(resumed[0]) == 1792
        assert check_state_rule(resumed) == {6: (resumed[0].table[MAMBA][6],)}
    finally:
        sched.shutdown()
