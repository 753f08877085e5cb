"""``ls`` and ``du`` over 10,000 committed chunks: paging, wall time, peak memory.

The S3 server runs in its own process so that tracemalloc sees only the
CLI's allocations. Chunks are real: shards built by :mod:`s3kv.shard`,
manifests by :mod:`s3kv.manifest`. The server process writes them straight
into its own store: 20,000 PUTs over HTTP cost moto minutes, and the upload
path is what the commit and store tests are for; this one is about reading.

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
from tests.helpers_bucket import fingerprint, shard_bytes

CHAINS = 1000
CHAIN_LEN = 10  # 10,000 chunks, 20,000 objects
ROOT = Path(__file__).resolve().parents[2]

_SERVER = """
import logging, sys, time
logging.disable(logging.CRITICAL)
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer
from tests.cli.test_scale import chunk_objects
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
srv.start()
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
backend.create_bucket(sys.argv[2], "us-east-1")
backend.create_bucket("scale-empty", "us-east-1")
t0 = time.perf_counter()
for key, body in chunk_objects():
    backend.put_object(sys.argv[2], key, body)
print("ready", round(time.perf_counter() - t0, 2), flush=True)
while True:
    time.sleep(3600)
"""


@contextlib.contextmanager
def moto_process(bucket: str) -> Iterator[tuple[str, float]]:
    """A moto server in a process of its own, ``bucket`` filled by
    :func:`chunk_objects` and ``scale-empty`` empty; yields its URL and the
    seconds filling took."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), bucket],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    try:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        assert line.startswith("ready "), f"moto server did not start: {line!r}"
        yield f"http://127.0.0.1:{port}", float(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(10)


def chunk_objects() -> Iterator[tuple[str, bytes]]:
    """Every object of ``CHAINS`` committed prefixes of ``CHAIN_LEN`` chunks:
    each chunk's shard, then its manifest, as a TP=1 writer commits them."""
    layout = KeyLayout("s3kv")
    ns = fingerprint().namespace
    writer = new_writer_id(1, "scale")
    for c in range(CHAINS):
        tokens = [c * 1000 + i for i in range(4 * CHAIN_LEN)]
        parent = None
        for i, cid in enumerate(chain_chunk_ids(tokens, 4)):
            buf, _, _ = shard_bytes(cid, 0)
            key = layout.shard(ns, cid, writer, 0, c)  # one save round per chain
            entry = seal(buf, key)
            m = new_manifest(namespace=ns, chunk_id=cid, parent_id=parent, chunk_index=i,
                             num_tokens=4, writer=writer, shards=[entry], tp_size=1)
            yield key, bytes(buf)
            yield layout.manifest(ns, cid), m.encode()
            parent = cid
    yield layout.namespace_doc(ns), json.dumps(fingerprint().to_json()).encode()


def measure(args: list[str], env: dict[str, str], *,
            trace: bool = True) -> tuple[dict[str, Any], str]:
    """One run of the command: its wall time and, traced, its peak memory
    (tracing slows Python down, so a traced run's wall time is not the
    command's: it is reported only for comparison between rows)."""
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, args, env=env)
    wall = time.perf_counter() - t0
    fig: dict[str, Any] = {"command": " ".join(["s3kv", *args]), "wall_s": round(wall, 2)}
    if trace:
        fig["peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
        tracemalloc.stop()
    assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-2000:])
    return fig, res.stdout


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
    bucket = "scale-10k"
    with moto_process(bucket) as (url, fill_s):
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
        figures.append({"command": f"fill {CHAINS * CHAIN_LEN} chunks (server side)",
                        "wall_s": fill_s})
        env = {"S3KV_BUCKET": bucket, "S3KV_ENDPOINT_URL": url}
        # Fixed cost of any command: interpreter state, botocore's S3 model
        # (after one untraced run, so one-time imports are not counted).
        measure(["du", "--bucket", "scale-empty"], env, trace=False)
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

        # The chain view reads every manifest; its memory is traced below, on
        # the scan alone (Catalog.records + build_prefixes).
        fig, out = measure(["ls", ns[:8], "--format", "json", "--sort", "tokens",
                            "--limit", "5"], env, trace=False)
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
