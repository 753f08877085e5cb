"""``ls`` and ``du`` over 10,000 committed chunks: paging, wall time, peak memory.

The S3 server runs in its own process so that tracemalloc sees only the
CLI's allocations. Chunks are real: shards built by :mod:`s3kv.shard`,
manifests by :mod:`s3kv.manifest`, uploaded with s3kv's own store (shards
first, then the manifest with If-None-Match), many requests in flight.

Figures are printed (run with ``-s``) and written to
``.tmp/cli-scale-figures.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from typer.testing import CliRunner

from s3kv.catalog import Catalog
from s3kv.cli.app import app
from s3kv.config import parse_settings
from s3kv.inventory import ChunkRecord, build_prefixes
from s3kv.keys import KeyLayout, chain_chunk_ids, new_writer_id
from s3kv.manifest import new_manifest
from s3kv.shard import seal
from s3kv.store import open_store
from tests.cli.helpers import fingerprint, shard_bytes

CHAINS = 1000
CHAIN_LEN = 10  # 10,000 chunks, 20,000 objects
ROOT = Path(__file__).resolve().parents[2]

_SERVER = """
import logging, sys, time
logging.disable(logging.CRITICAL)
from moto.server import ThreadedMotoServer
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
srv.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


@contextlib.contextmanager
def moto_process() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def populate(url: str, bucket: str, ns: str) -> None:
    layout = KeyLayout("s3kv")
    store = await open_store(parse_settings(
        {"bucket": bucket, "endpoint_url": url, "max_concurrency": 64}).store)
    sem = asyncio.Semaphore(48)
    writer = new_writer_id(1, "scale")

    async def chunk(cid: str, parent: str | None, index: int) -> None:
        buf, _, _ = shard_bytes(cid, 0)
        key = layout.shard(ns, cid, writer, 0)
        entry = seal(buf, key)
        m = new_manifest(namespace=ns, chunk_id=cid, parent_id=parent, chunk_index=index,
                         num_tokens=4, writer=writer, shards=[entry], tp_size=1)
        async with sem:
            await store.put(key, buf)
            await store.put(layout.manifest(ns, cid), m.encode(), mode="create")

    async def chain(c: int) -> None:
        tokens = [c * 1000 + i for i in range(4 * CHAIN_LEN)]
        parent = None
        jobs = []
        for i, cid in enumerate(chain_chunk_ids(tokens, 4)):
            jobs.append(chunk(cid, parent, i))
            parent = cid
        await asyncio.gather(*jobs)

    try:
        await asyncio.gather(*(chain(c) for c in range(CHAINS)))
        await store.put(layout.namespace_doc(ns), json.dumps(fingerprint().to_json()).encode())
    finally:
        await store.close()


