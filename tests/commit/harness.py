"""Multi-process commit harness: real ``torch.distributed`` GLOO groups, each
rank a spawned process, writing to a real HTTP S3 server.

Each scenario is a small fault wrapper around the store (or the gather) on
one rank; the worker reports the events it saw, and rank 0 the outcomes
``Committer.take_outcomes`` gave, back to the test through a queue.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from s3kv.errors import Unavailable

NAMESPACE = "0123456789abcdef0123456789abcdef"
PREFIX = "s3kv"
HEADS_PER_RANK = 2


def _payload() -> Any:
    from s3kv.shard import PayloadLayout

    # One head of one 16-token chunk: two layers, 8 elements per token, fp16.
    return PayloadLayout("float16", ("l0", "l1"), 16, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Step = tuple[str, str | None, int]  # (chunk_id, parent_id, index)


def plan(rounds: int = 3, per_round: int = 2, chunk_tokens: int = 16) -> list[list[Step]]:
    """Rounds of (chunk_id, parent_id, index) over one token sequence."""
    from s3kv.keys import chain_chunk_ids

    ids = chain_chunk_ids(list(range(rounds * per_round * chunk_tokens)), chunk_tokens)
    out: list[list[Step]] = []
    for r in range(rounds):
        out.append([
            (ids[i], ids[i - 1] if i else None, i)
            for i in range(r * per_round, (r + 1) * per_round)
        ])
    return out


def shard_bytes_seed(chunk_id: str, rank: int, salt: str) -> int:
    return hash((chunk_id, rank, salt)) & 0xFFFFFFFF


@dataclass
class Scenario:
    name: str = "normal"
    fault_rank: int = 1
    fail_chunks: frozenset[str] = frozenset()
    die_on_chunk: str | None = None
    slow_s: float = 0.0
    salt: str = "a"
    timeout_s: float = 30.0
    rounds: int = 3
    num_heads: int | None = None  # the model's KV heads; default HEADS_PER_RANK per rank
    # Save every chunk again, recomputed with this salt, in as many later rounds
    # (as an engine whose memory of committed chunks has forgotten them).
    resave_salt: str | None = None
    # fault_rank's committer holds before the gather of this round until rank 0's
    # group has broken (rank 0 sets the gate when it reports the failure).
    stall_round: int | None = None
    # Rounds each rank saves once its group has re-formed, after the first ones.
    after_rounds: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def heads(self, world: int) -> int:
        return self.num_heads if self.num_heads is not None else world * HEADS_PER_RANK


class FaultyStore:
    """Delegates to a real store; injects the scenario's fault on one rank."""

    def __init__(self, inner: Any, rank: int, sc: Scenario, gate: Any,
                 log: list[tuple[Any, ...]]) -> None:
        self._inner = inner
        self._rank = rank
        self._sc = sc
        self._gate = gate
        self._log = log
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put(self, key: str, data: Any, *, mode: str = "overwrite") -> Any:
        self.puts += 1
        faulty = self._rank == self._sc.fault_rank and not key.endswith("manifest.json")
        if faulty:
            cid = key.split("/")[3]
            if cid in self._sc.fail_chunks:
                raise Unavailable("injected upload failure", key=key)
            if self._sc.die_on_chunk == cid:
                os._exit(3)  # the rank dies mid-upload
            if self._gate is not None:
                loop = asyncio.get_running_loop()
                was_set = await loop.run_in_executor(None, self._gate.wait, 60)
                self._log.append(("slow_upload_start", cid, bool(was_set)))
            if self._sc.slow_s:
                await asyncio.sleep(self._sc.slow_s)  # simulated slow S3, not synchronisation
        result = await self._inner.put(key, data, mode=mode)
        if faulty:
            self._log.append(("slow_upload_done", key.split("/")[3], time.monotonic()))
        return result


