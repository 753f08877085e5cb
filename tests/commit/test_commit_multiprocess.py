"""Commit across ranks with real GLOO process groups and a real HTTP S3 server.

Scenarios (a)-(e) of the core design: every test asserts on what is in the
bucket afterwards, read back through the verifying reader.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import time
from typing import Any

import pytest

from s3kv.config import StoreSettings
from s3kv.errors import IntegrityError, NotFound
from s3kv.heads import uploading_ranks
from s3kv.keys import KeyLayout
from s3kv.manifest import decode_manifest
from s3kv.reader import read_shard
from s3kv.store import open_store
from tests.commit.harness import (
    HEADS_PER_RANK,
    NAMESPACE,
    PREFIX,
    Scenario,
    free_port,
    plan,
    worker,
)
from tests.s3server import S3Endpoint

pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.slow

LAYOUT = KeyLayout(PREFIX)
CTX = mp.get_context("spawn")


def run_group(endpoint: S3Endpoint, bucket: str, world: int, sc: Scenario,
              results: Any = None, gate: Any = None, join: bool = True) -> list[Any]:
    results = results if results is not None else CTX.Queue()
    gate = gate if gate is not None else CTX.Event()
    port = free_port()
    procs = [
        CTX.Process(target=worker, args=(r, world, port, endpoint.url, bucket, sc, results, gate))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    if not join:
        return procs
    return collect(procs, results, world, sc)


def collect(procs: list[Any], results: Any, expected: int, sc: Scenario,
            may_die: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """Reports of ``expected`` ranks. A rank process that exits with an error
    (other than the indices in ``may_die``) fails the test at once instead of
    leaving it waiting for a report that will never come."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + sc.timeout_s * 6 + 60
    while len(out) < expected and time.monotonic() < deadline:
        try:
            out.append(results.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        crashed = [(i, p.exitcode) for i, p in enumerate(procs)
                   if p.exitcode not in (None, 0) and i not in may_die]
        if crashed:
            for p in procs:
                p.kill()
            pytest.fail(f"rank processes exited with errors (index, exit code): {crashed}")
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank process hung")
    return out


async def _read_all(endpoint: S3Endpoint, bucket: str, world: int,
                    heads: int | None = None, namespace: str = NAMESPACE) -> dict[str, Any]:
    """chunk_id -> manifest for every committed chunk, after verifying every shard
    and that each KV head is stored exactly once, by the lowest rank holding it."""
    heads = heads if heads is not None else world * HEADS_PER_RANK
    uploaders = uploading_ranks(heads, world)
    store = await open_store(StoreSettings(bucket=bucket, endpoint_url=endpoint.url))
    found: dict[str, Any] = {}
    for rnd in plan(6):
        for cid, _, _ in rnd:
            try:
                body = await store.get(LAYOUT.manifest(namespace, cid))
            except NotFound:
                continue
            m = decode_manifest(body, layout=LAYOUT, expect_namespace=namespace,
                                expect_chunk_id=cid, expect_heads=heads)
            assert m.tp_size == world
            assert {s.rank: (s.head_start, s.head_end) for s in m.shards} == uploaders
            for entry in m.shards:
                await read_shard(store, m, entry)  # raises IntegrityError on any mismatch
            found[cid] = m
    await store.close()
    return found


def committed(endpoint: S3Endpoint, bucket: str, world: int,
              heads: int | None = None, namespace: str = NAMESPACE) -> dict[str, Any]:
    return asyncio.run(_read_all(endpoint, bucket, world, heads, namespace))


def outcomes(report: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Rank 0's (committed, failed) chunk ids, after checking that every chunk it
    was asked to save is in exactly one of them, exactly once."""
    got = report["outcomes"]["committed"] + report["outcomes"]["failed"]
    assert sorted(got) == sorted(report["submitted"])
    return set(report["outcomes"]["committed"]), set(report["outcomes"]["failed"])


def all_chunks(rounds: int = 3) -> list[str]:
    return [cid for rnd in plan(rounds) for cid, _, _ in rnd]


@pytest.mark.parametrize("world", [2, 4])
def test_a_normal_commit(s3_endpoint: S3Endpoint, bucket: str, world: int) -> None:
    res = run_group(s3_endpoint, bucket, world, Scenario())
    assert len(res) == world
    assert all(r["flushed"] and r["broken"] is None for r in res)
    found = committed(s3_endpoint, bucket, world)
    assert sorted(found) == sorted(all_chunks())
    rank0 = next(r for r in res if r["rank"] == 0)
    assert rank0["counters"]["chunks_committed"] == len(all_chunks())
    assert outcomes(rank0) == (set(all_chunks()), set())
    assert all(r["outcomes"] == {"committed": [], "failed": []} for r in res if r["rank"] != 0)
    # chains are recorded: every manifest names its parent
    chain = all_chunks()
    for i, cid in enumerate(chain):
        assert found[cid].parent_id == (chain[i - 1] if i else None)
        assert found[cid].chunk_index == i


def test_b_failed_rank_uploads_mean_no_manifest(s3_endpoint: S3Endpoint, bucket: str) -> None:
    chunks = all_chunks()
    failing = frozenset({chunks[1], chunks[4]})
    res = run_group(s3_endpoint, bucket, 2, Scenario(name="fail", fail_chunks=failing))
    assert len(res) == 2 and all(r["broken"] is None for r in res)
    found = committed(s3_endpoint, bucket, 2)
    assert set(found) == set(chunks) - failing
    rank0 = next(r for r in res if r["rank"] == 0)
    assert outcomes(rank0) == (set(chunks) - failing, set(failing))
    # the healthy rank's shards of the failed chunks exist but are not committed (GC's job)
    c = s3_endpoint.client()
    keys = {o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])}
    for cid in failing:
        assert LAYOUT.manifest(NAMESPACE, cid) not in keys
        assert any(k.startswith(LAYOUT.chunk_prefix(NAMESPACE, cid)) for k in keys)


def test_c_slow_rank_never_blocks_fast_rank(s3_endpoint: S3Endpoint, bucket: str) -> None:
    """The slow rank's uploads are gated on an event the fast rank sets only after
    all its submit calls returned: if submit waited for the slow rank, this would
    deadlock and fail; the manifests appear once the slow rank is done."""
    res = run_group(s3_endpoint, bucket, 2, Scenario(name="slow", slow_s=0.3))
    assert len(res) == 2
    slow = next(r for r in res if r["rank"] == 1)
    starts = [e for e in slow["log"] if e[0] == "slow_upload_start"]
    assert len(starts) == len(all_chunks())
    assert all(e[2] for e in starts), "a slow upload began before the fast submits returned"
    found = committed(s3_endpoint, bucket, 2)
    assert sorted(found) == sorted(all_chunks())
    fast = next(r for r in res if r["rank"] == 0)
    committed_events = [e for e in fast["events"] if e[0] == "committed"]
    assert len(committed_events) == len(all_chunks())


def test_d_rank_killed_mid_upload(s3_endpoint: S3Endpoint, bucket: str) -> None:
    chunks = all_chunks()
    sc = Scenario(name="die", die_on_chunk=chunks[2], timeout_s=5.0)
    results, gate = CTX.Queue(), CTX.Event()
    procs = run_group(s3_endpoint, bucket, 2, sc, results, gate, join=False)
    res = collect(procs, results, 1, sc, may_die=frozenset({1}))  # only the survivor reports
    assert [r["rank"] for r in res] == [0]
    assert procs[1].exitcode == 3
    survivor = res[0]
    assert survivor["broken"] is not None, "the survivor must time out cleanly, not hang"
    found = committed(s3_endpoint, bucket, 2)
    # round 0 may or may not have committed before the death; round 1 and 2 must not
    assert not set(found) & set(chunks[2:])
    assert set(found) <= set(chunks[:2])
    ok, failed = outcomes(survivor)
    assert ok == set(found) and failed >= set(chunks[2:])


@pytest.mark.parametrize(("world", "heads"), [(2, 1), (4, 1), (4, 2)])
def test_replicated_heads_are_stored_once(
    s3_endpoint: S3Endpoint, bucket: str, world: int, heads: int
) -> None:
    """Fewer KV heads than ranks (or MLA's one latent): only the lowest rank holding
    a head uploads it; the others join every round empty-handed and never PUT."""
    res = run_group(s3_endpoint, bucket, world, Scenario(num_heads=heads))
    assert len(res) == world and all(r["flushed"] and r["broken"] is None for r in res)
    uploaders = uploading_ranks(heads, world)
    assert len(uploaders) == heads
    found = committed(s3_endpoint, bucket, world, heads)  # one shard per head range
    assert sorted(found) == sorted(all_chunks())
    n = len(all_chunks())
    for r in res:
        if r["rank"] in uploaders:
            assert r["puts"] == n + (n if r["rank"] == 0 else 0)  # shards (+ manifests)
        else:
            assert r["puts"] == 0, r["rank"]
            submits = [e for e in r["log"] if e[0] == "submit_returned"]
            assert len(submits) == 3
    per_head = 2 * 16 * 8 * 2  # the harness's payload: 2 layers x 16 tokens x 8 elements, fp16
    for m in found.values():  # the model's KV bytes once, plus headers
        assert sum(s.size - s.payload_offset for s in m.shards) == heads * per_head


def test_no_manifest_until_the_uploading_ranks_shards_are_stored(
    s3_endpoint: S3Endpoint, bucket: str
) -> None:
    """TP 4 over 2 heads: rank 2 uploads head 1, and its uploads wait until every
    other rank's submits returned; no manifest exists before they are stored."""
    sc = Scenario(name="slow", fault_rank=2, num_heads=2, slow_s=0.3)
    res = run_group(s3_endpoint, bucket, 4, sc)
    assert len(res) == 4
    slow = next(r for r in res if r["rank"] == 2)
    starts = [e for e in slow["log"] if e[0] == "slow_upload_start"]
    assert len(starts) == len(all_chunks()) and all(e[2] for e in starts)
    done = {e[1]: e[2] for e in slow["log"] if e[0] == "slow_upload_done"}
    rank0 = next(r for r in res if r["rank"] == 0)
    commits = [e for e in rank0["events"] if e[0] == "committed"]
    assert len(commits) == len(all_chunks())
    starts_put = [info for name, info in rank0["events"] if name == "committing"]
    assert len(starts_put) == len(all_chunks())
    for info in starts_put:  # the slow rank's shard was stored before its manifest PUT began
        assert done[info["chunk_id"]] < info["t"]
    assert sorted(committed(s3_endpoint, bucket, 4, 2)) == sorted(all_chunks())


def test_gather_peer_that_never_arrives(s3_endpoint: S3Endpoint, bucket: str) -> None:
    """Rank 1 is alive but never gathers: rank 0's submits return at once, its
    gather times out, it writes no manifest, reports every chunk failed and
    keeps trying to re-form the group (saving off meanwhile), cleanly."""
    sc = Scenario(name="absent", timeout_s=3.0)
    results, gate = CTX.Queue(), CTX.Event()
    procs = run_group(s3_endpoint, bucket, 2, sc, results, gate, join=False)
    try:
        res = results.get(timeout=120)
    finally:
        gate.set()  # now the absent rank may go
    collect(procs, results, 0, sc)
    assert res["rank"] == 0
    submits = [e for e in res["log"] if e[0] == "submit_returned"]
    assert len(submits) == sc.rounds  # never waited for the peer
    assert res["broken"] is not None and "gather" in res["broken"]
    assert res["counters"].get("commit_gather_failures", 0) == 1
    assert res["counters"].get("chunks_committed", 0) == 0
    assert res["counters"].get("commit_group_reforms", 0) == 0
    assert res["counters"]["commit_rounds_skipped"] == sc.rounds - 1  # drained while waiting
    assert outcomes(res) == (set(), set(all_chunks()))
    assert committed(s3_endpoint, bucket, 2) == {}
    # rank 0's own shards were stored, named by nothing: orphans for GC
    keys = [o["Key"] for o in s3_endpoint.client().list_objects_v2(
        Bucket=bucket).get("Contents", [])]
    assert sum(k.endswith("/r0") for k in keys) >= len(plan(sc.rounds)[0])


def test_e_two_writer_groups_same_chunks(s3_endpoint: S3Endpoint, bucket: str) -> None:
    results, gate = CTX.Queue(), CTX.Event()
    sa, sb = Scenario(salt="group-a"), Scenario(salt="group-b")
    pa = run_group(s3_endpoint, bucket, 2, sa, results, gate, join=False)
    pb = run_group(s3_endpoint, bucket, 2, sb, results, gate, join=False)
    res = collect(pa + pb, results, 4, sa)
    assert len(res) == 4 and all(r["broken"] is None and r["flushed"] for r in res)
    leaders = [r for r in res if r["rank"] == 0]
    won = sum(r["counters"].get("chunks_committed", 0) for r in leaders)
    lost = sum(r["counters"].get("chunks_already_committed", 0) for r in leaders)
    n = len(all_chunks())
    assert won == n and lost == n, (won, lost)
    found = committed(s3_endpoint, bucket, 2)  # every named shard verifies
    assert sorted(found) == sorted(all_chunks())
    writers = {r["writer"] for r in leaders}
    for m in found.values():
        assert m.writer in writers
        # The winner's own shards, all of one save round.
        uploads = {(k.writer, k.round_id) if k is not None else None
                   for k in (LAYOUT.parse(s.key) for s in m.shards)}
        assert len(uploads) == 1 and uploads <= {(m.writer, r) for r in range(sa.rounds)}


def test_resave_never_replaces_committed_shards(s3_endpoint: S3Endpoint, bucket: str) -> None:
    """Every chunk is committed, then saved again by the same group (recomputed,
    not bit-identical) in later rounds: the re-saves go to keys of their own, the
    manifests still name the first saves, and every named shard still verifies
    (before unique keys, the re-save replaced them and verification failed)."""
    sc = Scenario(rounds=1, resave_salt="recomputed")
    res = run_group(s3_endpoint, bucket, 2, sc)
    assert len(res) == 2 and all(r["flushed"] and r["broken"] is None for r in res)
    n = len(all_chunks(sc.rounds))
    rank0 = next(r for r in res if r["rank"] == 0)
    assert rank0["counters"]["chunks_committed"] == n
    assert rank0["counters"]["chunks_already_committed"] == n
    assert all(r["counters"].get("upload_failures", 0) == 0 for r in res)
    found = committed(s3_endpoint, bucket, 2)  # every named shard verifies
    assert sorted(found) == sorted(all_chunks(sc.rounds))
    named = set()
    for m in found.values():
        uploads = {(k.writer, k.round_id) if k is not None else None
                   for k in (LAYOUT.parse(s.key) for s in m.shards)}
        assert len(uploads) == 1 and uploads <= {(m.writer, r) for r in range(sc.rounds)}
        named |= {s.key for s in m.shards}
    keys = {o["Key"] for o in s3_endpoint.client().list_objects_v2(
        Bucket=bucket).get("Contents", [])}
    shards = {k for k in keys if not k.endswith("manifest.json")}
    assert len(shards) == 2 * len(named) == 2 * 2 * n  # re-saves: orphans beside them


def test_reader_rejects_tampered_shard(s3_endpoint: S3Endpoint, bucket: str) -> None:
    run_group(s3_endpoint, bucket, 2, Scenario(rounds=1))
    found = committed(s3_endpoint, bucket, 2)
    m = next(iter(found.values()))
    c = s3_endpoint.client()
    key = m.shards[1].key
    body = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-1] ^= 0x01
    c.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    async def read() -> None:
        store = await open_store(StoreSettings(bucket=bucket, endpoint_url=s3_endpoint.url))
        try:
            await read_shard(store, m, m.shard_for_rank(0))  # rank 0 still fine
            with pytest.raises(IntegrityError):
                await read_shard(store, m, m.shard_for_rank(1))
        finally:
            await store.close()

    asyncio.run(read())
