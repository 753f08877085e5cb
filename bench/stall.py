"""Does saving KV to S3 stall the forward path when one TP rank is slow?

    .venv/bin/python bench/stall.py [--quick] [--tp 2,4] [--delays 0,100,300]
                                    [--steps 40] [--compute matmul|sleep]

TP ranks are spawned processes joined in a GLOO process group (tcp rendezvous
on 127.0.0.1). Each runs simulated forward steps: a fixed compute (default a
single-threaded torch matmul loop calibrated to ~20 ms on this machine; with
``--compute sleep`` a 20 ms wait, as a GPU forward looks to the host) ending
in an all-reduce over the ranks, as a TP forward does (``--no-collective``
drops it, letting ranks drift apart), then saves one shard of that step's
chunk. The last rank's shard uploads are delayed by D ms (an asyncio sleep
inside ``put``: a slow S3 connection); the other ranks are the fast ranks
whose stall we measure.

Stall = time spent in the save call on the forward path (step wall time
minus compute), for three ways to commit a chunk across ranks. Because of
the all-reduce, a rank that stalls also holds its peers up in the next
step's compute; the step time and the run time show that cost on all ranks.

* ``s3kv``: ``Committer.submit`` (uploads on the I/O loop, background GLOO
  gather on a committer thread, rank 0 writes the manifest);
* ``barrier``: upload the own shard synchronously, then ``dist.barrier`` on a
  GLOO cpu group; rank 0 then starts the manifest write (not awaited);
* ``tcpstore``: upload synchronously; ranks > 0 set a "done" key in a
  ``torch.distributed.TCPStore``; rank 0 waits in its step for every key,
  then starts the manifest write (not awaited).

Commit latency = manifest PUT answered - last shard PUT answered (over all
ranks; wall clocks of processes on one machine). For s3kv it comes from the
Committer's events ("uploaded" on every rank, "committed" on rank 0).

All strategies, delays and TP sizes run against one moto S3 server started
in a child process, in one run, so every ratio compares like with like.
Results go to ``bench/results/stall.json``.
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
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, MotoProcess, free_port, machine_info, median, percentile

STRATEGIES = ("s3kv", "barrier", "tcpstore")
PACKAGES = ("torch", "obstore", "moto")
NAMESPACE = "5a11" * 8
PREFIX = "bench-stall"
CHUNK_TOKENS = 16  # token ids only name the chunks; the shard size is set separately
LAYERS = 8
BLOCK_TOKENS = 16  # shard payloads are whole 16-token blocks
TOKEN_ELEMS = 256  # bf16: 512 B per token per head per layer (8 KiB per 16-token block)
BLOCK_BYTES = LAYERS * BLOCK_TOKENS * TOKEN_ELEMS * 2  # 64 KiB per block, one head


class DelayedStore:
    """Delegates to a real store; every shard PUT first waits ``delay_s``
    (simulated slow S3 on this rank; the manifest PUT is not delayed)."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self._inner = inner
        self._delay = delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put(self, key: str, data: Any, *, mode: str = "overwrite") -> Any:
        if self._delay and not key.endswith("manifest.json"):
            import asyncio

            await asyncio.sleep(self._delay)  # simulated latency, not synchronisation
        return await self._inner.put(key, data, mode=mode)


