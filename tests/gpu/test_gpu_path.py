"""s3kv's device code on real tensors: copies, stream ordering, the worker side.

Every layout vLLM's GPU attention backends hand to ``register_kv_caches``
is built by hand (``layouts.py``), filled with known values, and moved the
way s3kv moves it: the save path's copy-out (gather on the current stream,
device-to-host copy on a side stream into pinned memory), ``copy_in`` on the
load stream, and the worker side driven step by step in the order vLLM calls
its hooks (``Rig.step``). The CPU variants run everywhere; the CUDA ones
where a GPU is present.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from functools import partial

import pytest
import torch

from devtools.gpu_layouts import (
    GPU_LAYOUTS,
    LAYOUTS,
    MHA_LAYOUTS,
    MLA_LAYOUTS,
    Layout,
    canonical_bytes,
)
from devtools.gpu_rig import Rig, chunk_id
from s3kv.groups import GroupSpec, store_start
from s3kv.keys import ChunkRef
from s3kv.vllm.kv_layout import KVBlocks
from s3kv.vllm.metadata import LoadChunk, LoadRequest, S3KVMetadata, SaveChunk
from s3kv.vllm.saver import CopyOut
from tests.gpu.conftest import DEVICES, cuda

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

    done = CopyOut(kv).start([SRC], [dst])
    assert (done is None) == (not on_gpu)
    if done is not None:
        done()
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
        rig.step(rig.save_meta([(cid, SRC)]))
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
    rig.step(rig.save_meta([(cid, SRC), (cid2, second)]))  # two chunks, one step
    rig.flush()
    m = rig.manifest(cid)
    assert [s.rank for s in m.shards] == [0]
    assert m.shards[0].size == m.shards[0].payload_offset + rig.chunk_payload_bytes
    for c, blocks in ((cid, SRC), (cid2, second)):
        expected = torch.stack([canonical_bytes(x, blocks) for x in canon], dim=1)
        assert torch.equal(_bits(_payload(rig, c)), _bits(expected)), c[:8]

    rig.step(rig.load_meta("r1", cid, DST))
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
    rig.step(rig.load_meta("r2", cid, target))
    rig.flush()
    assert w.get_finished() == {"r2"}
    assert w.take_load_errors() == set(target)
    for t, b in zip(rig.caches.values(), before, strict=True):
        assert torch.equal(_bits(rig.layout.blocks(t, target)), _bits(b))

    # A truncated shard too.
    rig.put(key, bytes(body[:-7]))
    rig.step(rig.load_meta("r3", cid, target))
    rig.flush()
    assert w.get_finished() == {"r3"}
    assert w.take_load_errors() == set(target)


# --- stream ordering ----------------------------------------------------------------


def _fill(rig: Rig, blocks: list[int], value: float) -> None:
    # Pinned and non-blocking: a plain torch.tensor(..., device="cuda") would
    # wait for the busy stream and hide what the tests look for.
    idx = torch.tensor(blocks)
    if rig.device == "cuda":
        idx = idx.pin_memory().to(rig.device, non_blocking=True)
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
    blocks = list(range(16))
    torch.cuda.synchronize()
    torch.cuda._sleep(int(300 * cycles_per_ms))  # the step's forward, still running
    _fill(rig, blocks, 7.0)  # its KV, written at the end of the step
    busy = torch.cuda.Event()
    busy.record()
    t0 = time.perf_counter()
    rig.step(rig.save_meta([(chunk_id(2), blocks)]))  # the hooks, after the launch
    host_s = time.perf_counter() - t0
    assert not busy.query(), f"the forward stream finished while s3kv held it ({host_s:.3f} s)"
    assert host_s < 0.1
    rig.flush()
    assert bool((_payload(rig, chunk_id(2)).float() == 7.0).all()), "saved bytes predate the fill"


def _forward(rig: Rig, blocks: list[int], value: float, slow: Callable[[], None]) -> None:
    """A forward pass as far as the KV cache sees it: compute, then new KV in ``blocks``."""
    slow()
    _fill(rig, blocks, value)


@pytest.mark.parametrize("device", DEVICES)
def test_the_next_forward_cannot_overwrite_blocks_being_saved(
    make_rig: Callable[..., Rig], device: str, request: pytest.FixtureRequest
) -> None:
    """Step t saves chunk C from blocks B; the scheduler frees B and gives it to
    another request in step t+1, whose forward writes new KV there at once. The
    stored shard holds step t's values, round after round.

    In vLLM's order (``Rig.step``) nothing of s3kv runs between step t's
    ``wait_for_save`` and the launch of step t+1's forward: ``start_load_kv``
    comes after that launch. A copy-out that reads the cache on a side stream,
    ordered only after what the compute stream had queued at
    ``wait_for_save`` (s3kv before the saver kept its gather on the compute
    stream), is not ordered against that forward at all. Here both become
    runnable the moment step t's slow kernel ends: the overwrite is a few
    small kernels already at the head of the compute stream, while the side
    stream must first see the event, copy the block ids to the device and
    gather a step's eight chunks layer by layer, so later layers of B are read
    after they were overwritten and the shard is sealed with checksums of the
    wrong bytes: a chunk that verifies and is wrong. ``bench/gpu_forward.py``
    runs that old scheme as its ordering control and counts the wrong rounds.
    On CPU everything runs in call order; the variant checks the values only.
    """
    on_gpu = device == "cuda"
    rig = _big_rig(make_rig) if on_gpu else make_rig(GPU_LAYOUTS[0], device)
    k = rig.blocks_per_chunk
    step_blocks = [list(range(c * k, (c + 1) * k)) for c in range(rig.num_blocks // k)]
    b = step_blocks[0]  # chunk C; the others fill the step like a long prefill
    slow: Callable[[], None] = lambda: None  # noqa: E731
    if on_gpu:
        cycles = int(50 * request.getfixturevalue("cycles_per_ms"))
        # Long enough for the host to queue both steps before the device gets there.
        slow = lambda: torch.cuda._sleep(cycles)  # noqa: E731
    written = [x for blocks in step_blocks for x in blocks]
    rounds = 8 if on_gpu else 2
    wrong = []
    for i in range(rounds):
        saves = [(chunk_id(1000 * i + j), blocks) for j, blocks in enumerate(step_blocks)]
        rig.step(rig.save_meta(saves), partial(_forward, rig, written, float(i + 1), slow))
        rig.step(S3KVMetadata(), partial(_forward, rig, b, -2.0, lambda: None))
        rig.flush()
        payload = _payload(rig, saves[0][0]).float()
        if not bool((payload == i + 1).all()):
            wrong.append((i, [li for li in range(rig.layers)
                              if not bool((payload[:, li] == i + 1).all())]))
        for cid, _ in saves[1:]:
            assert bool((_payload(rig, cid).float() == i + 1).all()), cid[:8]
    assert wrong == [], f"(round, overwritten layers) of chunks saved with later bytes: {wrong}"


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
    rig.step(rig.save_meta([(chunk_id(3), src)]))
    rig.flush()
    meta = rig.load_meta("r", chunk_id(3), dst)
    torch.cuda.synchronize()
    # An earlier step, still running: its last write to the blocks the load targets.
    rig.step(S3KVMetadata(), lambda: _forward(
        rig, dst, 9.0, lambda: torch.cuda._sleep(int(200 * cycles_per_ms))))
    rig.step(meta)
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
    small.step(small.save_meta([(cid, src)]))
    small.flush()
    dst = [11, 2]  # the same 64 tokens in two 32-token blocks
    big.step(big.load_meta("r", cid, dst))
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", MHA_LAYOUTS, ids=lambda lay: lay.name)
def test_hybrid_groups_store_and_load_their_own_sections(
    make_rig: Callable[..., Rig], layout: Layout, device: str
) -> None:
    """Two KV cache groups (sliding window over layers 0 and 2, full attention
    over 1 and 3), each with its own block ids: the window section holds only
    the chunk's last blocks, and a load writes only the blocks each group lists."""
    names = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    window = GroupSpec("window", (names[0], names[2]), 16)
    full = GroupSpec("full", (names[1], names[3]))
    rig = make_rig(layout, device, groups=(window, full))
    assert rig.worker is not None
    canon = rig.canonical(seed=3)
    start = store_start(16, rig.chunk_tokens, rig.block_size)
    assert start == 2 * rig.block_size
    cid = chunk_id(11)
    full_src, window_src = [3, 7, 1, 12], [30, 31]  # the window's own block table
    rig.step(S3KVMetadata(saves=[SaveChunk(ChunkRef(cid, None, 0, rig.chunk_tokens),
                                           (tuple(window_src), tuple(full_src)),
                                           (start, 0))], round_id=1))
    rig.flush()
    m = rig.manifest(cid)
    assert m.starts == (start, 0)
    entry = m.shard_for_rank(0)
    per_token = rig.heads * rig.fp.token_elems * canon[0].element_size()
    assert entry.size - entry.payload_offset == per_token * 2 * (
        rig.chunk_tokens + rig.chunk_tokens - start)

    before = {n: t.clone() for n, t in rig.caches.items()}
    full_dst, window_dst = [20, 21, 40, 5], [44]  # the hit needs the window's last block only
    load = LoadChunk(m, (((3, window_dst[0]),), tuple(enumerate(full_dst))))
    rig.step(S3KVMetadata(loads=[LoadRequest("r", (load,), rig.wait_s)], round_id=2))
    rig.flush()
    assert rig.worker.get_finished() == {"r"}
    assert rig.worker.take_failed_requests() == set()
    for i, name in enumerate(names):
        t = rig.caches[name]
        src, dst = ((full_src, full_dst) if i % 2 else ([window_src[1]], window_dst))
        assert torch.equal(_bits(layout.blocks(t, dst)), _bits(layout.blocks(t, src))), name
        untouched = [b for b in range(rig.num_blocks) if b not in dst]
        assert torch.equal(_bits(layout.blocks(t, untouched)),
                           _bits(layout.blocks(before[name], untouched))), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", MHA_LAYOUTS[:1], ids=lambda lay: lay.name)
