"""Save path of the worker side: a step's full chunks out of the KV cache, to the committer.

vLLM calls ``wait_for_save`` once per step, after launching the step's
forward pass; what it launches next is the following step's forward, which
may write new KV into the very blocks being saved (the scheduler frees them
and hands them to another request). vLLM's own hooks give no point in
between: without synchronous loads, ``start_load_kv`` of the next step comes
only after that forward is launched (``KVConnectorModelRunnerMixin.
_get_kv_connector_output`` in ``vllm/v1/worker/kv_connector_model_runner_mixin.py``,
and ``KVConnector.post_forward`` in the model runner v2's
``vllm/v1/worker/gpu/kv_connector.py``), and s3kv's loads are never
synchronous.

So every read of the KV cache happens on the stream the forward runs on
(the current stream when ``wait_for_save`` is called): the gather into a
device staging buffer is queued before anything launched later on that
stream, whatever order the hooks come in. Only the device-to-host copy out
of that private buffer runs on a side stream, so the forward never waits
for PCIe. Neither part makes the host wait for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from s3kv.commit import ChunkSave, Committer
from s3kv.shard import PayloadLayout, ShardSpec, encode_header
from s3kv.vllm.metadata import S3KVMetadata
from s3kv.vllm.state_layout import GroupCache


class CopyOut:
    """Chunks from the KV cache into host buffers: the gather on the current
    stream, the device-to-host copy on a side stream (on CPU both inline)."""

    def __init__(self, kv: GroupCache) -> None:
        self.kv = kv
        self.side: torch.cuda.Stream | None = (
            torch.cuda.Stream(device=kv.device) if kv.device.type == "cuda" else None)

    def start(self, chunks: Sequence[Sequence[int]], dsts: Sequence[torch.Tensor]
              ) -> Callable[[], None] | None:
        """Queue the copies of ``chunks`` into ``dsts`` (pinned on GPU); returns a
        blocking wait for them to land (None when they already have)."""
        gathered = self.kv.gather(chunks)
        sizes = [len(c) for c in chunks]
        if self.side is None:
            self.kv.unpack(gathered, sizes, dsts)
            return None
        side = self.side
        side.wait_stream(torch.cuda.current_stream(self.kv.device))
        # The staging buffer was allocated on the current stream; once this
        # function drops it, the allocator would hand its memory to the next
        # forward at once. record_stream keeps it out of reuse until the work
        # the side stream has queued when it is dropped (the copies below) has
        # run, without a host wait.
        gathered.record_stream(side)
        with torch.cuda.stream(side):
            self.kv.unpack(gathered, sizes, dsts)
            done = torch.cuda.Event()
            done.record(side)
        return done.synchronize


class Saver:
    """Builds each step's shards (header + payload) and hands them to the committer.

    ``kvs``: one view of the KV cache per KV cache group, in the group order
    of ``payload`` (each group is a section of the payload; a state group's
    view is a ``StateBlocks``). ``heads`` is this
    rank's KV head range; ``uploads`` False when a lower rank stores the same
    heads (the rank still joins every round, empty-handed).
    """

    def __init__(self, kvs: Sequence[GroupCache], payload: PayloadLayout, committer: Committer,
                 tp_rank: int, heads: tuple[int, int], uploads: bool) -> None:
        self.kvs = list(kvs)
        self.payload = payload
        self.committer = committer
        self.tp_rank = tp_rank
        self.heads = heads
        self.uploads = uploads
        self.copies = [CopyOut(kv) for kv in self.kvs]

    def save(self, meta: S3KVMetadata) -> None:
        if not meta.saves:
            return
        if not self.uploads:
            self.committer.submit(meta.round_id, [ChunkSave(s.ref, None) for s in meta.saves])
            return
        n_heads = self.heads[1] - self.heads[0]
        specs = [ShardSpec(s.ref.chunk_id, self.tp_rank, self.heads[0], self.heads[1],
                           self.payload, s.starts) for s in meta.saves]
        headers = [encode_header(sp) for sp in specs]
        sizes = [len(h) + sp.payload_bytes for h, sp in zip(headers, specs, strict=True)]
        if not self.committer.try_reserve(sum(sizes)):
            self.committer.submit_dropped(meta.round_id, [s.ref for s in meta.saves])
            return
        pinned = self.copies[0].side is not None
        bufs = []
        dsts: list[list[torch.Tensor]] = [[] for _ in self.kvs]  # per group, per save
        for s, spec, header, total in zip(meta.saves, specs, headers, sizes, strict=True):
            host = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)
            mv = host.numpy().data
            mv[: len(header)] = header
            payload = host[len(header):]
            for g, (lo, hi) in enumerate(spec.section_bounds()):
                dsts[g].append(self.kvs[g].payload_view(payload[lo:hi], n_heads,
                                                        len(s.block_ids[g])))
            bufs.append(mv)
        waits = [copy.start([s.block_ids[g] for s in meta.saves], dsts[g])
                 for g, copy in enumerate(self.copies)
                 if any(s.block_ids[g] for s in meta.saves)]
        wait = _all([w for w in waits if w is not None])
        saves = [ChunkSave(s.ref, mv, wait) for s, mv in zip(meta.saves, bufs, strict=True)]
        self.committer.submit(meta.round_id, saves, reserved=True)


def _all(waits: list[Callable[[], None]]) -> Callable[[], None] | None:
    if not waits:
        return None
    if len(waits) == 1:
        return waits[0]

    def wait() -> None:
        for w in waits:
            w()
    return wait
