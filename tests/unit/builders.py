"""Real shards and manifests for the unit tests, built with the library's own code."""

from __future__ import annotations

from dataclasses import dataclass

from s3kv.keys import KeyLayout, chain_chunk_ids
from s3kv.manifest import Manifest, ShardEntry, new_manifest
from s3kv.shard import ShardSpec, allocate, compute_checksums

LAYOUT = KeyLayout("s3kv")
NS = "0f" * 16
CIDS = chain_chunk_ids(list(range(1024)), 256)
WRITER = "writer-1"
LAYERS = ("model.layers.0.attn", "model.layers.1.attn", "model.layers.2.attn")


def pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that differ for every ``seed`` and do not repeat within 251 bytes."""
    return bytes((i * 7 + seed * 13 + 1) % 251 for i in range(n))


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


def build_shard(spec: ShardSpec, seed: int) -> tuple[bytes, int]:
    buf, payload = allocate(spec)
    payload[:] = pattern(len(payload), seed)
    return bytes(buf), len(buf) - len(payload)


def entry_for(key: str, spec: ShardSpec, data: bytes, payload_offset: int) -> ShardEntry:
    sums = compute_checksums(data, payload_offset, spec.num_heads)
    return ShardEntry(
        rank=spec.rank,
        key=key,
        size=len(data),
        checksum=sums.shard,
        head_start=spec.head_start,
        head_end=spec.head_end,
        payload_offset=payload_offset,
        head_checksums=sums.heads,
    )


def build_chunk(
    index: int = 0,
    *,
    tp: int = 2,
    heads_per_rank: int = 4,
    num_blocks: int = 2,
    block_shape: tuple[int, ...] = (4, 8),
    dtype: str = "float16",
) -> Chunk:
    cid = CIDS[index]
    shards: dict[int, bytes] = {}
    specs: dict[int, ShardSpec] = {}
    entries = []
    for rank in range(tp):
        spec = ShardSpec(
            chunk_id=cid,
            rank=rank,
            dtype=dtype,
            head_start=rank * heads_per_rank,
            head_end=(rank + 1) * heads_per_rank,
            layer_names=LAYERS,
            num_blocks=num_blocks,
            block_shape=block_shape,
        )
        data, off = build_shard(spec, seed=index * 100 + rank)
        shards[rank], specs[rank] = data, spec
        entries.append(entry_for(LAYOUT.shard(NS, cid, WRITER, rank), spec, data, off))
    manifest = new_manifest(
        namespace=NS,
        chunk_id=cid,
        parent_id=CIDS[index - 1] if index else None,
        chunk_index=index,
        num_tokens=256,
        writer=WRITER,
        shards=entries[::-1],  # new_manifest must order them by rank
    )
    return Chunk(manifest, shards, specs)