def calibrate_matmul(target_s: float, n: int = 256) -> int:
    """Matmul iterations of n x n float32 (one thread) that take ``target_s`` here."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(5):
        a @ b
    per = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        per.append((time.perf_counter() - t) / 10)
    return max(1, round(target_s / median(per)))


def make_compute(opts: dict[str, Any]) -> Any:
    if opts["compute"] == "sleep":
        secs = opts["compute_ms"] / 1000

        def wait() -> None:
            time.sleep(secs)  # stands for a GPU forward: the host thread just waits
        return wait
    import torch

    n, iters = 256, opts["matmul_iters"]
    a, b = torch.randn(n, n), torch.randn(n, n)

    def compute() -> None:
        for _ in range(iters):
            a @ b
    return compute


def worker(rank: int, world: int, port: int, kv_port: int, endpoint: str, bucket: str,
           opts: dict[str, Any], out: Any) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import torch
    import torch.distributed as dist

    from s3kv.aio import LoopThread
    from s3kv.config import StoreSettings
    from s3kv.store import open_store
    from s3kv.vllm.gather import GlooGatherer

    torch.set_num_threads(1)
    timeout = timedelta(seconds=opts["timeout_s"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timeout)
    gatherer = GlooGatherer(list(range(world)), opts["timeout_s"])  # the commit group
    cpu_group = dist.new_group(list(range(world)), backend="gloo", timeout=timeout)
    kv = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", kv_port, world, rank == 0, timeout=timeout)
    io = LoopThread()
    inner = io.run(open_store(StoreSettings(bucket=bucket, endpoint_url=endpoint)))
    compute = make_compute(opts)
    if opts["collective"]:
        forward, tensor = compute, torch.zeros(4096)

        def compute() -> None:
            forward()
            dist.all_reduce(tensor)  # the TP all-reduce: keeps ranks in lockstep
    ctx = Ctx(rank, world, opts, gatherer, cpu_group, kv, io, compute)

    # Untimed warm-up: connection pool, GLOO pairs, TCPStore, torch kernels.
    compute()
    for i in range(4):
        io.run(inner.put(f"{PREFIX}/warmup/{world}/r{rank}/{i}", b"x" * 1024))
    dist.barrier(group=cpu_group)
    kv.set(f"warm/{rank}", "1")
    kv.wait([f"warm/{r}" for r in range(world)])

    runs = []
    for delay_ms in opts["delays"]:
        for strategy in STRATEGIES:
            store = DelayedStore(inner, delay_ms / 1000 if rank == world - 1 else 0.0)
            dist.barrier()  # every rank starts the run together (outside the timing)
            res = RUNNERS[strategy](ctx, store, f"tp{world}-d{delay_ms}-{strategy}")
            runs.append({"strategy": strategy, "delay_ms": delay_ms, **res})
    out.put({"rank": rank, "runs": runs})
    out.close()
    out.join_thread()
    dist.barrier()
    os._exit(0)  # skip process-group teardown


class Ctx:
    def __init__(self, rank: int, world: int, opts: dict[str, Any], gatherer: Any,
                 cpu_group: Any, kv: Any, io: Any, compute: Any) -> None:
        from s3kv.keys import KeyLayout
        from s3kv.shard import PayloadLayout

        self.rank, self.world, self.opts = rank, world, opts
        self.gatherer, self.cpu_group, self.kv, self.io = gatherer, cpu_group, kv, io
        self.compute = compute
        self.layout = KeyLayout(PREFIX)
        self.blocks = max(1, opts["shard_kib"] * 1024 // BLOCK_BYTES)
        self.payload_layout = PayloadLayout(
            "bfloat16", tuple(f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)),
            self.blocks * BLOCK_TOKENS, TOKEN_ELEMS)
        self.payload_src = os.urandom(self.blocks * BLOCK_BYTES)

    def chunk_ids(self, tag: str) -> list[str]:
        from s3kv.keys import chain_chunk_ids

        steps = self.opts["steps"]
        return chain_chunk_ids(list(range(steps * CHUNK_TOKENS)), CHUNK_TOKENS, {"run": tag})

    def shard(self, cid: str, parent: str | None, index: int) -> Any:
        """Allocate and fill this rank's shard of ``cid`` (the device-to-host copy)."""
        from s3kv.commit import ChunkSave
        from s3kv.keys import ChunkRef
        from s3kv.shard import ShardSpec, allocate

        # One KV head per rank (heads = TP), as many tokens as fill --shard-kib.
        spec = ShardSpec(cid, self.rank, self.rank, self.rank + 1, self.payload_layout)
        buf, payload = allocate(spec)
        payload[:] = self.payload_src
        return ChunkSave(ChunkRef(cid, parent, index, CHUNK_TOKENS), buf)

    def writer(self) -> str:
        from s3kv.keys import new_writer_id

        unique = uuid.uuid4().hex[:16] if self.rank == 0 else None
        return str(self.gatherer.broadcast(
            new_writer_id(self.world, unique) if unique is not None else None))


