"""obstore vs aioboto3 on the same S3 endpoint, in the same run.

    .venv/bin/python bench/store_backends.py [--endpoint URL] [--sizes 1MiB,8MiB,32MiB]
                                            [--seconds N] [--reps N]

Without ``--endpoint`` a moto server is started in a child process (credentials
then default to dummies); with one, the standard AWS credential chain applies
and a temporary bucket is created and removed there.

Workloads: PUT and GET throughput (MiB/s) per object size with 8 requests in
flight, and 64 KiB GET operations per second with 16 in flight. Each workload
runs ``--reps`` times per backend, alternating obstore, aioboto3, obstore, ...
so drift in the server hits both alike; the report gives medians and the ratio
obstore/aioboto3. Results go to ``bench/results/store_backends.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from botocore.exceptions import ClientError

from bench.common import (
    RESULTS,
    MotoProcess,
    format_size,
    machine_info,
    median,
    parse_size,
)
from s3kv.config import Backend as BackendName
from s3kv.config import StoreSettings
from s3kv.store import ObjectStore, open_store

BACKENDS: tuple[BackendName, ...] = ("obstore", "aioboto3")
PACKAGES = ("obstore", "aioboto3", "aiobotocore", "boto3", "botocore", "aiohttp", "moto")
MIB = 1 << 20


@dataclass
class Workload:
    name: str  # "put" | "get" | "small_get"
    size: int
    concurrency: int
    unit: str  # "MiB/s" | "ops/s"
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        op = {"put": "PUT", "get": "GET", "small_get": "small GET"}[self.name]
        return f"{op} {format_size(self.size)} x{self.concurrency}"

    def medians(self) -> dict[str, float]:
        return {b: median(r["value"] for r in self.runs[b]) for b in self.runs}


def pattern(size: int, salt: int) -> bytes:
    block = bytes((i * 31 + salt) % 256 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


async def timed(op: Callable[[int], Awaitable[int]], concurrency: int, seconds: float
                ) -> dict[str, float]:
    """Run ``op(worker)`` in ``concurrency`` loops, each at least once and until
    ``seconds`` pass; ``op`` returns the bytes it moved. Elapsed time runs from the
    common start to the last completion, so no request is counted half."""
    done = [0] * concurrency
    moved = [0] * concurrency
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(i: int) -> None:
        while True:
            moved[i] += await op(i)
            done[i] += 1
            if time.perf_counter() >= deadline:
                return

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"ops": sum(done), "bytes": sum(moved), "seconds": elapsed}


def make_op(store: ObjectStore, w: Workload, keys: list[str], data: bytes
            ) -> Callable[[int], Awaitable[int]]:
    if w.name == "put":
        async def put(i: int) -> int:
            await store.put(keys[i], data)
            return len(data)
        return put

    async def get(i: int) -> int:
        body = await store.get(keys[i])
        if len(body) != w.size:
            raise RuntimeError(f"GET {keys[i]} returned {len(body)} bytes, expected {w.size}")
        return len(body)
    return get


async def seed(store: ObjectStore, keys: list[str], data: bytes) -> None:
    await asyncio.gather(*(store.put(k, data) for k in keys))


async def run(args: argparse.Namespace, endpoint: str, bucket: str) -> list[Workload]:
    workloads = [Workload(op, size, args.concurrency, "MiB/s")
                 for size in args.sizes for op in ("put", "get")]
    workloads.append(Workload("small_get", args.small_size, args.small_concurrency, "ops/s"))
    stores = {
        b: await open_store(StoreSettings(bucket=bucket, endpoint_url=endpoint, backend=b,
                                          max_concurrency=max(args.concurrency,
                                                              args.small_concurrency)))
        for b in BACKENDS
    }
    try:
        for wi, w in enumerate(workloads):
            data = pattern(w.size, wi)
            keys = {b: [f"bench/{w.name}/{w.size}/{b}/{i}" for i in range(w.concurrency)]
                    for b in BACKENDS}
            if w.name != "put":  # both backends read the same objects
                keys = {b: keys[BACKENDS[0]] for b in BACKENDS}
                await seed(stores[BACKENDS[0]], keys[BACKENDS[0]], data)
                for b in BACKENDS:  # check content once, outside the timing
                    if bytes(await stores[b].get(keys[b][0])) != data:
                        raise RuntimeError(f"{b} read back different bytes")
            ops = {b: make_op(stores[b], w, keys[b], data) for b in BACKENDS}
            for b in BACKENDS:  # one untimed round: connection pools warm for both
                await timed(ops[b], w.concurrency, 0.0)
                w.runs[b] = []
            for rep in range(args.reps):
                for b in BACKENDS:
                    r = await timed(ops[b], w.concurrency, args.seconds)
                    value = (r["bytes"] / MIB if w.unit == "MiB/s" else r["ops"]) / r["seconds"]
                    w.runs[b].append({**r, "value": value})
                    print(f"  {w.label:<22} rep {rep + 1}/{args.reps} {b:<9} "
                          f"{value:10.1f} {w.unit}  ({int(r['ops'])} ops)", flush=True)
            await stores[BACKENDS[0]].delete_many(sorted({k for v in keys.values() for k in v}))
    finally:
        for s in stores.values():
            await s.close()
    return workloads


def summary(workloads: list[Workload]) -> str:
    a, b = BACKENDS
    lines = [f"{'workload':<24}{a:>16}{b:>16}{a + '/' + b:>20}"]
    for w in workloads:
        m = w.medians()
        lines.append(f"{w.label:<24}{m[a]:>10.1f} {w.unit:<5}{m[b]:>10.1f} {w.unit:<5}"
                     f"{m[a] / m[b]:>20.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", help="S3 endpoint URL; default: a moto server started here")
    ap.add_argument("--sizes", default="1MiB,8MiB,32MiB",
                    help="object sizes for PUT/GET throughput (default 1MiB,8MiB,32MiB)")
    ap.add_argument("--seconds", type=float, default=1.5,
                    help="seconds per measurement (default 1.5)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per backend (>= 3)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--small-size", default="64KiB")
    ap.add_argument("--small-concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS / "store_backends.json")
    args = ap.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.small_size = parse_size(args.small_size)
    if args.reps < 3:
        ap.error("--reps must be at least 3 (medians of fewer runs mean little)")

    moto = None if args.endpoint else MotoProcess()
    endpoint: str = args.endpoint if moto is None else moto.url
    bucket = f"s3kv-bench-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    started = time.perf_counter()
    print(f"endpoint {endpoint} ({'moto, child process' if moto else 'external'}), "
          f"bucket {bucket}", flush=True)
    try:
        workloads = asyncio.run(run(args, endpoint, bucket))
    finally:
        try:
            client.delete_bucket(Bucket=bucket)
        except ClientError as exc:
            print(f"warning: could not delete bucket {bucket}: {exc}", file=sys.stderr)
        if moto:
            moto.close()
    wall = time.perf_counter() - started

    text = summary(workloads)
    print()
    print(text)
    print(f"\nmedians of {args.reps} runs of {args.seconds:g} s each, backends alternating; "
          f"{wall:.0f} s in all")

    a, b = BACKENDS
    doc: dict[str, Any] = {
        "benchmark": "store_backends",
        "machine": machine_info(PACKAGES),
        "endpoint": {"kind": "moto (child process)" if moto else "external",
                     "url": None if moto else endpoint},
        "settings": {"sizes": args.sizes, "seconds": args.seconds, "reps": args.reps,
                     "concurrency": args.concurrency, "small_size": args.small_size,
                     "small_concurrency": args.small_concurrency, "order": list(BACKENDS)},
        "wall_seconds": round(wall, 1),
        "results": [
            {
                "workload": w.name,
                "label": w.label,
                "size_bytes": w.size,
                "concurrency": w.concurrency,
                "unit": w.unit,
                "median": w.medians(),
                f"ratio_{a}_over_{b}": w.medians()[a] / w.medians()[b],
                "runs": w.runs,
            }
            for w in workloads
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
