"""s3kv's device code on real tensors: copies, stream ordering, the worker side.

Every layout vLLM's GPU attention backends hand to ``register_kv_caches``
is built by hand (``layouts.py``), filled with known values, and moved the
way s3kv moves it: ``copy_out`` on the side stream into pinned memory,
``copy_in`` on the load stream, and the worker side driven as vLLM drives
it. The CPU variants run everywhere; the CUDA ones where a GPU is present.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
import torch

from s3kv.vllm.kv_layout import KVBlocks
from s3kv.vllm.metadata import S3KVMetadata
from tests.gpu.conftest import DEVICES, cuda
from tests.gpu.layouts import (
    GPU_LAYOUTS,
    LAYOUTS,
    MHA_LAYOUTS,
    MLA_LAYOUTS,
    Layout,
    canonical_bytes,
)
from tests.gpu.rig import Rig, chunk_id

SRC = [3, 7, 1, 12]  # a chunk's blocks, deliberately out of order
DST = [20, 21, 40, 5]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8).cpu()


def _same_blocks(rig: Rig, a: list[int], b: list[int]) -> bool:
    return all(
        torch.equal(_bits(rig.layout.blocks(t, a)), _bits(rig.layout.blocks(t, b)))
        for t in rig.caches.values()
    )


def _payload(rig: Rig, cid: str) -> torch.Tensor:
    """The stored shard's payload as ``[H, L, blocks, N, 2, D]`` on the host."""
    entry = rig.manifest(cid).shard_for_rank(0)
    body = bytearray(rig.get(entry.key))
    flat = torch.frombuffer(body, dtype=torch.uint8)[entry.payload_offset:]
    return flat.view(rig.caches[next(iter(rig.caches))].dtype).view(
        rig.heads, rig.layers, rig.blocks_per_chunk, rig.block_size, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_round_trip_on_the_side_and_load_streams(
    make_rig: Callable[..., Rig], layout: Layout, device: str
) -> None:
    rig = make_rig(layout, device)
    canon = rig.canonical(seed=1)
    before = {n: t.clone() for n, t in rig.caches.items()}
    kv = KVBlocks(rig.caches, rig.num_blocks, rig.heads, rig.block_size, mla=layout.mla,
                  token_map=layout.token_map(rig.block_size, rig.head_size))
    on_gpu = device == "cuda"
    host = torch.empty(rig.chunk_payload_bytes, dtype=torch.uint8, pin_memory=on_gpu)
    dst = kv.payload_view(host, rig.heads, len(SRC))

    side = torch.cuda.Stream() if on_gpu else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        kv.copy_out([SRC], [dst])
    if side is not None:
        side.synchronize()
    expected = torch.stack([canonical_bytes(c, SRC) for c in canon], dim=1)  # [H, L, k, N, ...]
    assert torch.equal(_bits(dst), _bits(expected)), "payload is not in canonical order"

    load = torch.cuda.Stream() if on_gpu else None
    with torch.cuda.stream(load) if load is not None else contextlib.nullcontext():
        kv.copy_in(dst, list(range(len(SRC))), DST)
    if load is not None:
        load.synchronize()
    assert _same_blocks(rig, DST, SRC)
    untouched = [b for b in range(rig.num_blocks) if b not in DST]
    for name, t in rig.caches.items():
        assert torch.equal(_bits(layout.blocks(t, untouched)),
                           _bits(layout.blocks(before[name], untouched))), name


@pytest.mark.parametrize("device", DEVICES)
def test_every_layout_stores_the_same_bytes(make_rig: Callable[..., Rig], device: str) -> None:
    """The backend's tensor layout is not part of the stored bytes."""
    for family in (MHA_LAYOUTS, MLA_LAYOUTS):
        _same_bytes(make_rig, family, device)


def _same_bytes(make_rig: Callable[..., Rig], layouts: list[Layout], device: str) -> None:
    payloads = []
    for layout in layouts:
        rig = make_rig(layout, device)
        rig.canonical(seed=7)
        cid = chunk_id(0)
        assert rig.worker is not None
        rig.worker.wait_for_save(rig.save_meta([(cid, SRC)]))
        rig.flush()
        payloads.append(_bits(_payload(rig, cid)))
    for layout, p in zip(layouts[1:], payloads[1:], strict=True):
        assert torch.equal(p, payloads[0]), f"{layout.name} differs from {layouts[0].name}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", GPU_LAYOUTS, ids=lambda lay: lay.name)