def _step_loop(ctx: Ctx, tag: str, save: Any) -> dict[str, Any]:
    """Run the steps; ``save(step, cid, chunk)`` is the timed forward-path call."""
    ids = ctx.chunk_ids(tag)
    stalls, computes, steps = [], [], []
    start = time.perf_counter()
    for step, cid in enumerate(ids):
        chunk = ctx.shard(cid, ids[step - 1] if step else None, step)
        t0 = time.perf_counter()
        ctx.compute()
        t1 = time.perf_counter()
        save(step, cid, chunk)
        t2 = time.perf_counter()
        computes.append(t1 - t0)
        stalls.append(t2 - t1)
        steps.append(t2 - t0)
    return {"ids": ids, "stalls": stalls, "computes": computes, "steps": steps,
            "loop_s": time.perf_counter() - start, "start": start}


def run_s3kv(ctx: Ctx, store: Any, tag: str) -> dict[str, Any]:
    from s3kv.commit import Committer

    events: list[tuple[str, float, Any]] = []

    def on_event(name: str, info: dict[str, Any]) -> None:
        if name in ("uploaded", "committed"):
            events.append((name, time.time(), info["chunk_id"]))
        elif name == "gathered":  # one chunk per round: round id = step
            events.append((name, time.time(), info["round_id"]))

    committer = Committer(
        io=ctx.io, store=store, layout=ctx.layout, namespace=NAMESPACE,
        writer_id=ctx.writer(), gatherer=ctx.gatherer, max_inflight_bytes=1 << 30,
        num_heads=ctx.world, on_event=on_event,
    )
    res = _step_loop(ctx, tag, lambda step, cid, chunk: committer.submit(step, [chunk]))
    flushed = committer.flush(ctx.opts["timeout_s"])
    drain = time.perf_counter() - res["start"]
    committer.close()
    uploaded = {cid: t for name, t, cid in events if name == "uploaded"}
    committed = {cid: t for name, t, cid in events if name == "committed"}
    out = _result(res, drain, flushed, uploaded, committed, committer.counters.snapshot())
    out["gathered"] = {res["ids"][rnd]: t for name, t, rnd in events if name == "gathered"}
    return out


def _baseline(ctx: Ctx, store: Any, tag: str, sync: Any) -> dict[str, Any]:
    """Synchronous own upload, then ``sync(step)``; rank 0 then starts the manifest PUT."""
    writer = ctx.writer()
    uploaded: dict[str, float] = {}
    committed: dict[str, float] = {}
    futs = []

    async def put_manifest(cid: str, doc: bytes) -> None:
        await store.put(ctx.layout.manifest(NAMESPACE, cid), doc, mode="create")
        committed[cid] = time.time()

    def save(step: int, cid: str, chunk: Any) -> None:
        key = ctx.layout.shard(NAMESPACE, cid, writer, ctx.rank)
        ctx.io.run(store.put(key, chunk.data))
        uploaded[cid] = time.time()
        sync(step)
        if ctx.rank == 0:
            doc = json.dumps({"chunk_id": cid, "writer": writer, "ranks": ctx.world}).encode()
            futs.append(ctx.io.submit(put_manifest(cid, doc)))

    res = _step_loop(ctx, tag, save)
    ok = True
    for f in futs:
        try:
            f.result(ctx.opts["timeout_s"])
        except Exception:
            ok = False
    drain = time.perf_counter() - res["start"]
    return _result(res, drain, ok, uploaded, committed, {})


def run_barrier(ctx: Ctx, store: Any, tag: str) -> dict[str, Any]:
    import torch.distributed as dist

    return _baseline(ctx, store, tag, lambda step: dist.barrier(group=ctx.cpu_group))


def run_tcpstore(ctx: Ctx, store: Any, tag: str) -> dict[str, Any]:
    def sync(step: int) -> None:
        if ctx.rank == 0:
            ctx.kv.wait([f"{tag}/{step}/r{r}" for r in range(1, ctx.world)])
        else:
            ctx.kv.set(f"{tag}/{step}/r{ctx.rank}", "1")

    return _baseline(ctx, store, tag, sync)


RUNNERS = {"s3kv": run_s3kv, "barrier": run_barrier, "tcpstore": run_tcpstore}


def _result(res: dict[str, Any], drain: float, ok: bool, uploaded: dict[str, float],
            committed: dict[str, float], counters: dict[str, float]) -> dict[str, Any]:
    return {
        "stalls": res["stalls"], "computes": res["computes"], "steps": res["steps"],
        "loop_s": res["loop_s"],
        "drain_s": drain, "flushed": ok, "uploaded": uploaded, "committed": committed,
        "counters": counters,
    }


