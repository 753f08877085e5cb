"""Multi-process commit harness: real ``torch.distributed`` GLOO groups, each
rank a spawned process, writing to a real HTTP S3 server.

Each scenario is a small fault wrapper around the store on one rank; the
worker reports the events it saw back to the test through a queue.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
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


def worker(
    rank: int, world: int, port: int, endpoint: str, bucket: str, sc: Scenario,
    results: Any, gate: Any,
) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import torch.distributed as dist

    from s3kv.aio import LoopThread
    from s3kv.commit import ChunkSave, Committer
    from s3kv.config import StoreSettings
    from s3kv.heads import head_range, uploads_heads
    from s3kv.keys import ChunkRef, KeyLayout, new_writer_id
    from s3kv.shard import ShardSpec, allocate
    from s3kv.store import open_store
    from s3kv.vllm.gather import GlooGatherer

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=sc.timeout_s),
    )
    gatherer = GlooGatherer(list(range(world)), sc.timeout_s)
    io = LoopThread()
    inner = io.run(open_store(StoreSettings(bucket=bucket, endpoint_url=endpoint)))
    log: list[tuple[Any, ...]] = []
    store = FaultyStore(inner, rank, sc, gate if sc.name == "slow" else None, log)
    writer = gatherer.broadcast(new_writer_id(world, uuid.uuid4().hex[:12]) if rank == 0 else None)
    heads = sc.heads(world)
    lo, hi = head_range(heads, rank, world)
    uploads = uploads_heads(heads, rank, world)
    events: list[tuple[str, dict[str, Any]]] = []
    committer = Committer(
        io=io, store=store, layout=KeyLayout(PREFIX), namespace=NAMESPACE, writer_id=writer,
        gatherer=gatherer, max_inflight_bytes=64 << 20, num_heads=heads,
        on_event=lambda name, info: events.append((name, dict(info, t=time.monotonic()))),
    )
    if sc.name == "absent" and rank == sc.fault_rank:
        # Alive and connected, but never joins a gather: hold until the test
        # has the survivor's report, then leave without reporting.
        gate.wait(sc.timeout_s * 6 + 60)
        os._exit(0)
    rounds = list(enumerate(plan(sc.rounds)))
    salts = [sc.salt] * len(rounds)
    if sc.resave_salt is not None:
        rounds += [(len(rounds) + i, chunks) for i, chunks in rounds]
        salts += [sc.resave_salt] * len(salts)
    for (round_id, chunks), salt in zip(rounds, salts, strict=True):
        saves = []
        for cid, parent, idx in chunks:
            ref = ChunkRef(cid, parent, idx, 16)
            if not uploads:  # a lower rank stores these heads: join empty-handed
                saves.append(ChunkSave(ref, None))
                continue
            spec = ShardSpec(cid, rank, lo, hi, _payload())
            buf, payload = allocate(spec)
            payload[:] = random.Random(shard_bytes_seed(cid, rank, salt)).randbytes(len(payload))
            saves.append(ChunkSave(ref, buf))
        if sc.resave_salt is not None and round_id == sc.rounds:
            # The first saves are committed before any re-save starts.
            committer.flush(sc.timeout_s * 3)
        committer.submit(round_id, saves)
        log.append(("submit_returned", round_id, time.monotonic()))
    if sc.name == "slow" and rank != sc.fault_rank:
        gate.set()  # only now may the slow rank's uploads proceed
    flushed = committer.flush(sc.timeout_s * 3)
    results.put({
        "rank": rank, "salt": sc.salt, "writer": writer, "log": log, "events": events,
        "puts": store.puts,
        "flushed": flushed, "broken": committer.broken,
        "counters": committer.counters.snapshot(),
    })
    results.close()
    results.join_thread()
    os._exit(0)  # skip process-group teardown, which can block on a dead peer
