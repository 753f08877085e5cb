"""Admission policies at TP=2: every rank saves exactly the chunks the scheduler
admitted, so each committed chunk has one manifest naming both ranks' shards,
no shard is left without a manifest, and outputs never change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from s3kv.keys import chain_chunk_ids
from tests.vllm.harness import CHUNK, bucket_keys, job, run_engine
from tests.vllm.test_connector_e2e import manifests

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.parametrize("policy", ["all", "second_sighting", "requested"])
def test_policy_tp2(
    policy: str, tiny_model: Path, prompts: list[list[int]], baseline_tp2: list[list[int]],
    conn: dict[str, Any], s3: Any, bucket: str,
) -> None:
    extra: dict[str, Any] = {}
    if policy == "requested":
        extra["kv_transfer_params"] = {"s3kv_save": True}
    res = run_engine(job(tiny_model, prompts, {**conn, "admission": policy}, tp=2, **extra))
    assert res.outputs == baseline_tp2
    per_prompt = [chain_chunk_ids(p, CHUNK) for p in prompts]
    every = {c for ids in per_prompt for c in ids}
    seen_twice = {c for c in every if sum(c in ids for ids in per_prompt) >= 2}
    expected = seen_twice if policy == "second_sighting" else every
    found = manifests(s3, bucket)
    assert set(found) == expected
    for m in found.values():
        assert [s.rank for s in m.shards] == [0, 1]
    named = {s.key for m in found.values() for s in m.shards}
    shard_keys = {k for k in bucket_keys(s3, bucket) if k.rsplit("/", 1)[-1] in ("r0", "r1")}
    assert shard_keys == named  # no orphan shards from admission decisions


def test_requested_policy_saves_nothing_unasked(
    tiny_model: Path, prompts: list[list[int]], conn: dict[str, Any], s3: Any, bucket: str,
) -> None:
    run_engine(job(tiny_model, prompts, {**conn, "admission": "requested"}))
    assert manifests(s3, bucket) == {}
    assert [k for k in bucket_keys(s3, bucket) if not k.endswith("namespace.json")] == []
