"""What a bucket scan finds per chunk, and what it adds up to.

The catalog streams :class:`ChunkObjects` groups out of a listing; this module
holds those groups and the pure arithmetic over them: committed versus orphaned
bytes per chunk, totals per namespace, compact per-chunk records, and the
cached prefixes rebuilt from parent ids. None of it does I/O, so GC policies
and the CLI views can be tested on plain records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from s3kv.keys import writer_tp
from s3kv.manifest import Manifest
from s3kv.store.protocol import ObjectInfo


def timestamp(info: ObjectInfo) -> float:
    """Epoch seconds of an object's Last-Modified (the server's clock)."""
    return info.last_modified.timestamp()


@dataclass(frozen=True, slots=True)
class ShardObject:
    """A listed shard object; the writer, rank and save round come from its key."""

    key: str
    writer: str
    rank: int
    size: int
    modified: float
    round_id: int | None = None  # None: the older key form, one key per writer and rank

    @property
    def upload(self) -> tuple[str, int | None]:
        """The save attempt that wrote it: a manifest names one attempt's shards."""
        return self.writer, self.round_id


@dataclass(slots=True)
class ChunkObjects:
    """Everything the listing found under one chunk prefix."""

    namespace: str
    chunk_id: str
    manifest: ObjectInfo | None = None
    shards: list[ShardObject] = field(default_factory=list)

    @property
    def writers(self) -> set[str]:
        return {s.writer for s in self.shards}

    @property
    def uploads(self) -> set[tuple[str, int | None]]:
        """The save attempts (writer, round) whose shards are here.

        A manifest names the shards of one attempt, so with a manifest and a
        single attempt every shard is committed; with several (two engines, or
        one engine saving the chunk again in a later round) only the manifest
        can tell which shards it names and which are orphans.
        """
        return {s.upload for s in self.shards}

    @property
    def writer_tps(self) -> frozenset[int]:
        """TP sizes of the engines that wrote these shards (from their writer ids)."""
        return frozenset(tp for w in self.writers if (tp := writer_tp(w)) is not None)

    @property
    def objects(self) -> int:
        return len(self.shards) + (self.manifest is not None)

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self.shards) + (self.manifest.size if self.manifest else 0)


@dataclass(slots=True)
class ScannedChunk:
    """A chunk's objects plus, where asked for, its decoded manifest.

    ``error`` is set when a listed manifest could not be decoded; ``vanished``
    when it was listed but gone by the time it was read (a concurrent GC).
    """

    objects: ChunkObjects
    manifest: Manifest | None = None
    error: str | None = None
    vanished: bool = False


@dataclass(slots=True)
class ChunkRecord:
    """The few fields chain views and eviction need, kept per chunk in memory."""

    namespace: str
    chunk_id: str
    parent_id: str | None
    chunk_index: int
    tokens: int
    bytes: int
    objects: int
    modified: float
    tp_size: int = 1  # the committing writer's
    # A shard the manifest names is missing from the listing or listed at
    # another size: no reader will load the chunk, and GC frees it first.
    corrupt: bool = False


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """A leaf chunk and its ancestors: one token prefix a reader can reuse.

    ``complete`` is false when an ancestor is missing, so the prefix cannot be
    loaded past the hole. ``bytes`` counts every chunk of the prefix, so
    prefixes sharing ancestors count those ancestors each.
    """

    leaf: str
    chunks: int
    tokens: int
    bytes: int
    oldest: float
    newest: float
    complete: bool


@dataclass(slots=True)
class ChunkUsage:
    """How one chunk's objects split into committed and orphaned bytes."""

    committed: bool
    invalid: bool
    manifests: int
    shards: int
    committed_bytes: int
    orphan_bytes: int
    orphan_objects: int
    modified: float | None
    writer_tps: frozenset[int] = frozenset()


