"""Populate a bucket with real committed chunks, written by s3kv's own code.

Shards are built with :func:`s3kv.shard.allocate`, sealed with
:func:`s3kv.shard.seal`, uploaded, and only then is the manifest written with
``If-None-Match: *``, exactly the order a commit uses. A writer at TP ``tp``
splits the model's KV heads over its ranks as vLLM does
(:mod:`s3kv.heads`); the namespace is the same at every TP size, and every
head holds the same bytes whichever TP size wrote it.

Shared by the command-line tests (a boto3 client on the test endpoint) and
the catalog's unit tests (a client over the in-memory store).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from s3kv.heads import head_range, uploading_ranks
from s3kv.keys import Fingerprint, KeyLayout, chain_chunk_ids, new_writer_id
from s3kv.manifest import Manifest, ShardEntry, decode_manifest, new_manifest
from s3kv.shard import PayloadLayout, ShardSpec, allocate, seal

NUM_KV_HEADS = 12  # splits evenly over every TP size the tests use (1, 2, 3, 4)
LAYERS = ("layers.0", "layers.1")
CHUNK_TOKENS = 4
HEAD_SIZE = 4
# One head of one chunk: 2 layers x 4 tokens x 8 values (K and V of head size 4), fp16.
PAYLOAD = PayloadLayout("float16", LAYERS, CHUNK_TOKENS, 2 * HEAD_SIZE)


def fingerprint(model: str = "tiny-llama", tag: str = "") -> Fingerprint:
    return Fingerprint(
        model=model, weights_id="w0", dtype="float16", chunk_tokens=CHUNK_TOKENS,
        num_layers=len(LAYERS), num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, tag=tag,
    )


def head_bytes(cid: str, head: int, salt: bytes = b"") -> bytes:
    """The deterministic bytes of one (global) KV head of chunk ``cid``."""
    seed = hashlib.sha256(cid.encode() + head.to_bytes(4, "little") + salt).digest()
    n = PAYLOAD.head_bytes
    return (seed * (n // len(seed) + 1))[:n]


def payload_bytes(cid: str, head_start: int, head_end: int, salt: bytes = b"") -> bytes:
    """The payload of a shard holding heads ``[head_start, head_end)`` of ``cid``."""
    return b"".join(head_bytes(cid, h, salt) for h in range(head_start, head_end))


def shard_bytes(cid: str, rank: int, tp: int = 1, *,
                salt: bytes = b"") -> tuple[bytearray, ShardSpec, int]:
    """Rank ``rank``'s complete shard object at TP ``tp`` (header + deterministic
    payload); returns (object, spec, payload offset)."""
    lo, hi = head_range(NUM_KV_HEADS, rank, tp)
    spec = ShardSpec(chunk_id=cid, rank=rank, head_start=lo, head_end=hi, layout=PAYLOAD)
    buf, payload = allocate(spec)
    payload[:] = payload_bytes(cid, lo, hi, salt)
    return buf, spec, len(buf) - len(payload)


@dataclass
class ChunkWriter:
    """Writes chunks of one namespace as one writer (one vLLM instance at TP ``tp``)."""

    client: Any
    bucket: str
    layout: KeyLayout
    ns: str
    writer: str = ""  # default: new_writer_id(tp, "test")
    tp: int = 1
    salt: bytes = b""
    # Write the older ``<writer>/r<rank>`` keys (one per writer and rank, rewritten
    # in place by a re-save), as engines before unique shard keys did.
    legacy: bool = False
    next_round: int = 0  # the save round of the next put_shards
    written: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.writer:
            self.writer = new_writer_id(self.tp, "test")

    def put_namespace_doc(self, fp: Fingerprint) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.layout.namespace_doc(self.ns),
                               Body=fp.document())

    def put_shards(self, cid: str) -> list[ShardEntry]:
        """One save round's shards of ``cid``: each call is a new round, as in the
        connector, so a second call for the same chunk adds shards beside the first."""
        round_id = None if self.legacy else self.next_round
        self.next_round += 1
        entries = []
        for rank in uploading_ranks(NUM_KV_HEADS, self.tp):
            buf, _, _ = shard_bytes(cid, rank, self.tp, salt=self.salt)
            key = self.layout.shard(self.ns, cid, self.writer, rank, round_id)
            self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(buf))
            entries.append(seal(buf, key))
        return entries

    def manifest(self, cid: str, parent: str | None, index: int, num_tokens: int,
                 entries: list[ShardEntry]) -> Manifest:
        return new_manifest(
            namespace=self.ns, chunk_id=cid, parent_id=parent, chunk_index=index,
            num_tokens=num_tokens, writer=self.writer, shards=entries, tp_size=self.tp,
        )

    def put_manifest(self, m: Manifest) -> bool:
        """Write the manifest create-only; False if the chunk was already committed."""
        try:
            self.client.put_object(Bucket=self.bucket,
                                   Key=self.layout.manifest(self.ns, m.chunk_id),
                                   Body=m.encode(), IfNoneMatch="*")
        except ClientError as exc:
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412:
                return False
            raise
        self.written.append(m.chunk_id)
        return True

    def commit(self, cid: str, parent: str | None, index: int,
               num_tokens: int = CHUNK_TOKENS) -> Manifest:
        m = self.manifest(cid, parent, index, num_tokens, self.put_shards(cid))
        self.put_manifest(m)
        return m

    def commit_chain(self, tokens: Sequence[int],
                     chunk_tokens: int = CHUNK_TOKENS) -> list[Manifest]:
        """Commit every chunk of ``tokens`` not yet committed, as the connector does
        (a lookup hit is never saved again); returns the chain's manifests."""
        out: list[Manifest] = []
        parent: str | None = None
        for i, cid in enumerate(chain_chunk_ids(tokens, chunk_tokens)):
            existing = self.read_manifest(cid)
            out.append(existing or self.commit(cid, parent, i, chunk_tokens))
            parent = cid
        return out

    def read_manifest(self, cid: str) -> Manifest | None:
        try:
            body = self.client.get_object(Bucket=self.bucket,
                                          Key=self.layout.manifest(self.ns, cid))["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        return decode_manifest(body, layout=self.layout, expect_heads=NUM_KV_HEADS)


def namespace_id(model: str = "tiny-llama", tag: str = "") -> str:
    return fingerprint(model, tag).namespace


def list_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys
