"""Real shards and manifests for the unit tests, built with the library's own code."""

from __future__ import annotations

from dataclasses import dataclass

from s3kv.heads import uploading_ranks
from s3kv.keys import KeyLayout, chain_chunk_ids, new_writer_id
from s3kv.manifest import Manifest, ShardEntry, new_manifest
from s3kv.shard import PayloadLayout, ShardSpec, allocate, seal

LAYOUT = KeyLayout("s3kv")
NS = "0f" * 16
CIDS = chain_chunk_ids(list(range(1024)), 256)
WRITER = "writer-1"  # plus the writer TP size: tp<N>-writer-1
LAYERS = ("model.layers.0.attn", "model.layers.1.attn", "model.layers.2.attn")
# One head of one chunk: 3 layers x 8 tokens x 16 elements (2 x head size 8), fp16.
PAYLOAD = PayloadLayout("float16", LAYERS, 8, 16)


def pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that differ for every ``seed`` and do not repeat within 251 bytes."""
    return bytes((i * 7 + seed * 13 + 1) % 251 for i in range(n))


def head_pattern(head: int, payload: PayloadLayout = PAYLOAD, index: int = 0) -> bytes:
    """The bytes of one (global) KV head of chunk ``index``, whichever shard holds it."""
    return pattern(payload.head_bytes, seed=index * 1000 + head)


@dataclass(frozen=True)
class Chunk:
    manifest: Manifest
    shards: dict[int, bytes]  # rank -> whole shard object
    specs: dict[int, ShardSpec]

    def payload(self, rank: int) -> bytes:
        entry = self.manifest.shard_for_rank(rank)
        return self.shards[rank][entry.payload_offset :]

    def head_bytes(self, rank: int, head: int) -> bytes:
        """The bytes of one global head index within its rank's shard."""
        entry = self.manifest.shard_for_rank(rank)
        per = entry.head_bytes
        i = head - entry.head_start
        return self.payload(rank)[i * per : (i + 1) * per]


def build_shard(spec: ShardSpec, index: int = 0) -> bytes:
    """A whole shard whose every head holds :func:`head_pattern` of that head."""
    buf, payload = allocate(spec)
    per = spec.head_bytes
    for i, head in enumerate(range(spec.head_start, spec.head_end)):
        payload[i * per : (i + 1) * per] = head_pattern(head, spec.layout, index)
    return bytes(buf)


def build_chunk(
    index: int = 0,
    *,
    tp: int = 2,
    heads_per_rank: int = 4,
    num_heads: int | None = None,
    payload: PayloadLayout = PAYLOAD,
    ranges: dict[int, tuple[int, int]] | None = None,
) -> Chunk:
    """A committed chunk written at TP ``tp``: ``num_heads`` heads (default
    ``tp * heads_per_rank``) split as the worker side splits them, or as
    ``ranges`` (rank -> head range) says."""
    cid = CIDS[index]
    writer = new_writer_id(tp, WRITER)
    heads = num_heads if num_heads is not None else tp * heads_per_rank
    if ranges is None:
        ranges = {r: (r * heads_per_rank, (r + 1) * heads_per_rank) for r in range(tp)} \
            if num_heads is None else uploading_ranks(heads, tp)
    shards: dict[int, bytes] = {}
    specs: dict[int, ShardSpec] = {}
    entries: list[ShardEntry] = []
    for rank, (lo, hi) in ranges.items():
        spec = ShardSpec(chunk_id=cid, rank=rank, head_start=lo, head_end=hi, layout=payload)
        data = build_shard(spec, index)
        shards[rank], specs[rank] = data, spec
        entries.append(seal(data, LAYOUT.shard(NS, cid, writer, rank)))
    manifest = new_manifest(
        namespace=NS,
        chunk_id=cid,
        parent_id=CIDS[index - 1] if index else None,
        chunk_index=index,
        num_tokens=256,
        writer=writer,
        shards=entries[::-1],  # new_manifest must order them by head range
        tp_size=tp,
    )
    return Chunk(manifest, shards, specs)
