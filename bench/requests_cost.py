"""S3 requests per committed chunk and per hit, bytes per token, dollars per token.

    .venv/bin/python bench/requests_cost.py [--quick] [--retention-days 1]
                                            [--reads-per-chunk 4]

Part 1, counted: TP ranks (spawned processes in a GLOO group, world sizes
1, 2 and 4) save one prompt of 8 chunks through ``Committer`` against a moto
S3 server, with every store call counted by a wrapper. Then the scheduler's
``find_committed_prefix`` looks up four prompts (exact hit, hit followed by
new chunks, partial hit, cold miss) and every rank reads its KV heads of each
hit with ``read_heads``. The counts are checked against the design: per
committed chunk one shard PUT per uploading rank (each KV head is stored
once) + 1 manifest PUT; per hit chunk 1 manifest GET + 1 shard GET per rank.

Part 2, computed from the real encoders: bytes stored per token (shard
headers and manifests included) for Llama-3.1-8B, Llama-3.1-70B and the tiny
test model, at TP 1/4/8 and chunk sizes 128..2048 tokens.

Part 3, priced: dollars per million cached tokens at AWS list prices
(us-east-1; see ``PRICES``), written once, kept ``--retention-days`` and read
back ``--reads-per-chunk`` times, plus how much of a shared prefix each chunk
size can reuse (a chunk is all-or-nothing).
Results go to ``bench/results/requests_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, MotoProcess, free_port, machine_info
from devtools.tiny_model import TinyModelSpec
from s3kv.config import DEFAULT_CHUNK_TOKENS
from s3kv.heads import head_range, uploading_ranks, uploads_heads
from s3kv.keys import KeyLayout, new_writer_id
from s3kv.manifest import ShardEntry, new_manifest
from s3kv.reader import plan_reads
from s3kv.shard import ITEMSIZE, PayloadLayout, ShardSpec, encode_header

PACKAGES = ("torch", "obstore", "moto")
NAMESPACE = "c057" * 8
PREFIX = "s3kv"
GiB = 1 << 30
KiB = 1 << 10
EXPRESS_FREE_BYTES = 512 * KiB  # Express per-GB charges apply above this, per request

# AWS list prices, us-east-1, USD. GB = 2^30 bytes; a month is taken as 30 days.
PRICES: dict[str, dict[str, float]] = {
    "s3_standard": {
        "put_per_1k": 0.005, "get_per_1k": 0.0004, "storage_gb_month": 0.023,
        "upload_per_gb_over_512k": 0.0, "retrieval_per_gb_over_512k": 0.0,
    },
    "s3_express_one_zone": {
        "put_per_1k": 0.00113, "get_per_1k": 0.00003, "storage_gb_month": 0.11,
        "upload_per_gb_over_512k": 0.0032, "retrieval_per_gb_over_512k": 0.0006,
    },
}
CHUNKS = (128, 256, 512, 1024, 2048)
TPS = (1, 4, 8)
PREFIX_LENGTHS = (300, 1000, 2000, 4000, 8000)


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int
    head_size: int
    dtype: str
    attention_heads: int  # vLLM needs attention_heads % TP == 0

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_size * ITEMSIZE[self.dtype]


def model_shapes() -> list[ModelShape]:
    tiny = TinyModelSpec()
    return [
        ModelShape("Llama-3.1-8B", 32, 8, 128, "bfloat16", 32),
        ModelShape("Llama-3.1-70B", 80, 8, 128, "bfloat16", 64),
        ModelShape("tiny test model", tiny.num_layers, tiny.num_kv_heads, tiny.head_size,
                   tiny.dtype, tiny.num_heads),
    ]


# --- part 1: counted run ------------------------------------------------------------

def key_kind(key: str) -> str:
    parsed = KeyLayout(PREFIX).parse(key)
    return parsed.kind if parsed is not None else "other"


class TallyingStore:
    """Counts every request a caller makes, by method, object kind and outcome."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.requests: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def _count(self, op: str, key: str, nbytes: int = 0) -> None:
        name = f"{op} {key_kind(key)}"
        self.requests[name] += 1
        self.bytes[name] += nbytes

    async def put(self, key: str, data: Any, *, mode: str = "overwrite") -> Any:
        try:
            result = await self._inner.put(key, data, mode=mode)
        except Exception as exc:
            self._count(f"PUT({type(exc).__name__})", key)
            raise
        self._count("PUT", key, memoryview(data).nbytes)
        return result

    async def get(self, key: str) -> Any:
        try:
            body = await self._inner.get(key)
        except Exception as exc:
            self._count(f"GET({type(exc).__name__})", key)
            raise
        self._count("GET", key, len(body))
        return body

    async def get_range(self, key: str, start: int, end: int) -> Any:
        body = await self._inner.get_range(key, start, end)
        self._count("GET-range", key, len(body))
        return body

    def __getattr__(self, name: str) -> Any:  # any other request is counted too
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.requests[name] += 1
            return await attr(*args, **kwargs)
        return counted

    def take(self) -> dict[str, dict[str, int]]:
        out = {"requests": dict(self.requests), "bytes": dict(self.bytes)}
        self.requests.clear()
        self.bytes.clear()
        return out


SAVED_CHUNKS = 8
CHUNK_TOKENS = 16  # request counts do not depend on the chunk size
HEADS = 8  # KV heads of the counted run's model: every rank at TP 1, 2, 4 uploads
# One head of one chunk: 2 layers x 16 tokens x 256 elements, bf16.
PAYLOAD = PayloadLayout("bfloat16", ("l0", "l1"), CHUNK_TOKENS, 256)


def lookup_prompts() -> dict[str, list[int]]:
    saved = list(range(SAVED_CHUNKS * CHUNK_TOKENS))
    new = [10_000 + i for i in range(4 * CHUNK_TOKENS)]
    return {
        "exact_hit": saved,  # 8 committed chunks, nothing else
        "hit_then_new": saved + new,  # 8 committed chunks + 4 new ones (window of 8)
        "partial_hit": saved[: 5 * CHUNK_TOKENS] + new[: 3 * CHUNK_TOKENS],  # 5 + 3 new
        "cold_miss": [20_000 + i for i in range(SAVED_CHUNKS * CHUNK_TOKENS)],
    }


def worker(rank: int, world: int, port: int, endpoint: str, bucket: str, out: Any) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import torch.distributed as dist

    from s3kv.aio import LoopThread
    from s3kv.commit import ChunkSave, Committer
    from s3kv.config import StoreSettings
    from s3kv.keys import ChunkRef, chain_chunk_ids
    from s3kv.lookup import find_committed_prefix
    from s3kv.reader import read_heads
    from s3kv.shard import allocate
    from s3kv.store import open_store
    from s3kv.vllm.gather import GlooGatherer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    gatherer = GlooGatherer(list(range(world)), 120)
    io = LoopThread()
    store = TallyingStore(io.run(open_store(StoreSettings(bucket=bucket, endpoint_url=endpoint))))
    layout = KeyLayout(PREFIX)
    # Every TP size shares one namespace in production; here each counted run
    # gets its own, so that every run saves into an empty one.
    ns = NAMESPACE[:-2] + f"{world:02x}"
    unique = uuid.uuid4().hex[:16] if rank == 0 else None
    writer = str(gatherer.broadcast(new_writer_id(world, unique) if unique else None))
    committer = Committer(io=io, store=store, layout=layout, namespace=ns, writer_id=writer,
                          gatherer=gatherer, max_inflight_bytes=64 << 20, num_heads=HEADS)
    ids = chain_chunk_ids(lookup_prompts()["exact_hit"], CHUNK_TOKENS)
    lo, hi = head_range(HEADS, rank, world)
    uploads = uploads_heads(HEADS, rank, world)
    for rnd in range(SAVED_CHUNKS // 2):  # rounds of 2 chunks, as one step's plan
        saves = []
        for i in (2 * rnd, 2 * rnd + 1):
            buf = None
            if uploads:  # else another rank stores these heads; this one joins empty-handed
                buf, payload = allocate(ShardSpec(ids[i], rank, lo, hi, PAYLOAD))
                payload[:] = os.urandom(len(payload))
            ref = ChunkRef(ids[i], ids[i - 1] if i else None, i, CHUNK_TOKENS)
            saves.append(ChunkSave(ref, buf))
        committer.submit(rnd, saves)
    flushed = committer.flush(120)
    counted: dict[str, Any] = {"save": store.take(), "flushed": flushed,
                               "committed": committer.counters.get("chunks_committed")}
    committer.close()
    dist.barrier()
    lookups: dict[str, Any] = {}
    hits = None
    if rank == 0:  # the scheduler: one lookup per prompt
        for name, tokens in lookup_prompts().items():
            found = io.run(find_committed_prefix(store, layout, ns,
                                                 chain_chunk_ids(tokens, CHUNK_TOKENS)))
            lookups[name] = {"hit_chunks": len(found), **store.take()}
            if name == "exact_hit":
                hits = found
    hits = gatherer.broadcast(hits)  # the scheduler ships manifests to every worker
    for m in hits:
        got = io.run(read_heads(store, m, lo, hi, PAYLOAD))
        if sum(h.payload.nbytes for h in got) != (hi - lo) * PAYLOAD.head_bytes:
            raise RuntimeError(f"rank {rank} read the wrong number of bytes")
    counted.update({"lookups": lookups, "load": store.take(), "loaded_chunks": len(hits)})
    out.put({"rank": rank, **counted})
    out.close()
    out.join_thread()
    dist.barrier()
    os._exit(0)


def run_group(world: int, endpoint: str, bucket: str) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, endpoint, bucket, out))
             for r in range(world)]
    for p in procs:
        p.start()
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + 300
    while len(results) < world:
        try:
            results.append(out.get(timeout=2))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"TP={world} group failed (exit codes {dead})") from None
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    return sorted(results, key=lambda r: r["rank"])