class StallingGatherer:
    """The real gatherer, except that the gather of one round first waits for ``gate``."""

    def __init__(self, inner: Any, round_id: int, gate: Any, log: list[tuple[Any, ...]]) -> None:
        self._inner = inner
        self._round_id = round_id
        self._gate = gate
        self._log = log
        self.rank = inner.rank
        self.world_size = inner.world_size

    def gather(self, obj: Any) -> list[Any] | None:
        if getattr(obj, "round_id", None) == self._round_id:
            self._log.append(("stalled", self._round_id, time.monotonic()))
            released = self._gate.wait(60)
            self._log.append(("released", bool(released), time.monotonic()))
        out: list[Any] | None = self._inner.gather(obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        return self._inner.broadcast(obj)

    def reform(self, wait_s: float) -> None:
        self._inner.reform(wait_s)


def _env() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def _saves(rank: int, world: int, sc: Scenario, chunks: list[Step], salt: str) -> list[Any]:
    """This rank's shards of one round's chunks (placeholders where a lower rank uploads)."""
    from s3kv.commit import ChunkSave
    from s3kv.heads import head_range, uploads_heads
    from s3kv.keys import ChunkRef
    from s3kv.shard import ShardSpec, allocate

    heads = sc.heads(world)
    lo, hi = head_range(heads, rank, world)
    saves = []
    for cid, parent, idx in chunks:
        ref = ChunkRef(cid, parent, idx, 16)
        if not uploads_heads(heads, rank, world):  # a lower rank stores these heads
            saves.append(ChunkSave(ref, None))
            continue
        spec = ShardSpec(cid, rank, lo, hi, _payload())
        buf, payload = allocate(spec)
        payload[:] = random.Random(shard_bytes_seed(cid, rank, salt)).randbytes(len(payload))
        saves.append(ChunkSave(ref, buf))
    return saves


def _report(results: Any, committer: Any, rank: int, **extra: Any) -> None:
    committed, failed = committer.take_outcomes()
    results.put(dict(extra, rank=rank, broken=committer.broken, reforms=committer.reforms,
                     counters=committer.counters.snapshot(),
                     outcomes={"committed": list(committed), "failed": list(failed)}))


def worker(
    rank: int, world: int, port: int, endpoint: str, bucket: str, sc: Scenario,
    results: Any, gate: Any,
) -> None:
    _env()
    import torch.distributed as dist

    from s3kv.aio import LoopThread
    from s3kv.commit import Committer
    from s3kv.config import StoreSettings
    from s3kv.keys import KeyLayout, new_writer_id
    from s3kv.store import open_store
    from s3kv.vllm.gather import GlooGatherer

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=sc.timeout_s),
    )
    log: list[tuple[Any, ...]] = []
    gatherer: Any = GlooGatherer(list(range(world)), sc.timeout_s)
    if sc.stall_round is not None and rank == sc.fault_rank:
        gatherer = StallingGatherer(gatherer, sc.stall_round, gate, log)
    io = LoopThread()
    inner = io.run(open_store(StoreSettings(bucket=bucket, endpoint_url=endpoint)))
    store = FaultyStore(inner, rank, sc, gate if sc.name == "slow" else None, log)
    writer = gatherer.broadcast(new_writer_id(world, uuid.uuid4().hex[:12]) if rank == 0 else None)
    events: list[tuple[str, dict[str, Any]]] = []
    reformed = threading.Event()

    def on_event(name: str, info: dict[str, Any]) -> None:
        events.append((name, dict(info, t=time.monotonic())))
        if name == "broken" and rank == 0 and sc.stall_round is not None:
            gate.set()  # rank 0 has given up on the stalled round: release the staller
        if name == "reformed":
            reformed.set()

    committer = Committer(
        io=io, store=store, layout=KeyLayout(PREFIX), namespace=NAMESPACE, writer_id=writer,
        gatherer=gatherer, max_inflight_bytes=64 << 20, num_heads=sc.heads(world),
        on_event=on_event,
    )
    if sc.name == "absent" and rank == sc.fault_rank:
        # Alive and connected, but never joins a gather: hold until the test
        # has the survivor's report, then leave without reporting.
        gate.wait(sc.timeout_s * 6 + 60)
        os._exit(0)
    steps = plan(sc.rounds + sc.after_rounds)
    rounds = list(enumerate(steps[: sc.rounds]))
    salts = [sc.salt] * len(rounds)
    if sc.resave_salt is not None:
        rounds += [(len(rounds) + i, chunks) for i, chunks in rounds]
        salts += [sc.resave_salt] * len(salts)
    rounds += [(sc.rounds + i, chunks) for i, chunks in enumerate(steps[sc.rounds:])]
    salts += [sc.salt] * sc.after_rounds
    submitted: list[str] = []
    for (round_id, chunks), salt in zip(rounds, salts, strict=True):
        if sc.resave_salt is not None and round_id == sc.rounds:
            # The first saves are committed before any re-save starts.
            committer.flush(sc.timeout_s * 3)
        if sc.after_rounds and round_id == sc.rounds:
            log.append(("reformed_before_after_rounds", reformed.wait(60)))
        committer.submit(round_id, _saves(rank, world, sc, chunks, salt))
        submitted += [cid for cid, _, _ in chunks]
        log.append(("submit_returned", round_id, time.monotonic()))
    if sc.name == "slow" and rank != sc.fault_rank:
        gate.set()  # only now may the slow rank's uploads proceed
    flushed = committer.flush(sc.timeout_s * 3)
    _report(results, committer, rank, salt=sc.salt, writer=writer, log=log, events=events,
            puts=store.puts, flushed=flushed, submitted=submitted)
    results.close()
    results.join_thread()
    os._exit(0)  # skip process-group teardown, which can block on a dead peer