# --- parent: orchestration and report -----------------------------------------

def run_group(world: int, endpoint: str, bucket: str, opts: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port, kv_port = free_port(), free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, kv_port, endpoint, bucket, opts,
                                              out))
             for r in range(world)]
    for p in procs:
        p.start()
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + opts["group_timeout_s"]
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


def summarise(world: int, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    slow = world - 1
    rows = []
    for i, first in enumerate(per_rank[0]["runs"]):
        runs = [pr["runs"][i] for pr in per_rank]
        ms = [[s * 1000 for s in r["stalls"]] for r in runs]
        fast = [x for r in range(world) if r != slow for x in ms[r]]
        lat, gather_lat = [], []
        committed = runs[0]["committed"]
        gathered = runs[0].get("gathered", {})
        for cid, t_commit in committed.items():
            ups = [r["uploaded"].get(cid) for r in runs]
            if all(u is not None for u in ups):
                last = max(u for u in ups if u is not None)
                lat.append((t_commit - last) * 1000)
                if cid in gathered:
                    gather_lat.append((gathered[cid] - last) * 1000)
        rows.append({
            "tp": world,
            "strategy": first["strategy"],
            "delay_ms": first["delay_ms"],
            "slow_rank": slow,
            "steps": len(ms[0]),
            "fast_stall_ms": {"median": median(fast), "p95": percentile(fast, 95),
                              "max": max(fast)},
            "fast_worst_rank_median_ms": max(median(ms[r]) for r in range(world) if r != slow),
            "rank0_stall_ms": {"median": median(ms[0]), "p95": percentile(ms[0], 95)},
            "slow_rank_stall_ms": {"median": median(ms[slow]), "p95": percentile(ms[slow], 95)},
            "compute_ms_median": median(c * 1000 for r in runs for c in r["computes"]),
            "step_ms_median": median(c * 1000 for r in runs for c in r["steps"]),
            "run_s": max(r["loop_s"] for r in runs),
            "run_until_committed_s": max(r["drain_s"] for r in runs),
            "chunks_committed": len(committed),
            "all_flushed": all(r["flushed"] for r in runs),
            "commit_latency_ms": ({"median": median(lat), "p95": percentile(lat, 95),
                                   "max": max(lat)} if lat else None),
            "per_rank_stall_ms": [[round(x, 3) for x in m] for m in ms],
            "commit_latency_per_chunk_ms": [round(x, 2) for x in lat],
            # s3kv only: last shard stored -> rank 0's gather of that round returned
            "gather_latency_ms": ({"median": median(gather_lat), "p95": percentile(gather_lat, 95)}
                                  if gather_lat else None),
            "gather_latency_per_chunk_ms": [round(x, 2) for x in gather_lat],
        })
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    index = {(r["tp"], r["delay_ms"], r["strategy"]): r for r in rows}
    for (tp, d, s), r in index.items():
        if s != "s3kv":
            continue
        entry: dict[str, Any] = {"tp": tp, "delay_ms": d}
        for base in ("barrier", "tcpstore"):
            b = index[(tp, d, base)]
            entry[f"stall_median_s3kv_over_{base}"] = (
                r["fast_stall_ms"]["median"] / b["fast_stall_ms"]["median"])
            entry[f"stall_p95_s3kv_over_{base}"] = (
                r["fast_stall_ms"]["p95"] / b["fast_stall_ms"]["p95"])
            entry[f"step_median_s3kv_over_{base}"] = r["step_ms_median"] / b["step_ms_median"]
            entry[f"run_time_s3kv_over_{base}"] = r["run_s"] / b["run_s"]
        out.append(entry)
    return out


def table(rows: list[dict[str, Any]], rat: list[dict[str, Any]]) -> str:
    head = (f"{'TP':>3} {'D ms':>5} {'strategy':<9} {'fast med':>9} {'fast p95':>9} "
            f"{'worst-fast':>10} {'slow med':>9} {'compute':>8} {'step':>6} {'run s':>6} "
            f"{'commit med':>10} {'commit p95':>10} {'chunks':>6}")
    lines = ["per-step times in ms: stall = save call (fast ranks unless noted); compute "
             "includes the all-reduce (if on); step = compute + stall, all ranks", head]
    for r in rows:
        cl = r["commit_latency_ms"] or {"median": float("nan"), "p95": float("nan")}
        lines.append(
            f"{r['tp']:>3} {r['delay_ms']:>5} {r['strategy']:<9} "
            f"{r['fast_stall_ms']['median']:>9.2f} {r['fast_stall_ms']['p95']:>9.2f} "
            f"{r['fast_worst_rank_median_ms']:>10.2f} {r['slow_rank_stall_ms']['median']:>9.2f} "
            f"{r['compute_ms_median']:>8.1f} {r['step_ms_median']:>6.1f} {r['run_s']:>6.2f} "
            f"{cl['median']:>10.1f} {cl['p95']:>10.1f} {r['chunks_committed']:>3}/{r['steps']}")
    lines.append("")
    lines.append("ratios, same run: s3kv / barrier and s3kv / tcpstore "
                 "(fast-rank stall; step time; run time)")
    for e in rat:
        lines.append(
            f"TP={e['tp']} D={e['delay_ms']:>3} ms: stall median "
            f"{e['stall_median_s3kv_over_barrier']:.4f} (barrier) "
            f"{e['stall_median_s3kv_over_tcpstore']:.4f} (tcpstore); p95 "
            f"{e['stall_p95_s3kv_over_barrier']:.4f} / {e['stall_p95_s3kv_over_tcpstore']:.4f}; "
            f"step {e['step_median_s3kv_over_barrier']:.2f} / "
            f"{e['step_median_s3kv_over_tcpstore']:.2f}; "
            f"run time {e['run_time_s3kv_over_barrier']:.2f} / "
            f"{e['run_time_s3kv_over_tcpstore']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="15 steps per run (about 1.5 minutes)")
    ap.add_argument("--tp", default="2,4", help="TP sizes (default 2,4)")
    ap.add_argument("--delays", default="0,100,300", help="slow-rank upload delays in ms")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--compute", choices=("matmul", "sleep"), default="matmul")
    ap.add_argument("--compute-ms", type=float, default=20.0)
    ap.add_argument("--no-collective", action="store_true",
                    help="no all-reduce at the end of each forward step")
    ap.add_argument("--shard-kib", type=int, default=256, help="shard size per rank per step")
    ap.add_argument("--out", type=Path, default=RESULTS / "stall.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 15
    opts: dict[str, Any] = {
        "steps": args.steps, "compute": args.compute, "compute_ms": args.compute_ms,
        "collective": not args.no_collective,
        "delays": [int(d) for d in args.delays.split(",")], "shard_kib": args.shard_kib,
        "timeout_s": 120.0, "group_timeout_s": 600.0, "matmul_iters": 0,
    }
    if args.compute == "matmul":
        opts["matmul_iters"] = calibrate_matmul(args.compute_ms / 1000)
    tps = [int(t) for t in args.tp.split(",")]

    import boto3

    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with MotoProcess() as moto:
        bucket = f"s3kv-bench-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=bucket)
        print(f"moto {moto.url}; compute {args.compute} {args.compute_ms:g} ms"
              + (f" ({opts['matmul_iters']} x 256^2 matmul, 1 thread)"
                 if args.compute == "matmul" else "")
              + f"; {args.steps} steps; shard {args.shard_kib} KiB per rank per step; "
              f"slow rank = last rank", flush=True)
        for world in tps:
            t = time.perf_counter()
            per_rank = run_group(world, moto.url, bucket, opts)
            rows.extend(summarise(world, per_rank))
            print(f"  TP={world}: {time.perf_counter() - t:.0f} s", flush=True)
    wall = time.perf_counter() - started
    rat = ratios(rows)
    print()
    print(table(rows, rat))
    print(f"\n{wall:.0f} s in all")
    doc = {
        "benchmark": "stall",
        "machine": machine_info(PACKAGES),
        "endpoint": {"kind": "moto (child process)"},
        "settings": {**{k: v for k, v in opts.items() if k != "group_timeout_s"},
                     "tp": tps, "slow_rank": "last rank (TP-1)",
                     "strategies": list(STRATEGIES),
                     "stall": "time in the save call on the forward path (step wall - compute)",
                     "commit_latency": "manifest PUT answered - last shard PUT answered"},
        "wall_seconds": round(wall, 1),
        "loadavg_before": load_before,
        "ratios": rat,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
