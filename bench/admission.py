"""Admission policies on a mixed workload: PUTs and bytes stored per 1,000
requests, and the hit rate, for each policy in the same run.

    .venv/bin/python bench/admission.py [--requests 1000] [--shared 0.3] [--tp 4]

The workload: a share of requests (default 30%) start with one of a pool of
shared prefixes (system prompts, documents; popularity Zipf-distributed),
followed by a unique question; the rest are unique prompts. Each request
runs through s3kv's own chunk ids and admission code in arrival order, as
one engine's scheduler would see them: the longest committed prefix is a hit,
the remaining chunks are offered to the policy and, if admitted, committed
(TP shard PUTs + 1 manifest PUT each).
Target: second_sighting cuts PUTs and bytes by >= 50% and loses <= 10% of
the hits of ``all``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine_info
from s3kv.admission import MODES, AdmissionPolicy
from s3kv.keys import chain_chunk_ids

# KV bytes per token, Llama-3.1-8B in bf16: 32 layers * 8 KV heads * 128 * 2 (K,V) * 2 B.
BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2


def workload(n: int, shared_share: float, pool: int, seed: int) -> list[tuple[list[int], bool]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 50_000) for _ in range(rng.choice((768, 1024, 2048)))]
                for _ in range(pool)]
    weights = [1 / (i + 1) for i in range(pool)]  # Zipf(1) popularity
    out = []
    for _ in range(n):
        if rng.random() < shared_share:
            pre = rng.choices(prefixes, weights)[0]
            tail = [rng.randrange(3, 50_000) for _ in range(rng.randrange(64, 512))]
            out.append((pre + tail, True))
        else:
            out.append(([rng.randrange(3, 50_000) for _ in range(rng.randrange(512, 2048))],
                        False))
    return out


def simulate(mode: str, reqs: list[tuple[list[int], bool]], chunk: int, tp: int,
             block: int = 16) -> dict[str, float]:
    policy = AdmissionPolicy(mode, window=1_000_000)  # type: ignore[arg-type]
    committed: set[str] = set()
    puts = stored = hit_tokens = prompt_tokens = 0
    for tokens, flagged in reqs:
        ids = chain_chunk_ids(tokens, chunk)
        prompt_tokens += len(tokens)
        n_hit = 0
        while n_hit < len(ids) and ids[n_hit] in committed:
            n_hit += 1
        hit_tokens += min(n_hit * chunk, (len(tokens) - 1) // block * block)
        for cid in ids[n_hit:]:
            # "requested" here: the client flags requests that carry a shared prefix.
            if cid not in committed and policy.admit(cid, requested=flagged):
                committed.add(cid)
                puts += tp + 1
                stored += chunk * BYTES_PER_TOKEN
    scale = 1000 / len(reqs)
    return {"puts_per_1k": puts * scale, "bytes_per_1k": stored * scale,
            "hit_tokens_per_1k": hit_tokens * scale, "hit_rate": hit_tokens / prompt_tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--shared", type=float, default=0.3)
    ap.add_argument("--pools", default="10,30",
                    help="numbers of distinct shared prefixes to try (comma separated)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    t0 = time.time()
    by_pool = {}
    for pool in (int(x) for x in args.pools.split(",")):
        by_pool[pool] = run_pool(args, pool)
    result = {"benchmark": "admission", "machine": machine_info([]), "settings": vars(args),
              "bytes_per_token": BYTES_PER_TOKEN, "by_pool": by_pool,
              "wall_seconds": time.time() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "admission.json").write_text(json.dumps(result, indent=1))
    return 0


def run_pool(args: argparse.Namespace, pool: int) -> dict[str, dict[str, float]]:
    per_seed = []
    for seed in range(args.seeds):
        reqs = workload(args.requests, args.shared, pool, seed)
        per_seed.append({m: simulate(m, reqs, args.chunk, args.tp) for m in MODES})
    avg: dict[str, dict[str, float]] = {
        m: {k: sum(s[m][k] for s in per_seed) / len(per_seed) for k in per_seed[0][m]}
        for m in MODES}
    base = avg["all"]
    for m in MODES:
        avg[m]["puts_vs_all"] = avg[m]["puts_per_1k"] / base["puts_per_1k"]
        avg[m]["bytes_vs_all"] = avg[m]["bytes_per_1k"] / base["bytes_per_1k"]
        avg[m]["hits_vs_all"] = avg[m]["hit_tokens_per_1k"] / base["hit_tokens_per_1k"]
    print(f"\n{args.requests} requests, {args.shared:.0%} share one of {pool} prefixes, chunk "
          f"{args.chunk} tokens, TP={args.tp}, mean of {args.seeds} seeds")
    print(f"{'policy':16} {'PUT/1k':>9} {'GiB/1k':>8} {'hit rate':>9} {'PUTs':>7} {'bytes':>7}"
          f" {'hits':>7}   (last three: vs all)")
    for m in MODES:
        a = avg[m]
        print(f"{m:16} {a['puts_per_1k']:9.0f} {a['bytes_per_1k'] / 2**30:8.1f} "
              f"{a['hit_rate']:9.3f} {a['puts_vs_all']:7.2f} {a['bytes_vs_all']:7.2f} "
              f"{a['hits_vs_all']:7.2f}")
    ss = avg["second_sighting"]
    ok = ss["puts_vs_all"] <= 0.5 and ss["hits_vs_all"] >= 0.9
    print(f"second_sighting: PUTs -{1 - ss['puts_vs_all']:.0%}, hits "
          f"-{1 - ss['hits_vs_all']:.0%} -> target {'met' if ok else 'MISSED'}")
    return avg


if __name__ == "__main__":
    raise SystemExit(main())