def test_a_state_group_stores_and_loads_one_state_per_chunk(
    make_rig: Callable[..., Rig], layout: Layout, device: str
) -> None:
    """An SSM group beside full attention: a chunk holds every layer's state of
    one block (the state at its end) or none; a load writes that state into
    the one block it names, in every layer, and nothing else: not the page's
    padding, not another block. A load that names a state the chunk lacks fails."""
    names = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    full = GroupSpec("full", tuple(names))
    state_layers = ("model.layers.4.mixer", "model.layers.5.mixer")
    state = GroupSpec("state", state_layers, state_bytes=1000, state_shape="test")
    rig = make_rig(layout, device, groups=(full, state))
    assert rig.worker is not None
    rig.canonical(seed=5)
    g = torch.Generator(device=device).manual_seed(6)
    for name in state_layers:
        pages = rig.caches[name]
        pages.copy_(torch.randint(-128, 128, pages.shape, generator=g, device=device,
                                  dtype=torch.int8))
    bpc, with_state, without = rig.blocks_per_chunk, chunk_id(21), chunk_id(22)
    rig.step(S3KVMetadata(saves=[
        SaveChunk(ChunkRef(with_state, None, 0, rig.chunk_tokens), ((3, 7, 1, 12), (9,)),
                  (0, 0)),
        SaveChunk(ChunkRef(without, None, 0, rig.chunk_tokens), ((4, 5, 6, 8), ()),
                  (0, rig.chunk_tokens)),
    ], round_id=1))
    rig.flush()
    attn_bytes = rig.chunk_payload_bytes
    section = -(-2 * 1000 // rig.heads) * rig.heads  # whole head-slices, zero-padded
    m, empty = rig.manifest(with_state), rig.manifest(without)
    assert m.starts == (0, 0) and empty.starts == (0, rig.chunk_tokens)
    assert m.shards[0].size - m.shards[0].payload_offset == attn_bytes + section
    assert empty.shards[0].size - empty.shards[0].payload_offset == attn_bytes

    before = {n: rig.caches[n].clone() for n in state_layers}
    full_dst = (20, 21, 40, 5)
    load = LoadChunk(m, (tuple(enumerate(full_dst)), ((bpc - 1, 33),)))
    rig.step(S3KVMetadata(loads=[LoadRequest("r", (load,), rig.wait_s)], round_id=2))
    rig.flush()
    assert rig.worker.get_finished() == {"r"}
    assert rig.worker.take_failed_requests() == set()
    for name in state_layers:
        t, old = rig.caches[name][:, 0, 0], before[name][:, 0, 0]
        assert torch.equal(t[33, :1000], t[9, :1000]), name
        assert torch.equal(t[33, 1000:], old[33, 1000:]), name  # the page's padding
        others = [b for b in range(rig.num_blocks) if b != 33]
        assert torch.equal(t[others], old[others]), name

    bad = LoadChunk(empty, (tuple(enumerate(full_dst)), ((bpc - 1, 34),)))
    rig.step(S3KVMetadata(loads=[LoadRequest("r2", (bad,), rig.wait_s)], round_id=3))
    rig.flush()
    assert rig.worker.get_finished() == {"r2"}
    assert rig.worker.take_failed_requests() == {"r2"}
    assert torch.equal(rig.caches[state_layers[0]][34], before[state_layers[0]][34])
