"""Fetch and verify shards named by a manifest.

Every byte handed back has been checked against the manifest: size, shard
checksum (whole reads) or per-head checksums (head-range reads), and the
header's own claims (chunk, rank, heads). Any deviation is one exception
type, :class:`~s3kv.errors.IntegrityError`, which callers turn into a
recompute; a missing shard is reported the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from s3kv.errors import IntegrityError, InvalidRange, NotFound
from s3kv.manifest import Manifest, ShardEntry
from s3kv.shard import ShardSpec, compute_checksums, parse_header, verify_heads
from s3kv.store.protocol import Get


@dataclass(frozen=True)
class VerifiedShard:
    spec: ShardSpec
    payload: memoryview  # head-major bytes, zero-copy view of the fetched body
    size: int


def _check_spec(spec: ShardSpec, manifest: Manifest, entry: ShardEntry) -> None:
    if spec.chunk_id != manifest.chunk_id or spec.rank != entry.rank:
        raise IntegrityError(
            f"shard {entry.key} header names chunk {spec.chunk_id[:12]} rank {spec.rank}"
        )
    if (spec.head_start, spec.head_end) != (entry.head_start, entry.head_end):
        raise IntegrityError(f"shard {entry.key} header heads differ from the manifest")


async def read_shard(store: Get, manifest: Manifest, rank: int) -> VerifiedShard:
    """Fetch one rank's whole shard and verify it; raises IntegrityError."""
    entry = manifest.shard_for_rank(rank)
    try:
        body = await store.get(entry.key)
    except NotFound:
        raise IntegrityError(f"shard {entry.key} named by the manifest is missing") from None
    if len(body) != entry.size:
        raise IntegrityError(f"shard {entry.key} is {len(body)} bytes, manifest says {entry.size}")
    spec, off = parse_header(body)
    if off != entry.payload_offset:
        raise IntegrityError(f"shard {entry.key} payload offset {off} != {entry.payload_offset}")
    _check_spec(spec, manifest, entry)
    sums = compute_checksums(body, off, spec.num_heads)
    if sums.shard != entry.checksum or sums.heads != entry.head_checksums:
        raise IntegrityError(f"shard {entry.key} fails its checksum")
    return VerifiedShard(spec, body[off:], entry.size)


async def read_head_range(
    store: Get, manifest: Manifest, rank: int, head_start: int, head_end: int
) -> memoryview:
    """Fetch heads ``[head_start, head_end)`` of one shard with a single ranged GET."""
    entry = manifest.shard_for_rank(rank)
    if not entry.head_start <= head_start < head_end <= entry.head_end:
        raise IntegrityError(
            f"heads [{head_start},{head_end}) not inside shard heads "
            f"[{entry.head_start},{entry.head_end})"
        )
    per = entry.head_bytes
    lo = entry.payload_offset + (head_start - entry.head_start) * per
    hi = lo + (head_end - head_start) * per
    try:
        body = await store.get_range(entry.key, lo, hi)
    except NotFound:
        raise IntegrityError(f"shard {entry.key} named by the manifest is missing") from None
    except InvalidRange:
        raise IntegrityError(f"shard {entry.key} is shorter than the manifest says") from None
    if len(body) != hi - lo:
        raise IntegrityError(f"ranged read of {entry.key} returned {len(body)} of {hi - lo} bytes")
    i0, i1 = head_start - entry.head_start, head_end - entry.head_start
    verify_heads(body, entry.head_checksums[i0:i1])
    return body
