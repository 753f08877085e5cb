"""KV cache groups: what each kind of layer needs stored and loaded.

vLLM's hybrid KV cache manager puts layers that keep their KV differently in
separate groups, each with its own block table. s3kv stores a chunk's groups
as sections of one shard (``s3kv.shard``) and decides here, without vLLM,
which tokens of each section to store and which a reader needs:

- ``full``: every layer keeps every token. A chunk stores all of them and a
  hit loads all of them.
- ``window``: sliding-window layers attend only to the last ``window``
  tokens, and vLLM frees (null-blocks) the blocks before that. A request that
  resumes computing at token ``end`` needs only the blocks from
  :func:`first_needed_token` on; a hit loads only those.
- ``state``: SSM / linear-attention layers (Mamba2, gated delta-net) keep one
  recurrent state per request, not per token. In vLLM's "align" cache mode
  block ``p`` of the group's table holds the state after exactly
  ``(p + 1) * block_size`` tokens, written by the step that ends there, or
  by a longer last prefill step as its internal checkpoint
  (:class:`Checkpoints`). A chunk stores the state at its end when the step
  that computed its last token wrote it (:func:`state_stored`); otherwise it
  stores none (vLLM never materialized it). A hit resumes only at the end of a chunk that
  holds its state, and loads that one state: every earlier state is
  superseded by it.

What a window section stores. Hits end on chunk boundaries, or one block
short of one (the last token of a prompt is always computed), so a reader
never needs a window block more than ``window + block_size`` tokens before the
end of the chunk it resumes after. The blocks before that (:func:`store_start`)
would be loaded by no hit, however long the later request: it resumes at a
later boundary and needs later tokens still. They are not stored.
A block vLLM has already freed cannot be stored either (its memory may hold
another request's KV by then): :func:`held_start` says where the request's
blocks still begin. Each section records the token it starts at, and a
reader uses a chunk only where the section holds every block it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("full", "window", "state")


@dataclass(frozen=True)
class GroupSpec:
    kind: str  # one of KINDS
    layers: tuple[str, ...]
    window: int = 0  # tokens a query attends to, itself included ("window" only)
    # ("state" only) bytes of one layer's state per request on this rank, and
    # what decides them: the state tensors' shapes and dtypes and the TP size
    # (the state is split by TP in an order only the same TP size reads back).
    state_bytes: int = 0
    state_shape: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"group kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if (self.kind == "window") != (self.window > 0):
            raise ValueError("a window group needs window > 0, and only it")
        if (self.kind == "state") != (self.state_bytes > 0):
            raise ValueError("a state group needs state_bytes > 0, and only it")
        if not self.layers:
            raise ValueError("a KV cache group needs at least one layer")

    def describe(self) -> str:
        if self.kind == "window":
            head = f"window{self.window}"
        elif self.kind == "state":
            head = f"state[{self.state_shape}]"
        else:
            head = "full"
        return f"{head}:{','.join(self.layers)}"


def describe_groups(groups: Sequence[GroupSpec]) -> str:
    """The group layout as the namespace records it; empty for one full group
    (the layout every namespace had before groups, whose keys stay the same)."""
    if len(groups) == 1 and groups[0].kind == "full":
        return ""
    return ";".join(g.describe() for g in groups)


def first_needed_token(window: int, end: int, block_size: int) -> int:
    """First token of the first block a window group still holds when a request
    resumes computing at token ``end``: vLLM frees the blocks wholly before
    ``end - window + 1`` (``SlidingWindowManager.get_num_skipped_tokens``)."""
    return max(0, end - window + 1) // block_size * block_size


def store_start(window: int, chunk_tokens: int, block_size: int) -> int:
    """Offset inside a chunk of the first window token worth storing: the
    first block a hit ending at the chunk's end, or one block before it, needs."""
    return first_needed_token(window, chunk_tokens - block_size, block_size)


def held_start(window: int, computed_before: int, chunk_index: int, chunk_tokens: int,
               block_size: int) -> int:
    """Offset inside chunk ``chunk_index`` of the first block a request still
    holds in a window group during a step that began with ``computed_before``
    tokens computed (0 if it holds the whole chunk, ``chunk_tokens`` if none)."""
    first = first_needed_token(window, computed_before, block_size)
    return min(chunk_tokens, max(0, first - chunk_index * chunk_tokens))


@dataclass(frozen=True)
class Checkpoints:
    """Where vLLM's last prefill step of a Mamba group (align mode) also writes
    the state of an earlier position, its "internal prefill checkpoint": a
    prompt that fits in one step runs to its end, and the backend exports
    the state at the last cacheable boundary before it into block
    ``cdiv(end, block_size) - 2``. The rule is vLLM's
    (``get_mamba_prefill_checkpoint_position`` and
    ``is_mamba_prefill_checkpoint_valid`` in ``vllm/v1/kv_cache_interface.py``,
    which the worker's ``compute_mamba_prefill_checkpoints`` applies),
    restated here so the scheduler side stays free of vLLM; a test checks it
    against vLLM's functions.

    ``alignment``: the Mamba spec's ``prefill_checkpoint_alignment`` (0: the
    backend exports none); ``hash_block`` and ``hit_alignment``: the cache
    config's ``hash_block_size`` and ``cache_hit_alignment_tokens``."""

    hash_block: int
    hit_alignment: int
    alignment: int

    def position(self, start: int, end: int, block_size: int) -> int:
        """The position whose state a step computing ``[start, end)`` exports into
        block ``position // block_size - 1``, or 0 if it exports none there."""
        if self.alignment <= 0 or self.hit_alignment <= 0 or end < 1:
            return 0
        pos = max((end - 1) // self.hit_alignment * self.hit_alignment, 0)
        col = -(-end // block_size) - 2
        valid = (start % self.hash_block == 0
                 and col > (start - 1) // block_size
                 and start + self.hash_block <= pos
                 and start < pos < end
                 and (pos - start) % self.alignment == 0)
        # Only a block-aligned checkpoint lands in the block of its position.
        if not valid or pos % block_size or pos // block_size - 1 != col:
            return 0
        return pos


def state_stored(chunk_index: int, chunk_tokens: int, computed_before: int,
                 computed_after: int, block_size: int,
                 checkpoints: Checkpoints | None = None) -> bool:
    """Whether a chunk saved in the step that computed ``[computed_before,
    computed_after)`` can store its state: only if that step wrote the state
    after exactly the chunk's last token, as the step's end or as its
    internal checkpoint (a step that merely runs past the chunk's end leaves
    the state of a later token)."""
    end = (chunk_index + 1) * chunk_tokens
    if computed_after == end:
        return True
    return checkpoints is not None and \
        checkpoints.position(computed_before, computed_after, block_size) == end


def covered(groups: Sequence[GroupSpec], starts: Sequence[Sequence[int]], first_chunk: int,
            local_tokens: int, end: int, chunk_tokens: int, block_size: int) -> bool:
    """Whether chunks ``first_chunk, first_chunk + 1, ...`` (their sections'
    start tokens in ``starts``) hold every window block a request needs to
    resume at ``end`` with tokens below ``local_tokens`` already in its own
    cache. Full sections always start at 0."""
    for g, spec in enumerate(groups):
        if spec.kind != "window":
            continue
        need = max(first_needed_token(spec.window, end, block_size),
                   local_tokens // block_size * block_size)
        for i, chunk_starts in enumerate(starts):
            lo = (first_chunk + i) * chunk_tokens
            if lo >= end:
                break
            if lo + chunk_tokens <= need:
                continue
            if chunk_starts[g] > max(0, need - lo):
                return False
    return True
