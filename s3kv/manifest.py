"""The manifest: the one object whose existence makes a chunk readable.

It is small JSON so operators can read it with any S3 tool, parsed strictly
so a truncated, oversized, foreign or hand-edited document is rejected
instead of half-trusted. It names every shard with its size and checksums
(what they cover: ``s3kv.shard``); readers verify bytes against it before
anything reaches the model.

It also records the writer's parallel layout, which is not part of the
namespace: ``tp_size`` and, per shard, the KV head range it holds. The
shards' head ranges tile ``[0, num_heads)`` exactly (each head stored once,
whatever the writer's TP size), so a reader at any TP size finds each head
it needs in exactly one shard.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from s3kv.errors import ManifestError, NotFound
from s3kv.jsondoc import loads_strict
from s3kv.keys import KeyLayout, is_chunk_id, is_namespace, is_writer_id
from s3kv.store.protocol import Get

MANIFEST_FORMAT = "s3kv.manifest"
MANIFEST_VERSION = 2
MAX_MANIFEST_BYTES = 256 * 1024
MAX_SHARDS = 1024
CHECKSUM_ALGORITHM = "xxh3-128"


@dataclass(frozen=True)
class ShardEntry:
    rank: int
    key: str
    size: int
    checksum: str
    head_start: int
    head_end: int
    payload_offset: int
    # One digest per head, section after section (``s3kv.shard``).
    head_checksums: tuple[str, ...]
    # Start token of each KV cache group's section; empty for a single group.
    starts: tuple[int, ...] = ()

    @property
    def head_bytes(self) -> int:
        return (self.size - self.payload_offset) // max(1, self.head_end - self.head_start)


@dataclass(frozen=True)
class Manifest:
    namespace: str
    chunk_id: str
    parent_id: str | None
    chunk_index: int
    num_tokens: int
    writer: str
    created_at: float
    shards: tuple[ShardEntry, ...]  # ordered by head range
    tp_size: int = 1  # the writer's tensor-parallel size
    version: int = MANIFEST_VERSION

    @property
    def num_heads(self) -> int:
        """KV heads the shards cover (they tile ``[0, num_heads)``)."""
        return self.shards[-1].head_end

    @property
    def starts(self) -> tuple[int, ...]:
        """Start token of each group's section (the same in every shard)."""
        return self.shards[0].starts

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def shard_for_rank(self, rank: int) -> ShardEntry:
        for s in self.shards:
            if s.rank == rank:
                return s
        raise ManifestError(f"manifest of chunk {self.chunk_id} has no shard for rank {rank}")

    def encode(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "namespace": self.namespace,
            "chunk_id": self.chunk_id,
            "parent_id": self.parent_id,
            "chunk_index": self.chunk_index,
            "num_tokens": self.num_tokens,
            "writer": self.writer,
            "tp_size": self.tp_size,
            "created_at": self.created_at,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "shards": [
                {
                    "rank": s.rank,
                    "key": s.key,
                    "size": s.size,
                    "checksum": s.checksum,
                    "heads": [s.head_start, s.head_end],
                    "payload_offset": s.payload_offset,
                    "head_checksums": list(s.head_checksums),
                    **({"starts": list(s.starts)} if s.starts else {}),
                }
                for s in self.shards
            ],
        }
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(data)} bytes, over {MAX_MANIFEST_BYTES}")
        return data


def new_manifest(
    *,
    namespace: str,
    chunk_id: str,
    parent_id: str | None,
    chunk_index: int,
    num_tokens: int,
    writer: str,
    shards: list[ShardEntry],
    tp_size: int,
) -> Manifest:
    """A manifest over ``shards``; ManifestError unless their head ranges tile
    ``[0, n)`` without gaps or overlaps and their ranks are distinct."""
    ordered = tuple(sorted(shards, key=lambda s: s.head_start))
    _check_tiling(ordered, "manifest")
    if tp_size < 1 or any(s.rank >= tp_size for s in ordered):
        raise ManifestError(f"manifest: shard ranks must lie in 0..{tp_size - 1}")
    return Manifest(
        namespace=namespace,
        chunk_id=chunk_id,
        parent_id=parent_id,
        chunk_index=chunk_index,
        num_tokens=num_tokens,
        writer=writer,
        created_at=round(time.time(), 3),
        shards=ordered,
        tp_size=tp_size,
    )


def _check_tiling(shards: tuple[ShardEntry, ...], where: str) -> None:
    if not shards:
        raise ManifestError(f"{where}: no shards")
    if len({s.starts for s in shards}) != 1:
        raise ManifestError(f"{where}: shards disagree on their sections' start tokens")
    ranks = [s.rank for s in shards]
    if len(set(ranks)) != len(ranks):
        raise ManifestError(f"{where}: shard ranks repeat: {ranks}")
    at = 0
    for s in shards:
        if s.head_start != at:
            kind = "overlap" if s.head_start < at else "gap"
            raise ManifestError(
                f"{where}: head ranges have a {kind} at head {min(at, s.head_start)}")
        at = s.head_end


# --- strict decoding ----------------------------------------------------------

_TOP_FIELDS = {
    "format": str,
    "version": int,
    "namespace": str,
    "chunk_id": str,
    "parent_id": (str, type(None)),
    "chunk_index": int,
    "num_tokens": int,
    "writer": str,
    "tp_size": int,
    "created_at": (int, float),
    "checksum_algorithm": str,
    "shards": list,
}
_SHARD_FIELDS = {
    "rank": int,
    "key": str,
    "size": int,
    "checksum": str,
    "heads": list,
    "payload_offset": int,
    "head_checksums": list,
}
_SHARD_OPTIONAL = {"starts": list}


def _typed(doc: Mapping[str, Any], spec: Mapping[str, Any], where: str) -> None:
    missing = sorted(set(spec) - set(doc))
    if missing:
        raise ManifestError(f"{where}: missing field {missing[0]!r}")
    extra = sorted(set(doc) - set(spec))
    if extra:
        raise ManifestError(f"{where}: unknown field {extra[0]!r}")
    for name, typ in spec.items():
        value = doc[name]
        if isinstance(value, bool) or not isinstance(value, typ):
            raise ManifestError(f"{where}: field {name!r} has type {type(value).__name__}")


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(
        c in "0123456789abcdef" for c in value
    )


