"""KV audit: every chunk in a bucket compared with the KV the model gives for its tokens.

s3kv's checksums prove that a shard holds the bytes its writer sealed; they
cannot tell whether the writer sealed the right KV. A copy-out from the wrong
blocks, a chunk id computed over other tokens, or anyone with write access
re-sealing another chunk's payload all leave a bucket that verifies and
serves wrong tokens to whoever reads it, possibly long after the soak that
wrote it. So the soak recomputes, for every chunk it finds, the KV a plain
PyTorch forward of the model (transformers, no vLLM, no connector) gives for
that chunk's tokens, and compares it with the stored payload.

Chunk ids are content addresses (``s3kv.keys``): the soak knows every token
sequence its engines computed KV for (each prompt followed by the tokens the
engine generated, all but the last, whose KV is never computed), so the id
of every chunk it may have written is known; a chunk whose id is none of
them is reported as unknown. KV is causal, so any sequence holding a chunk
gives its KV: one reference forward per distinct sequence covers every chunk,
and the same forward gives the logits the soak uses to judge how decisive
each greedy choice was.

vLLM stores keys after the rotary embedding (the attention layer receives
rotated keys), as transformers keeps them in its cache; the payload layout is
``s3kv.shard``'s ``[heads, layers, tokens, 2 * head_size]``, keys then values.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from s3kv.config import StoreSettings
from s3kv.errors import IntegrityError, ManifestError, NotFound
from s3kv.keys import KeyLayout, chain_chunk_ids
from s3kv.manifest import Manifest, decode_manifest
from s3kv.shard import ShardSpec, parse_header, verify_whole
from s3kv.store import open_store

#: Largest |stored - reference| allowed, relative to the largest |reference|
#: value of the same layer and kind (K or V) in the shard. Both sides are fp32
#: computations of the same model on the same tokens; they differ only by
#: summation order (measured: about 1e-6 relative), while KV of any other
#: tokens or positions differs by order 1. 1e-3 sits three orders of magnitude
#: from both.
TOLERANCE = 1e-3
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class StoredShard:
    spec: ShardSpec
    payload: bytes


@dataclass(frozen=True)
class StoredChunk:
    manifest: Manifest
    shards: tuple[StoredShard, ...]


@dataclass(frozen=True)
class RefPass:
    """One sequence's reference forward: per-layer KV, and the two best logits
    (and their tokens) at its last positions."""

    kv: torch.Tensor  # [layers, kv_heads, tokens, 2, head_size], keys after rotary
    top_values: torch.Tensor  # [logit positions, 2]: the sequence's last positions
    top_tokens: torch.Tensor  # [logit positions, 2]


@dataclass
class KVAudit:
    chunks_in_bucket: int = 0
    verified: int = 0  # manifest and every shard pass s3kv's own checks
    broken: dict[str, str] = field(default_factory=dict)  # chunk id -> integrity error
    audited: int = 0  # payload compared with the reference
    skipped: int = 0  # left out on purpose (damaged at rest by the soak)
    mismatched: dict[str, str] = field(default_factory=dict)  # chunk id -> what differs
    unknown: list[str] = field(default_factory=list)  # ids of no sequence the caller knows
    max_rel_diff: float = 0.0  # over the chunks that matched
    diffs: dict[str, float] = field(default_factory=dict)  # chunk id -> relative difference
    tolerance: float = TOLERANCE


class ReferenceModel:
    """The model in plain transformers, fp32."""

    #: Padded tokens per batched forward (the attention scores of a batch are
    #: ``tokens * longest * heads`` floats).
    BATCH_TOKENS = 8192

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).eval()
        cfg = self.model.config
        if getattr(cfg, "kv_lora_rank", None):
            raise ValueError("the KV audit compares K/V heads; MLA latents are not supported")
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(cfg.num_key_value_heads)

    def passes(self, sequences: Sequence[Sequence[int]], logit_positions: int = 1
               ) -> Iterator[tuple[int, RefPass]]:
        """``(index, pass)`` for every sequence, in no particular order.

        Sequences of similar length are batched, right-padded: attention is
        causal, so padding after a sequence changes none of its positions and
        needs no mask. Logits are computed only for the last
        ``logit_positions`` positions of each sequence (the output head over
        every position would cost a fifth of the forward).
        """
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        groups: list[list[int]] = []
        for i in order:
            if groups and len(sequences[i]) * (len(groups[-1]) + 1) <= self.BATCH_TOKENS:
                groups[-1].append(i)
            else:
                groups.append([i])
        body, head = self.model.get_decoder(), self.model.get_output_embeddings()
        for group in groups:
            longest = max(len(sequences[i]) for i in group)
            ids = torch.zeros((len(group), longest), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(sequences[i])] = torch.tensor(list(sequences[i]))
            with torch.inference_mode():
                out = body(input_ids=ids, use_cache=True)
                layers = out.past_key_values.layers
                for row, i in enumerate(group):
                    n = len(sequences[i])
                    kv = torch.stack([torch.stack([la.keys[row, :, :n], la.values[row, :, :n]],
                                                  dim=2) for la in layers])
                    logits = head(out.last_hidden_state[row, max(0, n - logit_positions) : n])
                    top = logits.float().topk(2, dim=-1)
                    yield i, RefPass(kv, top.values, top.indices)


async def _read_chunk(store: Any, layout: KeyLayout, key: str, cid: str) -> StoredChunk:
    m = decode_manifest(await store.get(key), layout=layout, expect_chunk_id=cid)
    shards = []
    for entry in m.shards:
        try:
            body = await store.get(entry.key)
        except NotFound:
            raise IntegrityError(f"shard {entry.key} named by the manifest is missing") from None
        spec, _ = parse_header(body)
        # What s3kv.reader.read_shard checks: every checksum, the header against the manifest.
        payload = verify_whole(body, entry, m.chunk_id, spec.layout)
        shards.append(StoredShard(spec, bytes(payload)))
    return StoredChunk(m, tuple(shards))


def read_bucket(endpoint_url: str, bucket: str, prefix: str = "s3kv"
                ) -> dict[str, StoredChunk | str]:
    """Every manifest in the bucket with its shards, verified as s3kv's readers
    verify them: chunk id -> the chunk, or what is wrong with it."""
    layout = KeyLayout(prefix)

    async def main() -> dict[str, StoredChunk | str]:
        store = await open_store(StoreSettings(bucket=bucket, endpoint_url=endpoint_url))
        out: dict[str, StoredChunk | str] = {}
        try:
            keys = [info.key async for page in store.list(prefix + "/") for info in page]
            for key in sorted(keys):
                if not key.endswith("/manifest.json"):
                    continue
                cid = key.rsplit("/", 2)[-2]
                try:
                    out[cid] = await _read_chunk(store, layout, key, cid)
                except (ManifestError, IntegrityError) as exc:
                    out[cid] = f"{type(exc).__name__}: {exc}"
        finally:
            await store.close()
        return out

    return asyncio.run(main())


def _layer_order(names: Sequence[str], num_layers: int) -> list[int]:
    """The model layer each stored layer name belongs to (``model.layers.3.self_attn.attn``)."""
    order = []
    for name in names:
        m = _LAYER.search(name)
        if m is None:
            raise ValueError(f"cannot tell which layer {name!r} is")
        order.append(int(m.group(1)))
    if sorted(order) != list(range(num_layers)):
        raise ValueError(f"stored layers {list(names)} are not the model's {num_layers}")
    return order


def compare_chunk(chunk: StoredChunk, ref: RefPass, index: int, chunk_tokens: int,
                  num_kv_heads: int) -> tuple[float, str | None]:
    """Largest relative difference of the chunk's payload from the reference KV of
    its tokens, and what makes it unusable (None when it matches in shape)."""
    m = chunk.manifest
    if m.chunk_index != index or m.num_tokens != chunk_tokens:
        return 0.0, (f"manifest says chunk {m.chunk_index} of {m.num_tokens} tokens, its id "
                     f"is chunk {index} of {chunk_tokens}")
    if m.num_heads != num_kv_heads:
        return 0.0, f"shards cover {m.num_heads} KV heads, the model has {num_kv_heads}"
    lo, hi = index * chunk_tokens, (index + 1) * chunk_tokens
    worst = 0.0
    for shard in chunk.shards:
        lay = shard.spec.layout
        if lay.dtype != "float32":
            raise ValueError(f"the KV audit compares float32 payloads, not {lay.dtype}")
        head_size = ref.kv.shape[-1]
        if lay.tokens != chunk_tokens or lay.token_elems != 2 * head_size:
            return 0.0, f"shard layout {lay} does not hold {chunk_tokens} tokens of K and V"
        heads = shard.spec.num_heads
        stored = torch.frombuffer(bytearray(shard.payload), dtype=torch.float32).view(
            heads, len(lay.layer_names), chunk_tokens, 2, head_size)
        order = _layer_order(lay.layer_names, ref.kv.shape[0])
        want = ref.kv[order, shard.spec.head_start:shard.spec.head_end, lo:hi].transpose(0, 1)
        for kind in (0, 1):  # K, V: each layer's against its own scale
            w, s = want[..., kind, :], stored[..., kind, :]
            scale = w.abs().amax(dim=(0, 2, 3)).clamp_min(1e-30)
            diff = float(((s - w).abs().amax(dim=(0, 2, 3)) / scale).max())
            if not math.isfinite(diff):  # NaN or inf stored: never within any tolerance
                return math.inf, None
            worst = max(worst, diff)
    return worst, None


def audit_kv(stored: dict[str, StoredChunk | str], sequences: Sequence[Sequence[int]],
             reference: ReferenceModel, *, chunk_tokens: int,
             skip: Collection[str] = (), tolerance: float = TOLERANCE,
             extra: dict[str, Any] | None = None, logit_positions: int = 1,
             ) -> tuple[KVAudit, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Compare every verified chunk with the reference KV of the tokens its id names.

    ``sequences``: every token sequence whose KV an engine computed (what the
    engines saw, prompt plus generated tokens but the last); ``extra``: the
    scheduler's extra keys for them (none for plain prompts). ``skip``: chunks
    damaged on purpose, neither verified nor compared. Returns the audit and,
    per sequence in order, the reference's two best logits and their tokens at
    its last ``logit_positions`` positions (one forward each; the KV is dropped
    once compared).
    """
    report = KVAudit(chunks_in_bucket=len(stored), tolerance=tolerance)
    where: dict[str, tuple[int, int]] = {}
    for si, seq in enumerate(sequences):
        for ci, cid in enumerate(chain_chunk_ids(seq, chunk_tokens, extra)):
            where.setdefault(cid, (si, ci))
    todo: dict[int, list[tuple[str, StoredChunk, int]]] = {}
    for cid, got in sorted(stored.items()):
        if cid in skip:
            report.skipped += 1
            continue
        if isinstance(got, str):
            report.broken[cid] = got
            continue
        report.verified += 1
        if cid not in where:
            report.unknown.append(cid)
            continue
        si, ci = where[cid]
        todo.setdefault(si, []).append((cid, got, ci))
    empty = torch.empty(0, 2)
    passes = [(empty, empty)] * len(sequences)
    for si, ref in reference.passes(sequences, logit_positions):
        passes[si] = (ref.top_values, ref.top_tokens)
        for cid, chunk, ci in todo.get(si, []):
            report.audited += 1
            diff, why = compare_chunk(chunk, ref, ci, chunk_tokens, reference.num_kv_heads)
            report.diffs[cid] = diff
            if why is None and diff > tolerance:
                why = f"KV differs from the reference by {diff:.3g} (tolerance {tolerance:g})"
            if why is not None:
                report.mismatched[cid] = why
            else:
                report.max_rel_diff = max(report.max_rel_diff, diff)
    return report, passes
