"""Namespace fingerprints, chained chunk ids and the object key layout.

Layout (``<prefix>`` from the settings, ``<ns>`` a 32-hex fingerprint)::

    <prefix>/<ns>/namespace.json                            the fingerprint, readable
    <prefix>/<ns>/<cid[:2]>/<cid>/manifest.json             the commit record
    <prefix>/<ns>/<cid[:2]>/<cid>/<writer>.<round>/r<rank>  one shard per uploading
                                                            TP rank and save round

**Bytes a manifest names are never overwritten.** Every save attempt gets
keys of its own: ``<writer>`` is fresh per engine start and ``<round>`` is the
scheduler's save round (the same on every rank, never repeated by one
engine), and shards are uploaded create-only. An engine may save a chunk it
committed before (its memory of committed chunks is bounded, and a failed
save may be retried): the recomputed bytes are not bit-identical, and were they to
replace committed ones under the manifest naming the old checksums, every
reader of that chunk would fail verification until a repair. With unique
keys the second attempt only leaves shards no manifest names, which GC
collects after its grace period. Shards of one save attempt share the
``<writer>.<round>/`` directory, which is exactly the set one manifest names.
Buckets written before this rule also hold ``<writer>/r<rank>`` shards;
parsing accepts both forms (``round_id`` is ``None`` for the old one).

The namespace hashes everything that changes the stored bytes (model and
weights identity, KV dtype, attention kind, layer and KV head counts, head
size, chunk size, hash scheme, format version, and the engine settings that
change the values the model computes: config files, ``hf_overrides``, context
length, quantization, compute dtype; see ``s3kv.vllm.namespace``), so a reader
of another model, weights, dtype or setting computes a different namespace
and simply misses. What does
not change the bytes stays out of it: the TP size (each shard says which
heads it holds, the manifest records the writer's TP size), the vLLM block
size (the payload is token-major) and the attention backend's tensor layout
(mapped to one canonical order), so engines differing only in those share
one cache. Chunk ids are content
addresses chained over token ids: a chunk id names the whole prefix up to and
including its tokens, computed with our own canonical encoding (never vLLM's
configurable, process-seeded block hash), so they agree across processes,
machines and vLLM versions. The two hex characters in front of each chunk
spread keys uniformly over 256 sub-prefixes: S3 partitions request capacity
by prefix, and listings can run in parallel per sub-prefix.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

#: Bumped whenever shard bytes or manifest semantics change incompatibly.
#: 2: token-major payload, TP size and block size out of the namespace.
FORMAT_VERSION = 2
#: Names the token-hash scheme below; part of the namespace.
HASH_SCHEME = "sha256-u32le-chain-v1"

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_WRITER = re.compile(r"^[0-9a-z\-]{1,64}$")
_WRITER_TP = re.compile(r"^tp([1-9][0-9]{0,3})-")
_RANK = re.compile(r"r([0-9]{1,4})")
# Canonical decimal (no leading zeros), so a parsed key builds back to itself.
_UPLOAD = re.compile(r"([0-9a-z\-]{1,64})\.(0|[1-9][0-9]{0,19})")
#: Round ids a shard key can carry (20 decimal digits).
MAX_ROUND = 10**20 - 1
#: Ranks a shard key can carry (``r`` and up to 4 digits).
MAX_RANK = 9999
MANIFEST_NAME = "manifest.json"
NAMESPACE_NAME = "namespace.json"


@dataclass(frozen=True)
class Fingerprint:
    """Everything that decides whether stored KV bytes can be reused."""

    model: str
    weights_id: str
    dtype: str
    chunk_tokens: int
    num_layers: int
    num_kv_heads: int  # total, all ranks together; 1 for MLA (one shared latent)
    head_size: int  # per KV head; the latent width for MLA
    attention: str = "mha"  # "mha" (separate K and V per head, GQA included) or "mla"
    tag: str = ""
    format_version: int = FORMAT_VERSION
    hash_scheme: str = HASH_SCHEME
    #: Digest of the engine settings that change KV values (rope after overrides,
    #: context length, quantization, ...): two engines of one checkpoint that
    #: compute different KV must not share chunks.
    engine: str = ""
    #: The canonical JSON ``engine`` digests, for operators reading
    #: ``namespace.json``; documentation only, not hashed (``engine`` is).
    engine_settings: str = field(default="", compare=False, repr=False,
                                 metadata={"namespace": False})
    #: vLLM's KV cache groups with its hybrid KV cache manager on
    #: (``s3kv.groups.describe_groups``): which layers share a block table and
    #: what they keep. Empty for one group of every layer, and then not hashed,
    #: so those namespaces are the ones they always were.
    groups: str = ""

    @property
    def token_elems(self) -> int:
        """Elements one token occupies per head and layer in a shard."""
        return self.head_size if self.attention == "mla" else 2 * self.head_size

    def to_json(self) -> dict[str, Any]:
        """The fields the namespace hashes (every field but documentation)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("namespace", True)
                and not (f.name == "groups" and not self.groups)}

    def document(self) -> bytes:
        """The ``namespace.json`` written beside the chunks, for operators and ``s3kv ls``."""
        doc: dict[str, Any] = {"format": "s3kv.namespace", "namespace": self.namespace,
                               "fingerprint": self.to_json()}
        if self.engine_settings:
            doc["engine_settings"] = json.loads(self.engine_settings)
        return json.dumps(doc, sort_keys=True, indent=1).encode()

    @property
    def namespace(self) -> str:
        """128-bit hex digest of the canonical JSON of every field."""
        doc = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:32]


def canonical_extra(extra: Mapping[str, Any] | None) -> bytes:
    """Canonical bytes for extra keys (LoRA adapter digest, cache salt, multimodal hashes)."""
    if not extra:
        return b""
    return json.dumps(
        dict(extra), sort_keys=True, separators=(",", ":"), default=_canonical_default
    ).encode()


def _canonical_default(value: Any) -> Any:
    """Sets iterate in a per-process hash order: encode them sorted, the rest by str()."""
    if isinstance(value, (set, frozenset)):
        return sorted(
            value, key=lambda v: json.dumps(v, sort_keys=True, default=_canonical_default)
        )
    return str(value)


def chunk_id(parent: str | None, tokens: Sequence[int], extra: Mapping[str, Any] | None) -> str:
    """Content address of a chunk: sha256(parent || len || tokens u32le || extra).

    Chaining the parent makes the id name the whole prefix, not just these
    tokens, which is what reuse requires (KV depends on every earlier token).
    """
    h = hashlib.sha256()
    h.update(bytes.fromhex(parent) if parent else b"\x00" * 32)
    h.update(struct.pack("<I", len(tokens)))
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    h.update(canonical_extra(extra))
    return h.hexdigest()


def chain_chunk_ids(
    tokens: Sequence[int], chunk_tokens: int, extra: Mapping[str, Any] | None = None
) -> list[str]:
    """Ids of every full chunk of ``tokens`` in order (partial tail excluded)."""
    return list(iter_chunk_ids(tokens, chunk_tokens, extra))


def iter_chunk_ids(
    tokens: Sequence[int],
    chunk_tokens: int,
    extra: Mapping[str, Any] | None = None,
    parent: str | None = None,
    start: int = 0,
) -> Iterator[str]:
    """Like :func:`chain_chunk_ids` but resumable from a known parent and offset."""
    for off in range(start, len(tokens) - chunk_tokens + 1, chunk_tokens):
        parent = chunk_id(parent, tokens[off : off + chunk_tokens], extra)
        yield parent