@dataclass
class NamespaceUsage:
    """Totals for one namespace (or, merged, for the whole prefix)."""

    namespace: str | None
    chunks: int = 0
    invalid_manifests: int = 0
    uncommitted_chunks: int = 0
    manifests: int = 0
    shards: int = 0
    committed_bytes: int = 0
    orphan_bytes: int = 0
    orphan_objects: int = 0
    foreign_objects: int = 0
    foreign_bytes: int = 0
    oldest: float | None = None
    newest: float | None = None
    writer_tps: set[int] = field(default_factory=set)  # TP sizes that committed chunks here

    @property
    def objects(self) -> int:
        return self.manifests + self.shards + self.foreign_objects

    @property
    def bytes(self) -> int:
        return self.committed_bytes + self.orphan_bytes + self.foreign_bytes

    def add(self, u: ChunkUsage) -> None:
        self.manifests += u.manifests
        self.shards += u.shards
        self.committed_bytes += u.committed_bytes
        self.orphan_bytes += u.orphan_bytes
        self.orphan_objects += u.orphan_objects
        if u.committed:
            self.chunks += 1
            self.invalid_manifests += u.invalid
            self.writer_tps |= u.writer_tps
        else:
            self.uncommitted_chunks += 1
        if u.modified is not None:
            self._see(u.modified, u.modified)

    def merge(self, other: NamespaceUsage) -> None:
        for name in ("chunks", "invalid_manifests", "uncommitted_chunks", "manifests", "shards",
                     "committed_bytes", "orphan_bytes", "orphan_objects", "foreign_objects",
                     "foreign_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.writer_tps |= other.writer_tps
        if other.oldest is not None and other.newest is not None:
            self._see(other.oldest, other.newest)

    def _see(self, oldest: float, newest: float) -> None:
        self.oldest = oldest if self.oldest is None else min(self.oldest, oldest)
        self.newest = newest if self.newest is None else max(self.newest, newest)


# --- per chunk ----------------------------------------------------------------


def named_keys(manifest: Manifest) -> frozenset[str]:
    return frozenset(s.key for s in manifest.shards)



def chunk_usage(item: ScannedChunk) -> ChunkUsage:
    group = item.objects
    manifests = 1 if group.manifest is not None else 0
    if group.manifest is None or item.vanished:
        return ChunkUsage(False, False, manifests, len(group.shards), 0, group.bytes,
                          group.objects, None)
    modified = timestamp(group.manifest)
    if item.manifest is None:  # not read (single writer) or undecodable: all of it counts
        return ChunkUsage(True, item.error is not None, 1, len(group.shards), group.bytes, 0, 0,
                          modified, group.writer_tps)
    named = named_keys(item.manifest)
    orphans = [s for s in group.shards if s.key not in named]
    orphan_bytes = sum(s.size for s in orphans)
    return ChunkUsage(True, False, 1, len(group.shards), group.bytes - orphan_bytes,
                      orphan_bytes, len(orphans), modified, frozenset({item.manifest.tp_size}))


def chunk_record(item: ScannedChunk) -> ChunkRecord | None:
    m, group = item.manifest, item.objects
    if m is None or group.manifest is None:
        return None
    # Bytes as LIST reports them, never as the manifest claims: anyone who can
    # write a manifest can claim any size, and a claim of 10^15 bytes would
    # make a size budget evict everything else.
    listed = {s.key: s.size for s in group.shards}
    named = [listed.get(s.key) for s in m.shards]
    return ChunkRecord(
        namespace=group.namespace,
        chunk_id=m.chunk_id,
        parent_id=m.parent_id,
        chunk_index=m.chunk_index,
        tokens=m.num_tokens,
        bytes=group.manifest.size + sum(n or 0 for n in named),
        objects=1 + sum(n is not None for n in named),
        modified=timestamp(group.manifest),
        tp_size=m.tp_size,
        corrupt=any(n != s.size for n, s in zip(named, m.shards, strict=True)),
    )


# --- chains -------------------------------------------------------------------


def build_prefixes(records: Iterable[ChunkRecord]) -> list[CachedPrefix]:
    """Rebuild cached prefixes from parent ids: one per leaf (a chunk nobody extends)."""
    by_id = {r.chunk_id: r for r in records}
    parents = {r.parent_id for r in by_id.values() if r.parent_id is not None}
    # chunks, tokens, bytes, oldest, newest, complete
    memo: dict[str, tuple[int, int, int, float, float, bool]] = {}

    def fold(cid: str) -> tuple[int, int, int, float, float, bool]:
        path: list[ChunkRecord] = []
        seen: set[str] = set()
        cur: str | None = cid
        while cur is not None and cur not in memo:
            rec = by_id.get(cur)
            if rec is None or cur in seen:
                break
            seen.add(cur)
            path.append(rec)
            cur = rec.parent_id
        if cur is not None and cur in memo:
            acc = memo[cur]
        else:
            # ``cur is None``: the walk reached a root chunk; otherwise a hole.
            acc = (0, 0, 0, float("inf"), float("-inf"), cur is None)
        for rec in reversed(path):
            acc = (acc[0] + 1, acc[1] + rec.tokens, acc[2] + rec.bytes,
                   min(acc[3], rec.modified), max(acc[4], rec.modified), acc[5])
            memo[rec.chunk_id] = acc
        return memo[cid]

    out: list[CachedPrefix] = []
    for cid in by_id:
        if cid in parents:
            continue
        n, tokens, size, oldest, newest, complete = fold(cid)
        out.append(CachedPrefix(cid, n, tokens, size, oldest, newest, complete))
    return out


def subtree_newest(records: Iterable[ChunkRecord]) -> dict[str, float]:
    """Per chunk, the newest Last-Modified among it and every chunk extending it.

    A chunk counts as used as recently as its newest descendant: that
    descendant was written by someone who had just read the whole prefix.
    """
    recs = sorted(records, key=lambda r: r.chunk_index, reverse=True)
    newest = {r.chunk_id: r.modified for r in recs}
    for r in recs:
        if r.parent_id is not None and r.parent_id in newest:
            newest[r.parent_id] = max(newest[r.parent_id], newest[r.chunk_id])
    return newest
