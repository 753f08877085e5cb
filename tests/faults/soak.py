"""Soak: engines one after another on one bucket, random faults on every request.

A bounded run of mixed requests (shared prefixes, fresh tails, exact repeats)
served by a sequence of real vLLM engines, each a new process, all going
through the fault proxy in front of a moto server. Faults are drawn at random
(seeded) per request: SlowDown, 500s, dropped connections, lost responses,
delays, truncated and bit-flipped bodies. Between engines a stored shard may
be damaged at rest, and one engine runs through a full outage.

Judged against one engine without the connector over the same batches:

    python -m tests.faults.soak --engines 8 --seed 1

prints faults injected, requests served, hits, recomputes and wrong tokens,
and exits 1 unless wrong tokens is 0 and every manifest left in the bucket
verifies (other than those whose shards the soak damaged itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.proxy import (
    Delay,
    Drop,
    FaultProxy,
    FlipBytes,
    InternalError,
    SlowDown,
    Truncate,
)
from tests.s3server import ensure_fake_credentials, start_moto
from tests.vllm.harness import TMP, audit, bucket_keys, job, run_engine

CONNECTOR = {"connect_timeout_s": 1.0, "request_timeout_s": 3.0, "max_attempts": 2,
             "load_timeout_s": 5.0, "commit_timeout_s": 20.0}


@dataclass
class SoakReport:
    engines: int = 0
    outage_engines: int = 0
    requests_served: int = 0
    tokens_generated: int = 0
    wrong_tokens: int = 0
    wrong_requests: int = 0
    faults_injected: int = 0
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    shards_damaged_at_rest: int = 0
    s3_requests: int = 0
    hit_chunks: int = 0
    hit_tokens: int = 0
    recomputes: int = 0
    load_failures: int = 0
    chunks_committed: int = 0
    manifests_in_bucket: int = 0
    manifests_verified: int = 0
    manifests_broken_unexpectedly: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.wrong_tokens == 0 and self.manifests_broken_unexpectedly == 0


def plan_batches(rng: random.Random, engines: int, batches: int, per_batch: int
                 ) -> list[list[list[list[int]]]]:
    """Per engine, batches of prompts: a few shared prefixes with fresh tails,
    plus exact repeats of earlier prompts (whole hits)."""
    prefixes = [[rng.randrange(3, 1000) for _ in range(rng.randrange(300, 800))]
                for _ in range(4)]
    seen: list[list[int]] = []
    plan = []
    for _ in range(engines):
        eng = []
        for _ in range(batches):
            batch: list[list[int]] = []
            while len(batch) < per_batch:
                if seen and rng.random() < 0.3:
                    p = rng.choice(seen)
                else:
                    p = rng.choice(prefixes) + [rng.randrange(3, 1000)
                                                for _ in range(rng.randrange(20, 400))]
                    seen.append(p)
                if p not in batch:
                    batch.append(p)
            eng.append(batch)
        plan.append(eng)
    return plan


def add_random_faults(proxy: FaultProxy, seed: int, scale: float) -> None:
    shard = r"/r\d+$"
    rules: list[tuple[str | None, str, Any, float]] = [
        (None, "", SlowDown(), 0.05),
        (None, "", Drop(reset=True), 0.02),
        (None, "", Delay(300), 0.05),
        ("PUT", "", InternalError(), 0.05),
        ("PUT", "", Drop(after_upstream=True), 0.03),  # applied, answer lost
        ("GET", shard, FlipBytes(), 0.05),
        ("GET", shard, Truncate(), 0.03),
        ("GET", r"/manifest\.json$", Truncate(), 0.03),
    ]
    for i, (method, path, action, p) in enumerate(rules):
        proxy.add(method, path, action, probability=min(1.0, p * scale), seed=seed * 100 + i)


def damage_a_shard(s3: Any, bucket: str, rng: random.Random) -> str | None:
    """Flip one byte of a random stored shard; returns its chunk id."""
    keys = [k for k in bucket_keys(s3, bucket) if re.search(r"/r\d+$", k)]
    if not keys:
        return None
    key = rng.choice(sorted(keys))
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[rng.randrange(len(body))] ^= 0x10
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    return key.split("/")[-3]


def wrong_tokens(got: list[int], want: list[int]) -> int:
    return sum(a != b for a, b in zip(got, want, strict=False)) + abs(len(got) - len(want))


def run_soak(model: Path, *, engines: int = 8, seed: int = 1, fault_scale: float = 1.0,
             batches: int = 3, per_batch: int = 4, tp: int = 1,
             log: Any = print) -> SoakReport:
    ensure_fake_credentials()
    t0 = time.monotonic()
    rng = random.Random(seed)
    plan = plan_batches(rng, engines, batches, per_batch)
    all_batches = [b for eng in plan for b in eng]
    log(f"soak: {engines} engines x {batches} batches x {per_batch} requests, seed {seed}")
    base = run_engine(job(model, [], batches=all_batches, tp=tp)).outputs
    server, endpoint = start_moto()
    proxy = FaultProxy(endpoint.url).start()
    report = SoakReport()
    damaged: set[str] = set()
    try:
        bucket = endpoint.new_bucket("soak")
        s3 = endpoint.client()
        add_random_faults(proxy, seed, fault_scale)
        outage = engines // 2 if engines >= 3 else -1
        offset = 0
        for i, eng_batches in enumerate(plan):
            if i == outage:
                down = proxy.add(None, "", Drop(reset=True), first=True)
            conn = {"bucket": bucket, "endpoint_url": proxy.url, **CONNECTOR}
            res = run_engine(job(model, [], conn, batches=eng_batches, tp=tp,
                                 prefix_caching=bool(rng.getrandbits(1))))
            if i == outage:
                proxy.remove(down)
                report.outage_engines += 1
            want = base[offset: offset + len(res.outputs)]
            offset += sum(len(b) for b in eng_batches)
            wrong = [wrong_tokens(g, w) for g, w in zip(res.outputs, want, strict=True)]
            c = res.counters
            report.engines += 1
            report.requests_served += len(res.outputs)
            report.tokens_generated += sum(len(o) for o in res.outputs)
            report.wrong_tokens += sum(wrong)
            report.wrong_requests += sum(1 for w in wrong if w)
            report.hit_chunks += int(c.get("hit_chunks", 0))
            report.hit_tokens += int(c.get("hit_tokens", 0))
            report.recomputes += int(c.get("failed_loads", 0))
            report.load_failures += int(c.get("workers.load_failures", 0))
            report.chunks_committed += int(c.get("workers.chunks_committed", 0))
            log(f"  engine {i}{' (S3 down)' if i == outage else ''}: "
                f"{len(res.outputs)} requests, hits {int(c.get('hit_chunks', 0))} chunks, "
                f"recomputes {int(c.get('failed_loads', 0))}, wrong tokens {sum(wrong)}, "
                f"faults so far {proxy.faults}")
            if rng.random() < 0.5:
                cid = damage_a_shard(s3, bucket, rng)
                if cid is not None:
                    damaged.add(cid)
                    report.shards_damaged_at_rest += 1
        report.faults_injected = proxy.faults + report.shards_damaged_at_rest
        for r in proxy.requests:
            if r.fault is not None:
                report.faults_by_kind[r.fault] = report.faults_by_kind.get(r.fault, 0) + 1
        report.s3_requests = len(proxy.requests)
        found = audit(endpoint.url, bucket)
        report.manifests_in_bucket = len(found)
        report.manifests_verified = sum(1 for v in found.values() if v == "ok")
        report.manifests_broken_unexpectedly = sum(
            1 for c, v in found.items() if v != "ok" and c not in damaged)
    finally:
        proxy.stop()
        server.stop()  # type: ignore[attr-defined]
    report.seconds = round(time.monotonic() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fault-scale", type=float, default=1.0,
                    help="multiply every fault probability")
    ap.add_argument("--tp", type=int, default=1, choices=(1, 2))
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from devtools.tiny_model import TinyModelSpec, create_tiny_model

    model = create_tiny_model(TMP / "models" / "tiny", TinyModelSpec())
    rep = run_soak(model, engines=args.engines, seed=args.seed,
                   fault_scale=args.fault_scale, tp=args.tp)
    doc = {**asdict(rep), "ok": rep.ok}
    print(json.dumps(doc, indent=2))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
