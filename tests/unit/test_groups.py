"""KV cache groups: which window blocks are stored and needed, and shards whose
groups are sections (built, sealed, decoded and read back section by section)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3kv.errors import IntegrityError, ManifestError
from s3kv.groups import (
    GroupSpec,
    covered,
    describe_groups,
    first_needed_token,
    held_start,
    store_start,
)
from s3kv.keys import new_writer_id
from s3kv.manifest import decode_manifest, new_manifest
from s3kv.reader import read_heads
from s3kv.shard import PayloadLayout, ShardSpec, allocate, range_bounds, seal, verify_range
from tests.unit.builders import CIDS, LAYOUT, NS, pattern
from tests.unit.test_reader import RecordingStore

FULL = GroupSpec("full", ("l1", "l3"))


def window(w: int) -> GroupSpec:
    return GroupSpec("window", ("l0", "l2"), w)


# --- what a window group needs and stores -------------------------------------------


def test_first_needed_token_is_the_first_block_vllm_keeps() -> None:
    # vLLM frees blocks wholly before end - window + 1 (get_num_skipped_tokens).
    assert first_needed_token(128, 512, 16) == 384  # 512 - 127 = 385 -> block 24
    assert first_needed_token(128, 127, 16) == 0
    assert first_needed_token(4, 7, 1) == 4  # vLLM's own docstring example
    assert first_needed_token(1024, 300, 128) == 0


def test_store_start_keeps_a_window_and_a_block() -> None:
    # gpt-oss-like: window 128, 16-token blocks, 256-token chunks: tokens 112..255.
    assert store_start(128, 256, 16) == 112
    # A window longer than the chunk: the whole chunk.
    assert store_start(1024, 256, 16) == 0
    assert store_start(128, 256, 128) == 0


def test_describe_groups_is_empty_for_one_full_group() -> None:
    assert describe_groups([FULL]) == ""
    assert describe_groups([window(128), FULL]) == "window128:l0,l2;full:l1,l3"
    with pytest.raises(ValueError, match="window"):
        GroupSpec("window", ("l0",))
    with pytest.raises(ValueError, match="valid"):
        GroupSpec("mamba", ("l0",))


@settings(max_examples=300, deadline=None)
@given(
    w=st.integers(1, 700),
    bs=st.sampled_from([1, 16, 32, 128]),
    bpc=st.integers(1, 8),
    n_chunks=st.integers(1, 5),
    steps=st.lists(st.integers(1, 600), min_size=1, max_size=40),
    local_blocks=st.integers(0, 40),
)
def test_saved_chunks_cover_every_boundary_and_hold_no_freed_block(
    w: int, bs: int, bpc: int, n_chunks: int, steps: list[int], local_blocks: int,
) -> None:
    """A request computes its tokens in steps of any size (chunked prefill,
    decode); each chunk is saved in the step that completes it, as the
    scheduler side plans it. Then no stored block is one vLLM had freed by
    that step, and a reader resuming at any chunk boundary finds every
    window block it needs."""
    t = bs * bpc
    total = n_chunks * t
    groups = [window(w), FULL]
    starts: list[tuple[int, int]] = []
    before = 0
    sizes = iter(steps * (total // max(1, min(steps)) + 1))
    while before < total:
        after = min(total, before + next(sizes))
        freed_upto = max(0, before - w + 1) // bs * bs  # vLLM freed these blocks
        for ci in range(len(starts), after // t):
            s = max(store_start(w, t, bs), held_start(w, before, ci, t, bs))
            assert ci * t + s >= freed_upto or s == t
            assert s % bs == 0
            starts.append((s, 0))
        before = after
    for first in range(n_chunks):
        for k in range(first + 1, n_chunks + 1):
            local = min(local_blocks * bs, first * t)
            assert covered(groups, starts[first:k], first, local, k * t, t, bs), (first, k)


def test_covered_refuses_a_section_that_starts_too_late() -> None:
    groups = [window(128), FULL]
    # Chunks of 256 tokens, 16-token blocks; a hit to 512 needs tokens 384..511.
    assert covered(groups, [(0, 0), (112, 0)], 0, 0, 512, 256, 16)
    assert covered(groups, [(256, 0), (128, 0)], 0, 0, 512, 256, 16)  # chunk 0 not needed
    assert not covered(groups, [(0, 0), (144, 0)], 0, 0, 512, 256, 16)
    # One block short of the boundary: tokens 368.. needed.
    assert covered(groups, [(0, 0), (112, 0)], 0, 0, 496, 256, 16)
    assert not covered(groups, [(0, 0), (128, 0)], 0, 0, 496, 256, 16)
    # Blocks below the request's own cached tokens are not needed from the store.
    assert covered(groups, [(0, 0), (144, 0)], 0, 400, 512, 256, 16)


# --- shards with sections -------------------------------------------------------------

LAYERS = ("l0", "l2", "l1", "l3")  # group-major: window layers, then full ones
SECTIONED = PayloadLayout("float16", LAYERS, 8, 16, groups=(2, 2))
STARTS = (6, 0)  # the window section holds tokens 6..7, the full one all 8


def _sectioned_chunk(heads: tuple[int, int] = (0, 4)) -> tuple[bytes, ShardSpec]:
    spec = ShardSpec(CIDS[1], 0, heads[0], heads[1], SECTIONED, STARTS)
    buf, payload = allocate(spec)
    payload[:] = pattern(len(payload), seed=5)
    return bytes(buf), spec


def test_section_sizes_and_header() -> None:
    _data, spec = _sectioned_chunk()
    per_window = 2 * 2 * 16 * 2  # 2 layers x 2 tokens x 16 elements x fp16
    per_full = 2 * 8 * 16 * 2
    assert spec.head_bytes == per_window + per_full
    assert spec.section_bounds() == [(0, 4 * per_window), (4 * per_window, 4 * spec.head_bytes)]
    doc = spec.header_doc()
    assert doc["groups"] == [2, 2] and doc["starts"] == [6, 0]
    # One group: the header single-group shards always had.
    assert "groups" not in ShardSpec(CIDS[1], 0, 0, 1, PayloadLayout("float16", LAYERS, 8, 16)
                                     ).header_doc()
    with pytest.raises(IntegrityError, match="starts"):
        PayloadLayout("float16", LAYERS, 8, 16, groups=(2, 2)).starts((9, 0))
    with pytest.raises(ValueError, match="partition"):
        PayloadLayout("float16", LAYERS, 8, 16, groups=(1, 2))


def test_sections_are_checksummed_and_read_separately() -> None:
    data, spec = _sectioned_chunk()
    key = LAYOUT.shard(NS, CIDS[1], new_writer_id(1, "w"), 0)
    entry = seal(data, key)
    assert entry.starts == STARTS and len(entry.head_checksums) == 2 * 4
    manifest = new_manifest(namespace=NS, chunk_id=CIDS[1], parent_id=CIDS[0], chunk_index=1,
                            num_tokens=8, writer=new_writer_id(1, "w"), shards=[entry],
                            tp_size=1)
    back = decode_manifest(manifest.encode(), layout=LAYOUT)
    assert back == manifest and back.starts == STARTS
    off = entry.payload_offset
    bounds = spec.section_bounds()
    # Heads 1..3 of the full section: one contiguous range, checked by its digests.
    lo, hi = range_bounds(entry, 1, 3, SECTIONED, section=1)
    per_full = SECTIONED.section_head_bytes(1, 0)
    assert (lo, hi) == (off + bounds[1][0] + per_full, off + bounds[1][0] + 3 * per_full)
    verify_range(data[lo:hi], entry, 1, 3, section=1)
    with pytest.raises(IntegrityError, match="checksum"):
        verify_range(data[lo:hi], entry, 1, 3, section=0)  # another section's digests
    bad = bytearray(data[lo:hi])
    bad[-1] ^= 1
    with pytest.raises(IntegrityError, match="checksum"):
        verify_range(bytes(bad), entry, 1, 3, section=1)

    async def main() -> None:
        store = RecordingStore()
        await store.put(key, data)
        whole = await read_heads(store, manifest, 0, 4, SECTIONED)
        assert [(p.section, bytes(p.payload)) for p in whole] == [
            (g, data[off + a : off + b]) for g, (a, b) in enumerate(bounds)]
        assert store.gets == [(key, None)]
        store.gets.clear()
        # Only the full section: one ranged GET of its bytes, none of the window's.
        (piece,) = await read_heads(store, manifest, 0, 4, SECTIONED, sections=[1])
        assert piece.section == 1 and bytes(piece.payload) == data[off + bounds[1][0] :]
        assert store.gets == [(key, (off + bounds[1][0], off + bounds[1][1]))]
        # A reader whose layout differs (one group) cannot read it.
        with pytest.raises(IntegrityError):
            await read_heads(store, manifest, 0, 4, PayloadLayout("float16", LAYERS, 8, 16))

    asyncio.run(main())


def test_manifest_rejects_disagreeing_or_malformed_starts() -> None:
    data, _ = _sectioned_chunk((0, 2))
    other = ShardSpec(CIDS[1], 1, 2, 4, SECTIONED, (4, 0))
    buf, _payload = allocate(other)
    w = new_writer_id(2, "w")
    e0 = seal(data, LAYOUT.shard(NS, CIDS[1], w, 0))
    e1 = seal(bytes(buf), LAYOUT.shard(NS, CIDS[1], w, 1))
    with pytest.raises(ManifestError, match="start tokens"):
        new_manifest(namespace=NS, chunk_id=CIDS[1], parent_id=CIDS[0], chunk_index=1,
                     num_tokens=8, writer=w, shards=[e0, e1], tp_size=2)
    m = new_manifest(namespace=NS, chunk_id=CIDS[1], parent_id=CIDS[0], chunk_index=1,
                     num_tokens=8, writer=new_writer_id(1, "w"),
                     shards=[seal(_sectioned_chunk()[0],
                                  LAYOUT.shard(NS, CIDS[1], new_writer_id(1, "w"), 0))],
                     tp_size=1)
    raw = m.encode().replace(b'"starts":[6,0]', b'"starts":[6]')
    with pytest.raises(ManifestError, match="starts"):
        decode_manifest(raw, layout=LAYOUT)
    raw = m.encode().replace(b'"starts":[6,0]', b'"starts":[6,0,0]')
    with pytest.raises(ManifestError, match="head_checksums"):
        decode_manifest(raw, layout=LAYOUT)