def measure(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Wall time of a plain run, then peak traced memory of a second run (tracing
    slows Python down, so the two are not measured together)."""
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, args, env=env)
    wall = time.perf_counter() - t0
    assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-2000:])
    tracemalloc.start()
    traced = CliRunner().invoke(app, args, env=env)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert traced.exit_code == 0
    return {"command": " ".join(["s3kv", *args]), "wall_s": round(wall, 2),
            "peak_mib": round(peak / 2**20, 2)}, res.stdout


async def traced(url: str, bucket: str,
                 fn: Callable[[Any], Awaitable[int]]) -> tuple[int, float, int]:
    store = await open_store(parse_settings({"bucket": bucket, "endpoint_url": url}).store)
    try:
        tracemalloc.start()
        t0 = time.perf_counter()
        got = await fn(store)
        wall = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return got, wall, peak
    finally:
        await store.close()


@pytest.mark.slow
def test_ls_du_over_10k_chunks() -> None:
    ns = fingerprint().namespace
    figures: list[dict[str, Any]] = []
    with moto_process() as url:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
        bucket = "scale-10k"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(
            Bucket=bucket)
        t0 = time.perf_counter()
        asyncio.run(populate(url, bucket, ns))
        figures.append({"command": f"populate {CHAINS * CHAIN_LEN} chunks",
                        "wall_s": round(time.perf_counter() - t0, 2)})
        env = {"S3KV_BUCKET": bucket, "S3KV_ENDPOINT_URL": url}
        c = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        c.create_bucket(Bucket="scale-empty")
        # Fixed cost of any command: interpreter state, botocore's S3 model.
        fig, _ = measure(["du", "--bucket", "scale-empty"], env)
        figures.append({**fig, "command": "s3kv du (empty bucket)"})

        fig, out = measure(["ls", "--format", "json"], env)
        figures.append(fig)
        (row,) = json.loads(out)["namespaces"]
        assert row["chunks"] == CHAINS * CHAIN_LEN
        assert row["writer_tp_sizes"] == [1]

        fig, out = measure(["du", "--format", "json"], env)
        figures.append(fig)
        total = json.loads(out)["total"]
        assert total["chunks"] == CHAINS * CHAIN_LEN
        assert total["objects"] == 2 * CHAINS * CHAIN_LEN
        assert total["orphan_objects"] == 0

        fig, out = measure(["ls", ns[:8], "--format", "json", "--sort", "tokens",
                            "--limit", "5"], env)
        figures.append(fig)
        doc = json.loads(out)
        assert doc["chunks"] == CHAINS * CHAIN_LEN
        assert doc["writer_tp_sizes"] == [1]
        assert doc["prefix_count"] == CHAINS
        assert all(p["complete"] and p["tokens"] == 4 * CHAIN_LEN for p in doc["prefixes"])

        # The scans alone, traced after the client is set up: listing with the
        # default pages and with 25-key pages (the spreads hold ~80 keys each
        # at this size, so default pages never continue), the chain view's
        # records, and, for comparison, a whole listing held in memory.
        async def usage(store: Any, page_size: int) -> int:
            cat = Catalog(store, KeyLayout("s3kv"), page_size=page_size)
            return (await cat.usage(ns)).chunks

        async def chains(store: Any) -> int:
            cat = Catalog(store, KeyLayout("s3kv"))
            recs = [r async for r in cat.records(ns) if isinstance(r, ChunkRecord)]
            return len(build_prefixes(recs))

        async def materialise(store: Any) -> int:
            return len([o async for page in store.list("s3kv/") for o in page])

        for label, fn, want in [
            ("scan only: Catalog.usage, 1000-key pages", lambda s: usage(s, 1000),
             CHAINS * CHAIN_LEN),
            ("scan only: Catalog.usage, 25-key pages", lambda s: usage(s, 25),
             CHAINS * CHAIN_LEN),
            ("scan only: Catalog.records + build_prefixes", chains, CHAINS),
            ("baseline: whole listing held in memory", materialise,
             2 * CHAINS * CHAIN_LEN + 1),
        ]:
            got, wall, peak = asyncio.run(traced(url, bucket, fn))
            assert got == want, label
            figures.append({"command": label, "wall_s": round(wall, 2),
                            "peak_mib": round(peak / 2**20, 2)})

    out_file = ROOT / ".tmp" / "cli-scale-figures.json"
    out_file.parent.mkdir(exist_ok=True)
    out_file.write_text(json.dumps(figures, indent=2))
    for f in figures:
        print(f)
    by = {f["command"]: f["peak_mib"] for f in figures if "peak_mib" in f}
    whole = by["baseline: whole listing held in memory"]
    # Streaming: the listing scans hold a small fraction of what the whole
    # listing costs; the chain view holds compact records, not objects.
    assert by["scan only: Catalog.usage, 1000-key pages"] < whole / 4
    assert by["scan only: Catalog.usage, 25-key pages"] < whole / 4
    assert by["scan only: Catalog.records + build_prefixes"] < whole
    fixed = by["s3kv du (empty bucket)"]
    assert by["s3kv ls --format json"] < fixed + 4
    assert by["s3kv du --format json"] < fixed + 4