def test_worker_side_saves_loads_and_rejects_a_corrupt_shard(
    make_rig: Callable[..., Rig], layout: Layout, device: str
) -> None:
    rig = make_rig(layout, device)
    canon = rig.canonical(seed=2)
    w = rig.worker
    assert w is not None
    cid, cid2 = chunk_id(1), chunk_id(2)
    second = [50, 2, 33, 9]
    w.wait_for_save(rig.save_meta([(cid, SRC), (cid2, second)]))  # two chunks, one step
    rig.flush()
    m = rig.manifest(cid)
    assert [s.rank for s in m.shards] == [0]
    assert m.shards[0].size == m.shards[0].payload_offset + rig.chunk_payload_bytes
    for c, blocks in ((cid, SRC), (cid2, second)):
        expected = torch.stack([canonical_bytes(x, blocks) for x in canon], dim=1)
        assert torch.equal(_bits(_payload(rig, c)), _bits(expected)), c[:8]

    w.start_load_kv(rig.load_meta("r1", cid, DST))
    rig.flush()
    assert w.get_finished() == {"r1"}
    assert w.take_load_errors() == set()
    assert _same_blocks(rig, DST, SRC)

    # One flipped payload byte: the load is an error and the blocks stay as they were.
    key = m.shards[0].key
    body = bytearray(rig.get(key))
    body[m.shards[0].payload_offset + 1000] ^= 0x40
    rig.put(key, bytes(body))
    target = [30, 31, 32, 33]
    before = [rig.layout.blocks(t, target).clone() for t in rig.caches.values()]
    w.start_load_kv(rig.load_meta("r2", cid, target))
    rig.flush()
    assert w.get_finished() == {"r2"}
    assert w.take_load_errors() == set(target)
    for t, b in zip(rig.caches.values(), before, strict=True):
        assert torch.equal(_bits(rig.layout.blocks(t, target)), _bits(b))

    # A truncated shard too.
    rig.put(key, bytes(body[:-7]))
    w.start_load_kv(rig.load_meta("r3", cid, target))
    rig.flush()
    assert w.get_finished() == {"r3"}
    assert w.take_load_errors() == set(target)


# --- CUDA stream ordering ------------------------------------------------------------


def _fill(rig: Rig, blocks: list[int], value: float) -> None:
    # Pinned and non-blocking: a plain torch.tensor(..., device="cuda") would
    # wait for the busy stream and hide what the tests look for.
    idx = torch.tensor(blocks).pin_memory().to(rig.device, non_blocking=True)
    for t in rig.caches.values():
        t.index_fill_(rig.layout.block_dim, idx, value)


def _big_rig(make_rig: Callable[..., Rig]) -> Rig:
    # 8 MiB per chunk: a device-to-host copy long enough to race with.
    return make_rig(GPU_LAYOUTS[0], "cuda", layers=8, heads=8, head_size=128, block_size=16,
                    chunk_tokens=256, num_blocks=128)


@cuda
def test_wait_for_save_returns_while_the_forward_stream_is_busy(
    make_rig: Callable[..., Rig], cycles_per_ms: float
) -> None:
    rig = _big_rig(make_rig)
    w = rig.worker
    assert w is not None
    blocks = list(range(16))
    torch.cuda.synchronize()
    torch.cuda._sleep(int(300 * cycles_per_ms))  # the "forward pass" still running
    _fill(rig, blocks, 7.0)  # its KV, written at the end of the step
    busy = torch.cuda.Event()
    busy.record()
    t0 = time.perf_counter()
    w.wait_for_save(rig.save_meta([(chunk_id(2), blocks)]))
    w.start_load_kv(S3KVMetadata())
    host_s = time.perf_counter() - t0
    assert not busy.query(), f"the forward stream finished while s3kv held it ({host_s:.3f} s)"
    assert host_s < 0.1
    rig.flush()
    assert bool((_payload(rig, chunk_id(2)).float() == 7.0).all()), "saved bytes predate the fill"


