"""s3kv save and load throughput against the raw client, same objects, same run.

    .venv/bin/python bench/transfer.py [--quick] [--sizes 1MiB,8MiB] [--total 128MiB]
                                       [--reps 5] [--concurrency 8] [--endpoint URL]

For each backend (obstore, aioboto3) and shard size:

* save, s3kv: build each shard buffer (``s3kv.shard.allocate`` + fill the
  payload, standing for the device-to-host copy), ``Committer.submit`` it
  (world size 1, ``LocalGatherer``; one chunk per round), then ``flush``:
  uploads, checksums and one manifest PUT per chunk are all inside the time;
* save, raw: ``store.put`` of ready-made bytes of the identical object size
  to as many keys, with the same number of requests in flight;
* save, raw+manifest: the same, each followed by a create-only PUT of a
  manifest-sized object: the requests s3kv issues, without s3kv. It splits
  the gap between s3kv and raw into the cost of the extra request per chunk
  (s3kv/raw+manifest close to 1) and s3kv's own work;
* load, s3kv: ``s3kv.reader.read_shard`` (GET + size, header, payload
  layout and XXH3 checks) of every shard of one committed save, manifests
  already in hand (they come from the scheduler's lookup, measured in
  ``requests_cost.py``);
* load, raw: ``store.get`` of the very same shard objects.

Each load measurement reads every object ``LOAD_PASSES`` times, so that it
lasts about as long as a save measurement.

Throughput is KV payload bytes per second; the raw objects are the same size,
so the ratio s3kv/raw is the ratio of the two elapsed times. Each measurement
moves at least ``--total`` bytes and at least four waves of requests. The
modes run one after another within every repetition, in rotated order, so
drift hits all; the report gives medians, the ratio of medians and the
median of per-repetition ratios (target >= 0.9).
Results go to ``bench/results/transfer.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3

from bench.common import RESULTS, MotoProcess, format_size, machine_info, median, parse_size
from s3kv.aio import LoopThread
from s3kv.commit import ChunkSave, Committer, LocalGatherer
from s3kv.config import StoreSettings
from s3kv.keys import ChunkRef, KeyLayout, chain_chunk_ids, new_writer_id
from s3kv.manifest import Manifest, decode_manifest
from s3kv.reader import read_shard
from s3kv.shard import PayloadLayout, ShardSpec, allocate, encode_header
from s3kv.store import ObjectStore, open_store

BACKENDS = ("obstore", "aioboto3")
SAVE_MODES = ("s3kv", "raw", "raw+manifest")
LOAD_MODES = ("s3kv", "raw")
PACKAGES = ("obstore", "aioboto3", "aiobotocore", "xxhash", "moto")
NAMESPACE = "7a4f" * 8
PREFIX = "bench-transfer"
LAYOUT = KeyLayout(PREFIX)
WRITER = new_writer_id(1, "bench")
HEADS = 2
LAYERS = 8
BLOCK_TOKENS = 16  # payloads are whole 16-token blocks
TOKEN_ELEMS = 256  # bf16: 8 KiB per block per head per layer
MIB = 1 << 20
LOAD_PASSES = 3  # loads are fast: read every object this often per measurement


def spec_for(cid: str, size: int) -> ShardSpec:
    """A shard with ``size`` payload bytes (size a multiple of 128 KiB)."""
    per_block = HEADS * LAYERS * BLOCK_TOKENS * TOKEN_ELEMS * 2
    if size % per_block:
        raise ValueError(f"size must be a multiple of {format_size(per_block)}")
    layout = PayloadLayout("bfloat16",
                           tuple(f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)),
                           size // per_block * BLOCK_TOKENS, TOKEN_ELEMS)
    return ShardSpec(cid, 0, 0, HEADS, layout)


class Bench:
    def __init__(self, io: LoopThread, store: ObjectStore, size: int, count: int,
                 concurrency: int) -> None:
        self.io, self.store = io, store
        self.size, self.count, self.concurrency = size, count, concurrency
        self.src = os.urandom(size)  # the "device" bytes copied into every shard
        spec = spec_for("0" * 64, size)
        self.payload_layout = spec.layout  # what the reading engine expects
        self.payload_offset = len(encode_header(spec))
        self.object_size = self.payload_offset + spec.payload_bytes
        self.raw_data = os.urandom(self.object_size)
        self.manifest_data = b"{}"  # replaced by a real manifest's size after warm-up
        self.written: list[str] = []

    # --- save -----------------------------------------------------------------

    def save_s3kv(self) -> tuple[float, list[str]]:
        ids = chain_chunk_ids(list(range(self.count)), 1, {"run": uuid.uuid4().hex})
        committer = Committer(
            io=self.io, store=self.store, layout=LAYOUT, namespace=NAMESPACE,
            writer_id=WRITER, gatherer=LocalGatherer(),
            max_inflight_bytes=self.count * self.object_size + MIB,
            max_concurrency=self.concurrency, num_heads=HEADS,
        )
        t = time.perf_counter()
        for i, cid in enumerate(ids):
            spec = spec_for(cid, self.size)
            buf, payload = allocate(spec)
            payload[:] = self.src
            committer.submit(i, [ChunkSave(ChunkRef(cid, ids[i - 1] if i else None, i, 1), buf)])
        if not committer.flush(600):
            raise RuntimeError("committer did not flush")
        elapsed = time.perf_counter() - t
        committer.close()
        snap = committer.counters.snapshot()
        if snap.get("chunks_committed") != self.count:
            raise RuntimeError(f"only {snap.get('chunks_committed')} of {self.count} committed")
        self.written += [LAYOUT.manifest(NAMESPACE, c) for c in ids]
        self.written += [LAYOUT.shard(NAMESPACE, c, WRITER, 0) for c in ids]
        return elapsed, ids

    def save_raw(self, with_manifest: bool = False) -> float:
        keys = [f"{PREFIX}/raw/{uuid.uuid4().hex}" for _ in range(self.count)]
        self.written += keys
        if with_manifest:
            self.written += [k + ".manifest" for k in keys]

        async def one(key: str) -> None:
            await self.store.put(key, self.raw_data)
            if with_manifest:
                await self.store.put(key + ".manifest", self.manifest_data, mode="create")

        async def go() -> float:
            t = time.perf_counter()
            await self._pool(keys, one)
            return time.perf_counter() - t
        return self.io.run(go())

    # --- load -----------------------------------------------------------------

    def manifests(self, ids: list[str]) -> list[Manifest]:
        async def go() -> list[Manifest]:
            bodies = await asyncio.gather(
                *(self.store.get(LAYOUT.manifest(NAMESPACE, c)) for c in ids))
            return [decode_manifest(b, layout=LAYOUT, expect_namespace=NAMESPACE,
                                    expect_chunk_id=c, expect_heads=HEADS)
                    for b, c in zip(bodies, ids, strict=True)]
        return self.io.run(go())

    def load_s3kv(self, manifests: list[Manifest]) -> float:
        async def one(m: Manifest) -> None:
            payload = await read_shard(self.store, m, m.shard_for_rank(0), self.payload_layout)
            if payload.nbytes != self.size or bytes(payload[:64]) != self.src[:64]:
                raise RuntimeError("read back different bytes")

        async def go() -> float:
            t = time.perf_counter()
            await self._pool(manifests * LOAD_PASSES, one)
            return time.perf_counter() - t
        return self.io.run(go())

    def load_raw(self, manifests: list[Manifest]) -> float:
        keys = [m.shard_for_rank(0).key for m in manifests] * LOAD_PASSES

        async def one(key: str) -> None:
            body = await self.store.get(key)
            if len(body) != self.object_size:
                raise RuntimeError(f"GET {key}: {len(body)} bytes, expected {self.object_size}")

        async def go() -> float:
            t = time.perf_counter()
            await self._pool(keys, one)
            return time.perf_counter() - t
        return self.io.run(go())

    async def _pool(self, items: list[Any], op: Any) -> None:
        """``op(item)`` for every item, ``concurrency`` at a time (workers pull in order)."""
        it = iter(items)

        async def worker() -> None:
            for item in it:
                await op(item)
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def cleanup(self, keep: set[str] | frozenset[str] = frozenset()) -> None:
        doomed = [k for k in self.written if k not in keep]
        self.written = [k for k in self.written if k in keep]
        if doomed:
            self.io.run(self.store.delete_many(doomed))


def paired(runs: dict[str, list[float]], base: str) -> float:
    """Median over repetitions of (base seconds / s3kv seconds) = s3kv/base throughput."""
    return median(rb / rs for rs, rb in zip(runs["s3kv"], runs[base], strict=True))


def paired_range(runs: dict[str, list[float]], base: str) -> list[float]:
    ratios = [rb / rs for rs, rb in zip(runs["s3kv"], runs[base], strict=True)]
    return [min(ratios), max(ratios)]


def run_case(io: LoopThread, store: ObjectStore, backend: str, size: int, count: int,
             args: argparse.Namespace) -> list[dict[str, Any]]:
    b = Bench(io, store, size, count, args.concurrency)
    # Untimed warm-up: connections in the pool, allocator, committer thread start.
    b.save_raw()
    _, warm_ids = b.save_s3kv()
    b.manifest_data = b"m" * len(io.run(store.get(LAYOUT.manifest(NAMESPACE, warm_ids[0]))))
    b.load_raw(b.manifests(warm_ids))
    b.cleanup()
    kv_bytes = size * count
    save: dict[str, list[float]] = {m: [] for m in SAVE_MODES}
    load: dict[str, list[float]] = {m: [] for m in LOAD_MODES}
    keep: list[str] = []
    for rep in range(args.reps):
        order = SAVE_MODES[rep % 3:] + SAVE_MODES[:rep % 3]  # rotate: drift hits all
        for mode in order:
            if mode == "s3kv":
                secs, ids = b.save_s3kv()
                if not keep:
                    keep = ids
            else:
                secs = b.save_raw(with_manifest=mode == "raw+manifest")
            save[mode].append(secs)
            print(f"  {backend:<9} save {format_size(size):>7} rep {rep + 1} {mode:<12} "
                  f"{kv_bytes / MIB / secs:8.1f} MiB/s", flush=True)
        keep_keys = {LAYOUT.manifest(NAMESPACE, c) for c in keep}
        keep_keys |= {LAYOUT.shard(NAMESPACE, c, WRITER, 0) for c in keep}
        b.cleanup(keep_keys)
    manifests = b.manifests(keep)
    for rep in range(args.reps):
        order = LOAD_MODES if rep % 2 == 0 else LOAD_MODES[::-1]
        for mode in order:
            secs = b.load_s3kv(manifests) if mode == "s3kv" else b.load_raw(manifests)
            load[mode].append(secs / LOAD_PASSES)  # seconds per pass over kv_bytes
            print(f"  {backend:<9} load {format_size(size):>7} rep {rep + 1} {mode:<12} "
                  f"{kv_bytes * LOAD_PASSES / MIB / secs:8.1f} MiB/s", flush=True)
    b.cleanup()
    out = []
    for direction, runs in (("save", save), ("load", load)):
        mibs = {m: median(kv_bytes / MIB / s for s in runs[m]) for m in runs}
        row = {
            "backend": backend, "direction": direction, "shard_bytes": size,
            "object_bytes": b.object_size, "objects": count, "kv_bytes": kv_bytes,
            "concurrency": args.concurrency,
            "median_mib_s": mibs,
            "ratio_s3kv_over_raw": mibs["s3kv"] / mibs["raw"],
            # the same ratio taken within each repetition (neighbouring runs), then the
            # median: less sensitive to drift on a noisy machine than the ratio of medians
            "paired_ratio_s3kv_over_raw": paired(runs, "raw"),
            "paired_ratio_range": paired_range(runs, "raw"),
            "seconds": runs,
        }
        if "raw+manifest" in mibs:
            row["manifest_bytes"] = len(b.manifest_data)
            row["ratio_s3kv_over_raw_plus_manifest"] = mibs["s3kv"] / mibs["raw+manifest"]
            row["paired_ratio_s3kv_over_raw_plus_manifest"] = paired(runs, "raw+manifest")
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", help="S3 endpoint URL; default: a moto server started here")
    ap.add_argument("--quick", action="store_true", help="fewer bytes and 3 reps (~1 min)")
    ap.add_argument("--sizes", default="1MiB,8MiB", help="shard payload sizes")
    ap.add_argument("--total", default="128MiB",
                    help="KV bytes per measurement (at least 4 x concurrency objects)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (>= 3)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ap.add_argument("--out", type=Path, default=RESULTS / "transfer.json")
    args = ap.parse_args(argv)
    args.waves = 4
    if args.quick:
        args.total, args.reps, args.waves = "64MiB", 3, 2
    if args.reps < 3:
        ap.error("--reps must be at least 3")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    total = parse_size(args.total)

    load_before = [round(x, 2) for x in os.getloadavg()]
    moto = None if args.endpoint else MotoProcess()
    endpoint: str = args.endpoint if moto is None else moto.url
    bucket = f"s3kv-bench-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    print(f"endpoint {endpoint} ({'moto, child process' if moto else 'external'}); "
          f"{format_size(total)} per measurement, {args.concurrency} in flight, "
          f"{args.reps} reps", flush=True)
    started = time.perf_counter()
    io = LoopThread("bench-io")
    rows: list[dict[str, Any]] = []
    try:
        for backend in BACKENDS:
            store = io.run(open_store(StoreSettings(
                bucket=bucket, endpoint_url=endpoint, backend=backend,  # type: ignore[arg-type]
                max_concurrency=args.concurrency)))
            try:
                for size in sizes:
                    count = max(total // size, args.waves * args.concurrency)
                    rows += run_case(io, store, backend, size, count, args)
            finally:
                io.run(store.close())
    finally:
        try:
            client.delete_bucket(Bucket=bucket)
        except Exception as exc:
            print(f"warning: could not delete bucket {bucket}: {exc}", file=sys.stderr)
        io.stop()
        if moto:
            moto.close()
    wall = time.perf_counter() - started

    print(f"\n{'backend':<10}{'dir':<5}{'shard':>7}{'s3kv MiB/s':>11}{'raw MiB/s':>10}"
          f"{'s3kv/raw':>9}{'(paired)':>9}{'raw+mf MiB/s':>13}{'s3kv/raw+mf':>12}{'(paired)':>9}")
    for r in rows:
        m = r["median_mib_s"]
        extra = (f"{m['raw+manifest']:>13.1f}{r['ratio_s3kv_over_raw_plus_manifest']:>12.2f}"
                 f"{r['paired_ratio_s3kv_over_raw_plus_manifest']:>9.2f}"
                 if "raw+manifest" in m else "")
        print(f"{r['backend']:<10}{r['direction']:<5}{format_size(r['shard_bytes']):>7}"
              f"{m['s3kv']:>11.1f}{m['raw']:>10.1f}{r['ratio_s3kv_over_raw']:>9.2f}"
              f"{r['paired_ratio_s3kv_over_raw']:>9.2f}{extra}")
    print(f"\nmedians of {args.reps} runs, order rotated every repetition; "
          f"(paired) = median of per-repetition ratios; {wall:.0f} s in all")
    doc = {
        "benchmark": "transfer",
        "machine": machine_info(PACKAGES),
        "endpoint": {"kind": "moto (child process)" if moto else "external",
                     "url": None if moto else endpoint},
        "settings": {"sizes": sizes, "min_total_bytes": total, "reps": args.reps,
                     "concurrency": args.concurrency, "chunks_per_round": 1,
                     "load_passes": LOAD_PASSES, "load_seconds": "per pass over kv_bytes",
                     "unit": "KV payload MiB/s (raw objects have the identical size)"},
        "wall_seconds": round(wall, 1),
        "loadavg_before": load_before,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
