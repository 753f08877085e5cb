"""Reads across TP sizes, and bytes stored per chunk at every TP size, same run.

    .venv/bin/python bench/cross_tp.py [--quick] [--chunks 6] [--reps 3]

Llama-3.1-8B KV shapes (32 layers, 8 KV heads, head size 128, bf16) with
256-token chunks (32 MiB of KV per chunk), against a moto S3 server in its
own process, through s3kv's own shard, manifest, planner and reader code:

* bytes stored per chunk over the model's KV bytes for that chunk, written
  at TP 1, 2, 4 and 8 (8 KV heads), for a model with 1 KV head at TP 4, and
  for an MLA latent (576 elements per token) at TP 4: the shards written are
  those of the ranks that upload (``s3kv.heads``). Must be 1.00, plus one
  header per shard;
* load: every reader rank fetches and verifies its head range of every
  chunk (ranks run concurrently, as the workers of one engine do) for a
  TP=2-written set read at TP=2 (same layout: one whole GET per rank), at
  TP=1 (two whole GETs) and at TP=4 (one ranged GET per rank). Reported as
  GB/s of KV loaded and as the ratio to the same-TP read; the reads alternate
  in each repetition, medians over repetitions.

Results go to ``bench/results/cross_tp.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3

from bench.common import RESULTS, MotoProcess, machine_info, median
from s3kv.config import StoreSettings
from s3kv.heads import head_range, uploading_ranks
from s3kv.keys import KeyLayout, chain_chunk_ids, new_writer_id
from s3kv.manifest import Manifest, new_manifest
from s3kv.reader import read_heads
from s3kv.shard import PayloadLayout, ShardSpec, allocate, seal
from s3kv.store import ObjectStore, open_store

NAMESPACE = "c7055" + "0" * 27
PREFIX = "bench-cross-tp"
LAYOUT = KeyLayout(PREFIX)
LAYERS = tuple(f"model.layers.{i}.self_attn.attn" for i in range(32))
TOKENS = 256
GQA = PayloadLayout("bfloat16", LAYERS, TOKENS, 2 * 128)  # one KV head
MLA = PayloadLayout("bfloat16", LAYERS, TOKENS, 512 + 64)  # the one latent


async def write_chunks(store: ObjectStore, payload: PayloadLayout, heads: int, tp: int,
                       count: int) -> tuple[list[Manifest], int]:
    """Chunks written at TP ``tp`` as s3kv's uploading ranks write them; returns the
    manifests and the bytes of every shard object stored."""
    ids = chain_chunk_ids(list(range(count)), 1, {"run": uuid.uuid4().hex})
    writer = new_writer_id(tp, uuid.uuid4().hex[:12])
    manifests, stored = [], 0
    for i, cid in enumerate(ids):
        entries = []
        for rank, (lo, hi) in uploading_ranks(heads, tp).items():
            buf, view = allocate(ShardSpec(cid, rank, lo, hi, payload))
            view[: 1 << 20] = bytes(range(256)) * 4096  # some non-zero bytes
            key = LAYOUT.shard(NAMESPACE, cid, writer, rank)
            entries.append(seal(buf, key))
            await store.put(key, buf)
            stored += len(buf)
        m = new_manifest(namespace=NAMESPACE, chunk_id=cid, parent_id=ids[i - 1] if i else None,
                         chunk_index=i, num_tokens=TOKENS, writer=writer, shards=entries,
                         tp_size=tp)
        await store.put(LAYOUT.manifest(NAMESPACE, cid), m.encode(), mode="create")
        manifests.append(m)
    return manifests, stored


async def load_all(store: ObjectStore, manifests: list[Manifest], heads: int,
                   reader_tp: int) -> tuple[float, int]:
    """Every reader rank loads its heads of every chunk, ranks concurrently."""
    sem = asyncio.Semaphore(16)

    async def one(m: Manifest, rank: int) -> int:
        lo, hi = head_range(heads, rank, reader_tp)
        async with sem:
            pieces = await read_heads(store, m, lo, hi, GQA)
        return sum(len(p.payload) for p in pieces)

    t = time.perf_counter()
    sizes = await asyncio.gather(*(one(m, r) for m in manifests for r in range(reader_tp)))
    return time.perf_counter() - t, sum(sizes)


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    bucket = f"cross-tp-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
    store = await open_store(StoreSettings(bucket=bucket, endpoint_url=url))
    out: dict[str, Any] = {"bytes_ratio": [], "load": {}}
    try:
        for label, payload, heads, tp in [
            ("8 KV heads, TP 1", GQA, 8, 1), ("8 KV heads, TP 2", GQA, 8, 2),
            ("8 KV heads, TP 4", GQA, 8, 4), ("8 KV heads, TP 8", GQA, 8, 8),
            ("1 KV head, TP 4", GQA, 1, 4), ("MLA latent, TP 4", MLA, 1, 4),
        ]:
            ms, stored = await write_chunks(store, payload, heads, tp, 2)
            kv = heads * payload.head_bytes * len(ms)  # the model's KV bytes, per chunk x chunks
            payload_stored = sum(s.size - s.payload_offset for m in ms for s in m.shards)
            out["bytes_ratio"].append({
                "case": label, "shards_per_chunk": len(ms[0].shards),
                "payload_ratio": payload_stored / kv, "stored_ratio": stored / kv,
            })
        manifests, _ = await write_chunks(store, GQA, 8, 2, args.chunks)
        times: dict[int, list[float]] = {1: [], 2: [], 4: []}
        loaded: dict[int, int] = {}
        for rep in range(args.reps):
            order = [2, 1, 4] if rep % 2 == 0 else [4, 1, 2]
            for reader_tp in order:
                dt, n = await load_all(store, manifests, 8, reader_tp)
                times[reader_tp].append(dt)
                loaded[reader_tp] = n
        same = median(times[2])
        for reader_tp, ts in times.items():
            out["load"][f"TP2 written, TP{reader_tp} read"] = {
                "seconds": median(ts), "GBps": loaded[reader_tp] / median(ts) / 1e9,
                "vs_same_tp": median(ts) / same, "bytes": loaded[reader_tp],
            }
    finally:
        await store.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 chunks, 1 repetition")
    args = ap.parse_args()
    if args.quick:
        args.chunks, args.reps = 2, 1
    with MotoProcess() as moto:
        res = asyncio.run(run(args, moto.url))
    print("bytes stored per chunk / model KV bytes per chunk")
    for r in res["bytes_ratio"]:
        print(f"  {r['case']:<18} shards {r['shards_per_chunk']}  payload "
              f"{r['payload_ratio']:.4f}  with headers {r['stored_ratio']:.4f}")
    print(f"load of {args.chunks} chunks x 32 MiB (time; ratio to the same-TP read)")
    for name, r in res["load"].items():
        print(f"  {name:<22} {r['seconds']:.2f} s  {r['GBps']:.2f} GB/s  "
              f"x{r['vs_same_tp']:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cross_tp.json").write_text(json.dumps(
        {"machine": machine_info(("obstore", "moto")), "args": vars(args), **res},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