@cuda
def test_copy_out_is_ordered_against_the_next_steps_writes(
    make_rig: Callable[..., Rig], cycles_per_ms: float
) -> None:
    """Many rounds of: step writes chunk A, s3kv saves A on the side stream, the
    next step writes other blocks and then overwrites A. The saved bytes are
    always A's values from before the overwrite."""
    rig = _big_rig(make_rig)
    w = rig.worker
    assert w is not None
    a, others = list(range(16)), list(range(16, 64))
    rounds = 40
    for i in range(rounds):
        torch.cuda._sleep(int(0.5 * cycles_per_ms))
        _fill(rig, a, float(i + 1))
        w.wait_for_save(rig.save_meta([(chunk_id(100 + i), a)]))
        _fill(rig, others, -1.0)
        w.start_load_kv(S3KVMetadata())  # the next step begins
        _fill(rig, a, -2.0)
    rig.flush()
    wrong = [i for i in range(rounds)
             if not bool((_payload(rig, chunk_id(100 + i)).float() == i + 1).all())]
    assert wrong == [], f"rounds whose saved bytes were overwritten first: {wrong}"


@cuda
def test_loads_wait_for_kernels_queued_before_the_step(
    make_rig: Callable[..., Rig], cycles_per_ms: float
) -> None:
    """A load into blocks that earlier queued kernels still write lands after them."""
    rig = _big_rig(make_rig)
    w = rig.worker
    assert w is not None
    src, dst = list(range(16)), list(range(32, 48))
    _fill(rig, src, 3.0)
    w.wait_for_save(rig.save_meta([(chunk_id(3), src)]))
    rig.flush()
    meta = rig.load_meta("r", chunk_id(3), dst)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(200 * cycles_per_ms))
    _fill(rig, dst, 9.0)  # an earlier step's last write to these blocks
    w.start_load_kv(meta)
    rig.flush()
    assert w.get_finished() == {"r"}
    assert w.take_load_errors() == set()
    for t in rig.caches.values():
        assert bool((rig.layout.blocks(t, dst).float() == 3.0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_chunks_move_between_block_sizes(
    make_rig: Callable[..., Rig], layout: Layout, device: str
) -> None:
    """A chunk saved by an engine with 16-token blocks loads into one with
    32-token blocks: the stored payload is token-major in every layout."""
    small = make_rig(layout, device, block_size=16, num_blocks=32)
    canon = small.canonical(seed=5)
    big = make_rig(layout, device, block_size=32, num_blocks=16, store=small.store)
    assert big.fp.namespace == small.fp.namespace
    assert small.worker is not None and big.worker is not None
    cid = chunk_id(7)
    src = [9, 3, 20, 4]  # 64 tokens in four 16-token blocks
    small.worker.wait_for_save(small.save_meta([(cid, src)]))
    small.flush()
    dst = [11, 2]  # the same 64 tokens in two 32-token blocks
    big.worker.start_load_kv(big.load_meta("r", cid, dst))
    big.flush()
    assert big.worker.get_finished() == {"r"} and big.worker.take_load_errors() == set()
    shape = big.layout.canonical_shape(len(dst), big.heads, big.block_size, big.head_size)
    for c, t in zip(canon, big.caches.values(), strict=True):
        want = c[src].transpose(0, 1).flatten(1, 2)  # [heads, 64 tokens, ...]
        got = _canonical_of(big.layout, t, dst, shape).transpose(0, 1).flatten(1, 2)
        assert torch.equal(got.cpu(), want.to(torch.float64).cpu())

def _canonical_of(layout: Layout, logical: torch.Tensor, ids: list[int],
                  shape: tuple[int, ...]) -> torch.Tensor:
    """Blocks ``ids`` of a logical cache tensor back in canonical order (the
    inverse of ``layout.from_canonical``, found by filling a probe)."""
    idx = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(shape)
    probe = layout.from_canonical(idx)
    picked = layout.blocks(logical, ids).to(torch.float64)
    out = torch.empty(shape, dtype=torch.float64, device=logical.device)
    out.view(-1)[probe.reshape(-1).long().to(logical.device)] = picked.reshape(-1)
    return out