def total(per_rank: list[dict[str, Any]], phase: str) -> Counter[str]:
    c: Counter[str] = Counter()
    for r in per_rank:
        c.update(r[phase]["requests"])
    return c


def summarise_counts(world: int, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    save = total(per_rank, "save")
    load = total(per_rank, "load")
    committed = int(per_rank[0]["committed"])
    loaded = per_rank[0]["loaded_chunks"]
    lookups = per_rank[0]["lookups"]
    hit_lookup = lookups["exact_hit"]["requests"]
    per_chunk_put = {k: v / committed for k, v in save.items()}
    per_hit = {
        "GET manifest": hit_lookup.get("GET manifest", 0) / loaded,
        "GET shard": load.get("GET shard", 0) / loaded,
    }
    uploaders = len(uploading_ranks(HEADS, world))
    design_ok = (
        committed == SAVED_CHUNKS
        and save == Counter({"PUT shard": uploaders * SAVED_CHUNKS,
                             "PUT manifest": SAVED_CHUNKS})
        and load == Counter({"GET shard": world * loaded})
        and hit_lookup == {"GET manifest": loaded}
    )
    return {
        "tp": world,
        "chunks_committed": committed,
        "save_requests": dict(save),
        "requests_per_committed_chunk": per_chunk_put,
        "hit_chunks_loaded": loaded,
        "requests_per_hit_chunk": per_hit,
        "lookups": {k: {"hit_chunks": v["hit_chunks"], "requests": v["requests"]}
                    for k, v in lookups.items()},
        "design": {"per_committed_chunk": f"{uploaders} shard PUTs + 1 manifest PUT",
                   "per_hit_chunk": f"1 manifest GET + {world} shard GETs"},
        "matches_design": design_ok,
    }


# --- parts 2 and 3: bytes and dollars --------------------------------------------------

def chunk_objects(model: ModelShape, tp: int, chunk: int) -> dict[str, Any]:
    """Object sizes of one committed chunk, from the real shard header and manifest
    encoders (the checksums are placeholders of their real length: the sizes are
    what matter, and hashing gigabytes to learn them would add nothing).

    Each KV head is stored once, by the lowest rank holding it: with fewer KV
    heads than ranks, fewer shards than ranks. Every rank still reads its heads.
    """
    layers = tuple(f"model.layers.{i}.self_attn.attn" for i in range(model.layers))
    payload = PayloadLayout(model.dtype, layers, chunk, 2 * model.head_size)
    cid = "ab" * 32
    layout = KeyLayout(PREFIX)
    writer = new_writer_id(tp, "f" * 16)
    shards, entries = [], []
    for rank, (lo, hi) in uploading_ranks(model.kv_heads, tp).items():
        spec = ShardSpec(cid, rank, lo, hi, payload)
        off = len(encode_header(spec))
        size = off + spec.payload_bytes
        shards.append(size)
        entries.append(ShardEntry(rank, layout.shard(NAMESPACE, cid, writer, rank), size,
                                  "0" * 32, lo, hi, off, tuple("0" * 32 for _ in range(hi - lo))))
    manifest = new_manifest(namespace=NAMESPACE, chunk_id=cid, parent_id="cd" * 32,
                            chunk_index=1, num_tokens=chunk, writer=writer, shards=entries,
                            tp_size=tp)
    # What the ranks of a reader at the same TP size GET: each its own head range.
    reads = [r.entry.size if r.whole else (r.head_end - r.head_start) * payload.head_bytes
             for rank in range(tp)
             for r in plan_reads(manifest, *head_range(model.kv_heads, rank, tp))]
    return {"shard_bytes": shards, "read_bytes": reads,
            "manifest_bytes": len(manifest.encode()),
            "kv_bytes": model.kv_bytes_per_token * chunk}


def price_chunk(objs: dict[str, Any], tier: dict[str, float], chunk: int, retention_days: float,
                reads: float) -> dict[str, float]:
    """Dollars per million cached tokens, by component."""
    n = 1e6 / chunk
    sizes = [*objs["shard_bytes"], objs["manifest_bytes"]]
    read_sizes = [*objs["read_bytes"], objs["manifest_bytes"]]
    billable = sum(max(0, s - EXPRESS_FREE_BYTES) for s in sizes) / GiB
    billable_read = sum(max(0, s - EXPRESS_FREE_BYTES) for s in read_sizes) / GiB
    stored = sum(sizes) / GiB
    write = n * (len(sizes) * tier["put_per_1k"] / 1000
                 + billable * tier["upload_per_gb_over_512k"])
    storage = n * stored * tier["storage_gb_month"] * retention_days / 30
    read = n * (len(read_sizes) * tier["get_per_1k"] / 1000
                + billable_read * tier["retrieval_per_gb_over_512k"])
    return {"write": write, "storage": storage, "read_once": read,
            "total": write + storage + reads * read,
            "per_million_served": (write + storage) / reads + read if reads else float("inf")}


def cost_table(retention_days: float, reads: float) -> list[dict[str, Any]]:
    rows = []
    for model in model_shapes():
        for tp in TPS:
            valid = model.attention_heads % tp == 0
            for chunk in CHUNKS:
                objs = chunk_objects(model, tp, chunk)
                stored = sum(objs["shard_bytes"]) + objs["manifest_bytes"]
                row: dict[str, Any] = {
                    "model": model.name, "tp": tp, "chunk_tokens": chunk,
                    "valid_tp_for_vllm": valid,
                    "kv_bytes_per_token": model.kv_bytes_per_token,
                    "stored_bytes_per_token": stored / chunk,
                    "overhead_vs_kv": stored / objs["kv_bytes"] - 1,
                    "shard_object_bytes": max(objs["shard_bytes"]),
                    "manifest_bytes": objs["manifest_bytes"],
                    "shards_per_chunk": len(objs["shard_bytes"]),
                    "requests_per_chunk_write": len(objs["shard_bytes"]) + 1,
                    "requests_per_chunk_read": len(objs["read_bytes"]) + 1,
                    "usd_per_million_tokens": {
                        tier: price_chunk(objs, p, chunk, retention_days, reads)
                        for tier, p in PRICES.items()
                    },
                }
                rows.append(row)
    return rows


def reuse_table() -> list[dict[str, Any]]:
    """Share of a shared prefix of L tokens that whole chunks carry: floor(L / c) * c / L
    (the prompt goes on past the prefix; chunks are all-or-nothing)."""
    rows = []
    for chunk in CHUNKS:
        row: dict[str, Any] = {"chunk_tokens": chunk, "mean_tokens_lost": (chunk - 1) / 2,
                               "max_tokens_lost": chunk - 1}
        for length in PREFIX_LENGTHS:
            row[f"L={length}"] = (length // chunk) * chunk / length
        rows.append(row)
    return rows


def mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n / KiB:.1f} KiB"


def print_report(counts: list[dict[str, Any]], rows: list[dict[str, Any]],
                 reuse: list[dict[str, Any]], retention_days: float, reads: float) -> None:
    print("\n1. requests, counted against the moto server (Committer + lookup + read_heads)")
    print(f"{'TP':>3} {'per committed chunk':<34} {'per hit chunk':<32} {'as designed':>11}")
    for c in counts:
        pc = ", ".join(f"{v:g} {k}" for k, v in sorted(c["requests_per_committed_chunk"].items()))
        ph = ", ".join(f"{v:g} {k}" for k, v in c["requests_per_hit_chunk"].items())
        print(f"{c['tp']:>3} {pc:<34} {ph:<32} {'yes' if c['matches_design'] else 'NO':>11}")
    print("   lookups (window 8; requests per prompt):")
    for name, lk in counts[0]["lookups"].items():
        reqs = ", ".join(f"{v} {k}" for k, v in sorted(lk["requests"].items()))
        print(f"     {name:<13} {lk['hit_chunks']} hit chunks: {reqs}")

    print(f"\n2. bytes stored per token (chunk {DEFAULT_CHUNK_TOKENS}; headers and manifest "
          f"included)")
    print(f"{'model':<16}{'TP':>3}{'KV B/token':>12}{'stored B/token':>16}{'overhead':>10}"
          f"{'shard object':>14}{'manifest':>10}")
    for r in rows:
        if r["chunk_tokens"] != DEFAULT_CHUNK_TOKENS:
            continue
        note = "" if r["valid_tp_for_vllm"] else "  (TP not valid in vLLM)"
        print(f"{r['model']:<16}{r['tp']:>3}{r['kv_bytes_per_token']:>12,}"
              f"{r['stored_bytes_per_token']:>16,.0f}{r['overhead_vs_kv']:>10.2%}"
              f"{mib(r['shard_object_bytes']):>14}"
              f"{r['manifest_bytes']:>9} B{note}")

    print(f"\n3. USD per million cached tokens: written once, kept {retention_days:g} day(s), "
          f"read {reads:g} times")
    for tier in PRICES:
        print(f"   {tier}")
        print(f"   {'model':<16}{'TP':>3}" + "".join(f"{c:>10}" for c in CHUNKS))
        for model in model_shapes():
            for tp in TPS:
                sel = [r for r in rows if r["model"] == model.name and r["tp"] == tp]
                if not sel[0]["valid_tp_for_vllm"]:
                    continue
                print(f"   {model.name:<16}{tp:>3}" + "".join(
                    f"{r['usd_per_million_tokens'][tier]['total']:>10.4f}" for r in sel))
    print("\n   components, Llama-3.1-8B (USD per million tokens: write / storage / one read)")
    for tier in PRICES:
        for tp in TPS:
            sel = [r for r in rows if r["model"] == "Llama-3.1-8B" and r["tp"] == tp]
            cells = "  ".join(
                f"{r['chunk_tokens']}: {u['write']:.3f}/{u['storage']:.3f}/{u['read_once']:.3f}"
                for r in sel for u in [r["usd_per_million_tokens"][tier]])
            print(f"   {tier:<20} TP={tp}  {cells}")

    print("\n4. reuse granularity: share of a shared prefix of L tokens carried by whole chunks")
    print(f"{'chunk':>6}{'mean lost':>11}" + "".join(f"{'L=' + str(n):>9}"
                                                     for n in PREFIX_LENGTHS))
    for r in reuse:
        print(f"{r['chunk_tokens']:>6}{r['mean_tokens_lost']:>11.1f}" + "".join(
            f"{r[f'L={n}']:>9.1%}" for n in PREFIX_LENGTHS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="count requests at TP 1 and 2 only")
    ap.add_argument("--tp", default="1,2,4", help="TP sizes for the counted run")
    ap.add_argument("--retention-days", type=float, default=1.0)
    ap.add_argument("--reads-per-chunk", type=float, default=4.0,
                    help="how often each stored chunk is read back while retained")
    ap.add_argument("--out", type=Path, default=RESULTS / "requests_cost.json")
    args = ap.parse_args(argv)
    tps = [1, 2] if args.quick else [int(t) for t in args.tp.split(",")]

    import boto3

    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    counts = []
    with MotoProcess() as moto:
        bucket = f"s3kv-bench-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=bucket)
        for world in tps:
            counts.append(summarise_counts(world, run_group(world, moto.url, bucket)))
            print(f"  counted TP={world}", flush=True)
    rows = cost_table(args.retention_days, args.reads_per_chunk)
    reuse = reuse_table()
    print_report(counts, rows, reuse, args.retention_days, args.reads_per_chunk)
    wall = time.perf_counter() - started
    print(f"\n{wall:.0f} s in all")
    ok = all(c["matches_design"] for c in counts)
    doc = {
        "benchmark": "requests_cost",
        "machine": machine_info(PACKAGES),
        "endpoint": {"kind": "moto (child process)"},
        "prices": {"region": "us-east-1", "currency": "USD", "gb": "2^30 bytes",
                   "month_days": 30,
                   "express_per_gb_charges": "apply to bytes beyond 512 KiB per request",
                   **PRICES},
        "assumptions": {"retention_days": args.retention_days,
                        "reads_per_chunk": args.reads_per_chunk,
                        "payload": "[heads, layers, tokens, 2 x head_size] per shard "
                                   "(K and V), token-major: independent of the block size",
                        "heads": "each KV head stored once, by the lowest rank holding it",
                        "layer_names": "model.layers.<i>.self_attn.attn",
                        "total": "write + storage + reads_per_chunk x read_once",
                        "per_million_served": "(write + storage) / reads_per_chunk + read_once"},
        "models": [asdict(m) | {"kv_bytes_per_token": m.kv_bytes_per_token}
                   for m in model_shapes()],
        "wall_seconds": round(wall, 1),
        "loadavg_before": load_before,
        "counted": counts,
        "all_counts_match_design": ok,
        "cost": rows,
        "reuse_granularity": reuse,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
