"""The commit group survives a failed gather, and engines' groups are independent.

Real GLOO groups in spawned processes, a real HTTP S3 server; what is
committed is read back from the bucket through the verifying reader.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest

from tests.commit.harness import NAMESPACE, Scenario, dp_worker, free_port, plan
from tests.commit.test_commit_multiprocess import CTX, committed, outcomes, run_group
from tests.s3server import S3Endpoint

pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.slow


def chunks_of(rounds: list[int], total: int) -> set[str]:
    steps = plan(total)
    return {cid for r in rounds for cid, _, _ in steps[r]}


def test_gather_timeout_is_survived_and_saving_resumes(
    s3_endpoint: S3Endpoint, bucket: str
) -> None:
    """Rank 1's committer holds before the gather of round 1 until rank 0 has
    given up on it (gather timeout, 2 s) and reported it failed; then rank 1
    finds the group gone, both re-form it, and the rounds saved after that
    commit. Round 2 was queued during the failure: it commits or fails, but is
    reported exactly once like every other chunk."""
    sc = Scenario(name="stall", stall_round=1, rounds=3, after_rounds=2, timeout_s=2.0)
    t0 = time.monotonic()
    res = run_group(s3_endpoint, bucket, 2, sc)
    elapsed = time.monotonic() - t0
    assert len(res) == 2
    rank0 = next(r for r in res if r["rank"] == 0)
    rank1 = next(r for r in res if r["rank"] == 1)
    total = sc.rounds + sc.after_rounds

    # Rank 1 was released only after rank 0 reported the round failed.
    broke = [info for name, info in rank0["events"] if name == "broken"]
    assert len(broke) == 1 and broke[0]["round_id"] == 1 and "gather" in broke[0]["error"]
    released = [e for e in rank1["log"] if e[0] == "released"]
    assert len(released) == 1 and released[0][1] is True
    assert broke[0]["t"] < released[0][2]

    # Both re-formed once, are healthy, and saved the later rounds after re-forming.
    for r in res:
        assert r["broken"] is None and r["flushed"], r["rank"]
        assert r["counters"]["commit_group_reforms"] == 1 and r["reforms"] == 1, r["rank"]
        assert ("reformed_before_after_rounds", True) in r["log"], r["rank"]
    assert rank0["counters"]["commit_gather_failures"] == 1

    ok, failed = outcomes(rank0)
    assert chunks_of([1], total) <= failed
    assert chunks_of([0, 3, 4], total) <= ok
    assert ok | failed == chunks_of(list(range(total)), total)
    found = committed(s3_endpoint, bucket, 2)  # every named shard verifies
    assert set(found) == ok
    assert rank0["counters"]["chunks_committed"] == len(ok)
    assert elapsed < 30, elapsed


def _reports(results: Any, procs: list[Any], n: int, timeout: float) -> list[dict[str, Any]]:
    """``n`` reports; a rank process that exits with an error fails the test at once."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(out)} of {n} reports arrived")
        try:
            out.append(results.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        crashed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if crashed:
            pytest.fail(f"rank processes exited with errors (index, exit code): {crashed}")
    return out


def test_data_parallel_engines_form_their_commit_groups_independently(
    s3_endpoint: S3Endpoint, bucket: str
) -> None:
    """vLLM puts every DP engine's ranks into one default group (4 processes here:
    2 engines x TP=2). Engine 0 forms its commit group and commits while engine
    1's ranks have not even started forming theirs; then engine 1 forms its
    own, later, and commits too. (With ``new_group`` both engines' groups get
    the same name, so the same store keys: engine 1's times out connecting to
    engine 0's addresses, and a collective of the whole default group would
    hang engine 0.)"""
    tp, engines = 2, 2
    namespaces = [NAMESPACE, "fedcba9876543210fedcba9876543210"]
    results, go, done = CTX.Queue(), CTX.Event(), CTX.Event()
    port = free_port()
    procs = [CTX.Process(target=dp_worker, args=(g, tp, engines, port, s3_endpoint.url, bucket,
                                                  namespaces, results, go, done))
             for g in range(engines * tp)]
    for p in procs:
        p.start()
    try:
        first = _reports(results, procs, tp, 120)
        go.set()  # only now may engine 1 form its group
        second = _reports(results, procs, tp, 120)
    finally:
        go.set()
        done.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert sorted(r["grank"] for r in first) == [0, 1]
    assert sorted(r["grank"] for r in second) == [2, 3]
    assert [p.exitcode for p in procs] == [0] * len(procs)
    every = {cid for rnd in plan(2) for cid, _, _ in rnd}
    for engine, reports in enumerate((first, second)):
        assert all(r["engine"] == engine and r["flushed"] and r["broken"] is None
                   for r in reports)
        leader = next(r for r in reports if r["rank"] == 0)
        assert outcomes(leader) == (every, set())
        assert leader["counters"]["chunks_committed"] == len(every)
        found = committed(s3_endpoint, bucket, tp, namespace=namespaces[engine])
        assert set(found) == every
        assert {m.writer for m in found.values()} == {leader["writer"]}