def decode_manifest(
    data: bytes | bytearray | memoryview,
    *,
    layout: KeyLayout,
    expect_namespace: str | None = None,
    expect_chunk_id: str | None = None,
    expect_heads: int | None = None,
) -> Manifest:
    """Parse and validate a manifest; every deviation is a :class:`ManifestError`.

    ``expect_heads``: the reader's model's KV head count; shards covering any
    other number of heads make the manifest unusable for it.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} cap")
    try:
        doc = loads_strict(data)
    except ValueError as exc:
        raise ManifestError(f"manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    if doc.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"not an s3kv manifest (format={doc.get('format')!r})")
    if doc.get("version") != MANIFEST_VERSION:
        raise ManifestError(
            f"unsupported manifest version {doc.get('version')!r} (this reader: {MANIFEST_VERSION})"
        )
    _typed(doc, _TOP_FIELDS, "manifest")
    if doc["checksum_algorithm"] != CHECKSUM_ALGORITHM:
        raise ManifestError(f"unsupported checksum_algorithm {doc['checksum_algorithm']!r}")
    ns, cid, parent = doc["namespace"], doc["chunk_id"], doc["parent_id"]
    if not is_namespace(ns) or not is_chunk_id(cid):
        raise ManifestError("manifest: malformed namespace or chunk_id")
    if parent is not None and not is_chunk_id(parent):
        raise ManifestError("manifest: malformed parent_id")
    if expect_namespace is not None and ns != expect_namespace:
        raise ManifestError(f"manifest namespace {ns} != expected {expect_namespace}")
    if expect_chunk_id is not None and cid != expect_chunk_id:
        raise ManifestError(f"manifest chunk_id {cid} != expected {expect_chunk_id}")
    if not is_writer_id(doc["writer"]):
        raise ManifestError("manifest: malformed writer id")
    if doc["chunk_index"] < 0 or doc["num_tokens"] <= 0:
        raise ManifestError("manifest: chunk_index must be >= 0 and num_tokens > 0")
    if (doc["chunk_index"] == 0) != (parent is None):
        raise ManifestError("manifest: parent_id must be null exactly for chunk_index 0")
    raw_shards = doc["shards"]
    if not raw_shards or len(raw_shards) > MAX_SHARDS:
        raise ManifestError(f"manifest: needs 1..{MAX_SHARDS} shards, has {len(raw_shards)}")
    chunk_prefix = layout.chunk_prefix(ns, cid)
    shards = tuple(sorted((_decode_shard(s, i, chunk_prefix) for i, s in enumerate(raw_shards)),
                          key=lambda s: s.head_start))
    _check_tiling(shards, "manifest")
    tp = doc["tp_size"]
    if not 1 <= tp <= MAX_SHARDS or any(s.rank >= tp for s in shards):
        raise ManifestError(f"manifest: tp_size {tp} and shard ranks disagree")
    if expect_heads is not None and shards[-1].head_end != expect_heads:
        raise ManifestError(
            f"manifest covers {shards[-1].head_end} KV heads, this engine has {expect_heads}")
    return Manifest(
        namespace=ns,
        chunk_id=cid,
        parent_id=parent,
        chunk_index=doc["chunk_index"],
        num_tokens=doc["num_tokens"],
        writer=doc["writer"],
        created_at=float(doc["created_at"]),
        shards=shards,
        tp_size=tp,
    )


def _decode_shard(raw: Any, i: int, chunk_prefix: str) -> ShardEntry:
    where = f"manifest shard[{i}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: not an object")
    optional = {k: raw[k] for k in _SHARD_OPTIONAL if k in raw}
    _typed({k: v for k, v in raw.items() if k not in optional}, _SHARD_FIELDS, where)
    _typed(optional, {k: _SHARD_OPTIONAL[k] for k in optional}, where)
    starts = optional.get("starts", [])
    if len(starts) == 1 or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                   for t in starts):
        raise ManifestError(f"{where}: starts must list two or more token offsets")
    key = raw["key"]
    if not key.startswith(chunk_prefix) or ".." in key or "//" in key[len(chunk_prefix) - 1 :]:
        raise ManifestError(f"{where}: key {key!r} lies outside the chunk prefix {chunk_prefix!r}")
    heads = raw["heads"]
    if (
        len(heads) != 2
        or not all(isinstance(h, int) and not isinstance(h, bool) for h in heads)
        or not 0 <= heads[0] < heads[1]
    ):
        raise ManifestError(f"{where}: heads must be [start, end) with 0 <= start < end")
    size, off = raw["size"], raw["payload_offset"]
    if raw["rank"] < 0 or size <= 0 or not 0 < off <= size:
        raise ManifestError(f"{where}: rank, size or payload_offset out of range")
    n_heads = heads[1] - heads[0]
    if (size - off) % n_heads:
        raise ManifestError(f"{where}: payload does not split evenly into {n_heads} heads")
    head_sums = raw["head_checksums"]
    n_sums = n_heads * max(1, len(starts))
    if len(head_sums) != n_sums or not all(_is_hex(c, 32) for c in head_sums):
        raise ManifestError(f"{where}: head_checksums must be {n_sums} xxh3-128 hex digests")
    if not _is_hex(raw["checksum"], 32):
        raise ManifestError(f"{where}: checksum must be an xxh3-128 hex digest")
    return ShardEntry(
        rank=raw["rank"],
        key=key,
        size=size,
        checksum=raw["checksum"],
        head_start=heads[0],
        head_end=heads[1],
        payload_offset=off,
        head_checksums=tuple(head_sums),
        starts=tuple(starts),
    )


@dataclass(frozen=True)
class FetchedManifest:
    """One chunk's manifest as read from the store: ``manifest`` when it is
    there and valid, ``error`` when it is there and not, ``size`` the bytes
    read (-1: absent)."""

    manifest: Manifest | None
    size: int
    error: ManifestError | None = None


async def fetch_manifest(store: Get, layout: KeyLayout, ns: str, chunk_id: str, *,
                         expect_heads: int | None = None) -> FetchedManifest:
    """GET and strictly decode a chunk's manifest: the one way every reader
    (lookups, listings, GC, verify) reads a commit record, so all of them
    apply the same checks (namespace, chunk id, and for an engine its heads)."""
    try:
        data = await store.get(layout.manifest(ns, chunk_id))
    except NotFound:
        return FetchedManifest(None, -1)
    try:
        m = decode_manifest(data, layout=layout, expect_namespace=ns,
                            expect_chunk_id=chunk_id, expect_heads=expect_heads)
    except ManifestError as exc:
        return FetchedManifest(None, len(data), exc)
    return FetchedManifest(m, len(data))
