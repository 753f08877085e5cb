"""Fetch the KV heads a reader needs from the shards a manifest names.

The writer's TP size need not be the reader's: a reader computes the head
range it holds and :func:`plan_reads` picks the fewest reads over the
manifest's shards, a whole shard where the ranges match and one ranged GET
per overlapping shard otherwise. Every byte handed back has been verified
(``s3kv.shard``): whole shards against their size, header and checksums,
head ranges against their per-head checksums, and both against the reader's
own payload layout. Any deviation, or a missing shard, is one exception
type, :class:`~s3kv.errors.IntegrityError`, which callers turn into a
recompute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from s3kv.errors import IntegrityError, InvalidRange, NotFound
from s3kv.manifest import Manifest, ShardEntry
from s3kv.shard import (
    PayloadLayout,
    ShardSpec,
    parse_header,
    range_bounds,
    verify_range,
    verify_whole,
)
from s3kv.store.protocol import Get


@dataclass(frozen=True)
class Read:
    """Heads ``[head_start, head_end)`` taken from ``entry`` (all of it when ``whole``)."""

    entry: ShardEntry
    head_start: int
    head_end: int

    @property
    def whole(self) -> bool:
        return (self.head_start, self.head_end) == (self.entry.head_start, self.entry.head_end)


@dataclass(frozen=True)
class HeadBytes:
    """Verified payload bytes of heads ``[head_start, head_end)`` of one group's
    section (``s3kv.shard``), head-major."""

    head_start: int
    head_end: int
    payload: memoryview
    section: int = 0


def plan_reads(manifest: Manifest, head_start: int, head_end: int) -> list[Read]:
    """The reads that assemble heads ``[head_start, head_end)``, in head order.

    Raises IntegrityError if the manifest's shards do not cover the range
    (a decoded manifest always covers all of its heads; this guards callers
    that ask for heads the model does not have).
    """
    if not 0 <= head_start < head_end:
        raise IntegrityError(f"bad head range [{head_start},{head_end})")
    reads = []
    at = head_start
    for entry in manifest.shards:  # ordered by head range, tiling [0, num_heads)
        lo, hi = max(at, entry.head_start), min(head_end, entry.head_end)
        if lo >= hi:
            continue
        if lo != at:
            break
        reads.append(Read(entry, lo, hi))
        at = hi
        if at == head_end:
            return reads
    raise IntegrityError(f"manifest of chunk {manifest.chunk_id[:12]} does not cover heads "
                         f"[{at},{head_end})")


async def read_heads(store: Get, manifest: Manifest, head_start: int, head_end: int,
                     expect: PayloadLayout, sections: Sequence[int] | None = None
                     ) -> list[HeadBytes]:
    """Fetch and verify heads ``[head_start, head_end)`` of ``sections`` (all of
    them by default); raises IntegrityError.

    A shard whose heads and sections are all wanted is fetched whole (one
    GET, every checksum); otherwise each wanted section's heads are one
    ranged GET, so a section nobody needs (an early window section) costs
    nothing."""
    reads = plan_reads(manifest, head_start, head_end)
    wanted = tuple(range(expect.num_groups)) if sections is None else tuple(sections)
    every = wanted == tuple(range(expect.num_groups))
    parts = await asyncio.gather(*(
        _fetch_whole(store, manifest, r, expect) if r.whole and every
        else _fetch_sections(store, r, expect, wanted)
        for r in reads))
    return [piece for part in parts for piece in part]


async def _fetch_whole(store: Get, manifest: Manifest, r: Read, expect: PayloadLayout
                       ) -> list[HeadBytes]:
    entry = r.entry
    body = await _get(store, entry, None)
    payload = verify_whole(body, entry, manifest.chunk_id, expect)
    spec = ShardSpec(manifest.chunk_id, entry.rank, entry.head_start, entry.head_end, expect,
                     entry.starts)
    return [HeadBytes(r.head_start, r.head_end, payload[lo:hi], g)
            for g, (lo, hi) in enumerate(spec.section_bounds())]


async def _fetch_sections(store: Get, r: Read, expect: PayloadLayout,
                          sections: Sequence[int]) -> list[HeadBytes]:
    async def one(section: int) -> HeadBytes:
        entry = r.entry
        lo, hi = range_bounds(entry, r.head_start, r.head_end, expect, section)
        if hi == lo:  # an empty section (no tokens stored): nothing to fetch
            return HeadBytes(r.head_start, r.head_end, memoryview(b""), section)
        body = await _get(store, entry, (lo, hi))
        if len(body) != hi - lo:
            raise IntegrityError(
                f"ranged read of {entry.key} returned {len(body)} of {hi - lo} bytes")
        verify_range(body, entry, r.head_start, r.head_end, section)
        return HeadBytes(r.head_start, r.head_end, memoryview(body).cast("B"), section)

    return list(await asyncio.gather(*(one(g) for g in sections)))


async def _get(store: Get, entry: ShardEntry, span: tuple[int, int] | None) -> memoryview:
    try:
        if span is None:
            return memoryview(await store.get(entry.key))
        return memoryview(await store.get_range(entry.key, *span))
    except NotFound:
        raise IntegrityError(f"shard {entry.key} named by the manifest is missing") from None
    except InvalidRange:
        raise IntegrityError(f"shard {entry.key} is shorter than the manifest says") from None


async def read_shard(store: Get, manifest: Manifest, entry: ShardEntry,
                     expect: PayloadLayout | None = None) -> memoryview:
    """Fetch one whole shard and verify it (for ``s3kv verify`` and audits).

    Without ``expect`` the shard is checked against its own header's layout:
    every checksum still has to match the manifest.
    """
    body = await _get(store, entry, None)
    if expect is None:
        expect = parse_header(body)[0].layout
    return verify_whole(body, entry, manifest.chunk_id, expect)