def is_chunk_id(value: str) -> bool:
    return bool(_HEX64.match(value))


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A chunk's identity and its place in its prefix chain, as one value.

    These four travel together from the scheduler's save plan through every
    rank's commit report to the manifest; as one type no call site can swap
    two of them (a parent id where the chunk id was meant, an index for a
    token count). The checks are what the manifest would refuse later, made
    where the mix-up happens. Slotted: the commit gather pickles one per shard
    each round, and slots pickle as a bare list of values.
    """

    chunk_id: str
    parent_id: str | None
    index: int
    num_tokens: int

    def __post_init__(self) -> None:
        if not is_chunk_id(self.chunk_id):
            raise ValueError(f"chunk ref: {self.chunk_id!r} is not a chunk id")
        if self.parent_id is not None and (
            not is_chunk_id(self.parent_id) or self.parent_id == self.chunk_id
        ):
            raise ValueError(f"chunk ref {self.chunk_id[:12]}: bad parent {self.parent_id!r}")
        if self.index < 0 or self.num_tokens <= 0:
            raise ValueError(f"chunk ref {self.chunk_id[:12]}: index {self.index} and "
                             f"{self.num_tokens} tokens")
        if (self.index == 0) != (self.parent_id is None):
            raise ValueError(f"chunk ref {self.chunk_id[:12]}: a parent exactly when the "
                             f"index is not 0 (index {self.index})")


def is_namespace(value: str) -> bool:
    return bool(_HEX32.match(value))


def is_writer_id(value: str) -> bool:
    return bool(_WRITER.match(value))


def new_writer_id(tp_size: int, unique: str) -> str:
    """``tp<N>-<unique>``: names one engine's shards and, for listings that read
    no manifest, the TP size it wrote them at."""
    return f"tp{tp_size}-{unique}"


def writer_tp(writer: str) -> int | None:
    """The TP size a writer id records (None for ids without one)."""
    m = _WRITER_TP.match(writer)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class KeyLayout:
    """Builds and parses object keys under one bucket prefix."""

    prefix: str

    def root(self) -> str:
        return f"{self.prefix}/"

    def namespace_prefix(self, ns: str) -> str:
        return f"{self.prefix}/{ns}/"

    def namespace_doc(self, ns: str) -> str:
        return f"{self.prefix}/{ns}/{NAMESPACE_NAME}"

    def chunk_prefix(self, ns: str, cid: str) -> str:
        return f"{self.prefix}/{ns}/{cid[:2]}/{cid}/"

    def manifest(self, ns: str, cid: str) -> str:
        return self.chunk_prefix(ns, cid) + MANIFEST_NAME

    def shard(self, ns: str, cid: str, writer: str, rank: int,
              round_id: int | None = None) -> str:
        """The key of one rank's shard of one save round.

        Writers always pass ``round_id``: it is what keeps a later save of the same
        chunk from overwriting committed bytes. ``round_id=None`` builds the older
        ``<writer>/r<rank>`` form, which buckets may still hold.
        """
        if not 0 <= rank <= MAX_RANK:
            raise ValueError(f"shard rank {rank} outside 0..{MAX_RANK}")
        if round_id is None:
            return f"{self.chunk_prefix(ns, cid)}{writer}/r{rank}"
        if not 0 <= round_id <= MAX_ROUND:
            raise ValueError(f"save round {round_id} outside 0..{MAX_ROUND}")
        return f"{self.chunk_prefix(ns, cid)}{writer}.{round_id}/r{rank}"

    def parse(self, key: str) -> ParsedKey | None:
        """Classify a key under this prefix; ``None`` for anything foreign."""
        head = self.root()
        if not key.startswith(head):
            return None
        parts = key[len(head) :].split("/")
        if len(parts) == 2 and is_namespace(parts[0]) and parts[1] == NAMESPACE_NAME:
            return ParsedKey("namespace", parts[0], None, None, None)
        if len(parts) < 4 or not is_namespace(parts[0]) or not is_chunk_id(parts[2]):
            return None
        ns, spread, cid = parts[0], parts[1], parts[2]
        if spread != cid[:2]:
            return None
        if len(parts) == 4 and parts[3] == MANIFEST_NAME:
            return ParsedKey("manifest", ns, cid, None, None)
        if len(parts) != 5 or (rank := _RANK.fullmatch(parts[4])) is None:
            return None
        if is_writer_id(parts[3]):  # written before keys were unique per round
            return ParsedKey("shard", ns, cid, parts[3], int(rank.group(1)))
        if (upload := _UPLOAD.fullmatch(parts[3])) is not None:
            return ParsedKey("shard", ns, cid, upload.group(1), int(rank.group(1)),
                             int(upload.group(2)))
        return None


@dataclass(frozen=True)
class ParsedKey:
    kind: str  # "namespace" | "manifest" | "shard"
    namespace: str
    chunk_id: str | None
    writer: str | None
    rank: int | None
    round_id: int | None = None  # None for shards in the older ``<writer>/r<rank>`` form