def dp_worker(
    grank: int, tp: int, engines: int, port: int, endpoint: str, bucket: str,
    namespaces: list[str], results: Any, go: Any, done: Any,
) -> None:
    """One rank of ``engines`` data-parallel engines of ``tp`` ranks each, all in one
    default process group, as vLLM puts them: each engine forms its own commit
    group, engine 1 only once ``go`` is set (after engine 0 has committed)."""
    _env()
    import torch.distributed as dist

    from s3kv.aio import LoopThread
    from s3kv.commit import Committer
    from s3kv.config import StoreSettings
    from s3kv.keys import KeyLayout, new_writer_id
    from s3kv.store import open_store
    from s3kv.vllm.gather import GlooGatherer

    sc = Scenario(timeout_s=10.0, rounds=2)
    engine, rank = divmod(grank, tp)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=grank, world_size=engines * tp,
        timeout=timedelta(seconds=60),
    )
    if engine > 0:
        go.wait(120)
    gatherer = GlooGatherer([engine * tp + r for r in range(tp)], sc.timeout_s)
    io = LoopThread()
    store = io.run(open_store(StoreSettings(bucket=bucket, endpoint_url=endpoint)))
    writer = gatherer.broadcast(new_writer_id(tp, uuid.uuid4().hex[:12]) if rank == 0 else None)
    committer = Committer(
        io=io, store=store, layout=KeyLayout(PREFIX), namespace=namespaces[engine],
        writer_id=writer, gatherer=gatherer, max_inflight_bytes=64 << 20,
        num_heads=sc.heads(tp),
    )
    submitted: list[str] = []
    for round_id, chunks in enumerate(plan(sc.rounds)):
        committer.submit(round_id, _saves(rank, tp, sc, chunks, f"engine-{engine}"))
        submitted += [cid for cid, _, _ in chunks]
    flushed = committer.flush(sc.timeout_s * 3)
    _report(results, committer, rank, engine=engine, grank=grank, flushed=flushed,
            submitted=submitted, writer=writer)
    done.wait(120)  # global rank 0 hosts the default group's store: stay until all reported
    results.close()
    results.join_thread()
    os._exit(0)
