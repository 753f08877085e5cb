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
and exits 1 unless all of these hold:

- wrong tokens is 0;
- every manifest left in the bucket verifies (other than those whose shards
  the soak damaged itself);
- the scheduler's alignment guard never fired (``hit_misalignments``: a hit
  whose chunk id is not the id of the blocks it would fill, dropped and
  recomputed, so it serves no wrong token, yet it is a bug);
- every chunk left in the bucket holds the KV the model gives for the tokens
  its id names (``tests.faults.kv_audit``: a plain PyTorch forward of the
  model, no vLLM), and no chunk has an id of tokens no engine saw;
- the baseline's tokens are the reference forward's argmax wherever float
  noise could not flip the choice, and they vary across prompts and
  positions (a model emitting one token would hide wrong KV).

It also reports how decisive the baseline's greedy choices were: the
smallest gap between the two best logits of any generated token, against
the float noise measured in the same run (how far the baseline's logit gaps
lie from the reference forward's). A gap below ``MARGIN_NOISE_FACTOR`` times
the noise is reported ("decisive: no"), not failed: a near tie can only make
a correct run look wrong, never hide a wrong chunk, which the KV audit finds
whatever the margins.
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

from devtools.fault_proxy import (
    Delay,
    Drop,
    FaultProxy,
    FlipBytes,
    InternalError,
    SlowDown,
    Truncate,
)
from s3kv.metrics import METRICS
from tests.faults.kv_audit import ReferenceModel, StoredChunk, audit_kv, read_bucket
from tests.s3server import ensure_fake_credentials, start_moto
from tests.vllm.harness import CHUNK, TMP, bucket_keys, job, run_engine

CONNECTOR = {"connect_timeout_s": 1.0, "request_timeout_s": 3.0, "max_attempts": 2,
             "max_cache_wait_s": 5.0, "commit_timeout_s": 20.0}
#: Read from every engine's scheduler counters; declared in s3kv/metrics.py
#: (checked here, so a rename cannot turn the check into a silent 0).
MISALIGNMENT_COUNTER = "hit_misalignments"
#: A greedy choice whose top-2 logit gap is at least this many times the float
#: noise measured in the same run cannot be flipped by noise. Measured with the
#: tiny model, 4 engines: smallest gaps
#: 2.0e-4, 7.4e-4, 6.5e-4 (seeds 1-3) against noise of 1.5e-6 to 1.7e-6
#: (vLLM's gaps against the reference's; the same engine batched against one
#: request at a time with its prefix cached: 1.4e-6), ratios 130 to 480; the
#: reference alone gave smallest gaps of 1.6e-4 to 8.5e-4 over seeds 1-8. The
#: check is on the ratio because scaling the model's output head scales both:
#: with the head x64, gaps of 1.3e-2 against noise of 9e-5, ratio unchanged.
MARGIN_NOISE_FACTOR = 10.0
#: At least this fraction of the baseline's generated tokens must be distinct.
MIN_DISTINCT_FRACTION = 0.2


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
    hit_misalignments: int = 0
    kv_chunks_audited: int = 0
    kv_chunks_mismatched: int = 0
    kv_chunks_unknown: int = 0
    kv_max_rel_diff: float = 0.0
    kv_tolerance: float = 0.0
    kv_problems: dict[str, str] = field(default_factory=dict)  # chunk id -> what is wrong
    min_logit_margin: float = 0.0  # baseline (vLLM logprobs), over every generated token
    min_logit_margin_reference: float = 0.0  # the reference forward, same tokens
    logit_noise: float = 0.0  # largest |baseline gap - reference gap|
    margin_threshold: float = 0.0  # MARGIN_NOISE_FACTOR * logit_noise
    reference_disagreements: int = 0  # baseline tokens that are not the reference's argmax
    distinct_generated_tokens: int = 0
    baseline_tokens: int = 0
    reference_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def decisive(self) -> bool:
        """Float noise cannot flip any of this run's greedy choices. Reported,
        not required: a near tie can only make a correct run look wrong (a
        false alarm to explain), never hide a wrong chunk, which the KV audit
        finds whatever the margins."""
        return self.min_logit_margin >= self.margin_threshold

    @property
    def ok(self) -> bool:
        return (self.wrong_tokens == 0 and self.manifests_broken_unexpectedly == 0
                and self.hit_misalignments == 0 and self.kv_chunks_mismatched == 0
                and self.kv_chunks_unknown == 0 and self.kv_chunks_audited > 0
                and self.reference_disagreements == 0
                and self.distinct_generated_tokens >= MIN_DISTINCT_FRACTION * self.baseline_tokens)


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
    if MISALIGNMENT_COUNTER not in METRICS:
        raise RuntimeError(f"counter {MISALIGNMENT_COUNTER!r} is not declared in s3kv/metrics.py")
    ensure_fake_credentials()
    t0 = time.monotonic()
    rng = random.Random(seed)
    plan = plan_batches(rng, engines, batches, per_batch)
    all_batches = [b for eng in plan for b in eng]
    log(f"soak: {engines} engines x {batches} batches x {per_batch} requests, seed {seed}")
    baseline = run_engine(job(model, [], batches=all_batches, tp=tp, logprobs=2))
    base = baseline.outputs
    # Every token sequence an engine computed KV for: prompt and generated tokens
    # but the last (whose KV is never computed); the baseline's first.
    sequences: dict[tuple[int, ...], int] = {}
    for p, out in zip((p for b in all_batches for p in b), base, strict=True):
        sequences.setdefault(tuple(p + out[:-1]), len(sequences))
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
            for p, out in zip((p for b in eng_batches for p in b), res.outputs, strict=True):
                sequences.setdefault(tuple(p + out[:-1]), len(sequences))
            c = res.counters
            misaligned = int(c.get(MISALIGNMENT_COUNTER, 0))
            report.engines += 1
            report.requests_served += len(res.outputs)
            report.tokens_generated += sum(len(o) for o in res.outputs)
            report.wrong_tokens += sum(wrong)
            report.wrong_requests += sum(1 for w in wrong if w)
            report.hit_chunks += int(c.get("hit_chunks", 0))
            report.hit_tokens += int(c.get("hit_tokens", 0))
            report.hit_misalignments += misaligned
            report.recomputes += int(c.get("failed_loads", 0))
            report.load_failures += int(c.get("workers.load_failures", 0))
            report.chunks_committed += int(c.get("workers.chunks_committed", 0))
            log(f"  engine {i}{' (S3 down)' if i == outage else ''}: "
                f"{len(res.outputs)} requests, hits {int(c.get('hit_chunks', 0))} chunks, "
                f"misaligned hits {misaligned}, "
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
        stored = read_bucket(endpoint.url, bucket)
    finally:
        proxy.stop()
        server.stop()  # type: ignore[attr-defined]
    report.manifests_in_bucket = len(stored)
    report.manifests_verified = sum(1 for v in stored.values() if not isinstance(v, str))
    report.manifests_broken_unexpectedly = sum(
        1 for c, v in stored.items() if isinstance(v, str) and c not in damaged)
    judge_with_reference(report, model, stored, damaged, list(sequences), baseline.raw,
                         [p for b in all_batches for p in b], base)
    log(f"  KV audit: {report.kv_chunks_audited} chunks compared with the reference forward, "
        f"{report.kv_chunks_mismatched} differ, {report.kv_chunks_unknown} of unknown tokens "
        f"(largest difference {report.kv_max_rel_diff:.2g}, tolerance {report.kv_tolerance:g})")
    log(f"  baseline logit margins: smallest {report.min_logit_margin:.3g} "
        f"(reference {report.min_logit_margin_reference:.3g}), float noise "
        f"{report.logit_noise:.2g}, threshold {report.margin_threshold:.2g}; "
        f"decisive: {'yes' if report.decisive else 'no'}; "
        f"{report.distinct_generated_tokens} distinct of {report.baseline_tokens} tokens, "
        f"{report.reference_disagreements} not the reference's argmax")
    report.seconds = round(time.monotonic() - t0, 1)
    return report


def judge_with_reference(report: SoakReport, model: Path,
                         stored: dict[str, StoredChunk | str],
                         damaged: set[str], sequences: list[tuple[int, ...]],
                         baseline_raw: dict[str, Any], prompts: list[list[int]],
                         base: list[list[int]]) -> None:
    """One reference forward per distinct sequence: the KV audit of every stored
    chunk, and how decisive (and right) each of the baseline's greedy choices was."""
    t0 = time.monotonic()
    kv, refs = audit_kv(stored, sequences, ReferenceModel(model), chunk_tokens=CHUNK,
                        skip=damaged, logit_positions=max(len(o) for o in base))
    report.kv_chunks_audited = kv.audited
    report.kv_chunks_mismatched = len(kv.mismatched)
    report.kv_chunks_unknown = len(kv.unknown)
    report.kv_max_rel_diff = kv.max_rel_diff
    report.kv_tolerance = kv.tolerance
    report.kv_problems = {**kv.mismatched, **{c: "no known token sequence has this chunk id"
                                             for c in kv.unknown}}
    index = {seq: i for i, seq in enumerate(sequences)}
    top = baseline_raw["top_logprobs"]
    margins, ref_margins, noise = [], [], 0.0
    steps_checked: list[tuple[bool, float]] = []
    for p, out, steps in zip(prompts, base, top, strict=True):
        # The reference's logits cover the last len(out) positions of the sequence,
        # the ones that chose the generated tokens.
        values, tokens = refs[index[tuple(p + out[:-1])]]
        for i, (tok, best, second) in enumerate(steps):
            pos = i - len(out)
            gap, ref_gap = best - second, float(values[pos, 0] - values[pos, 1])
            margins.append(gap)
            ref_margins.append(ref_gap)
            noise = max(noise, abs(gap - ref_gap))
            steps_checked.append((int(tok) != out[i] or int(tokens[pos, 0]) != out[i],
                                  min(gap, ref_gap)))
    report.logit_noise = noise
    report.margin_threshold = MARGIN_NOISE_FACTOR * noise
    # The engine and the reference disagree on a choice that noise cannot flip:
    # the reference is not the engine's model (and the KV audit would be moot).
    report.reference_disagreements = sum(
        1 for differs, margin in steps_checked if differs and margin > report.margin_threshold)
    report.min_logit_margin = min(margins)
    report.min_logit_margin_reference = min(ref_margins)
    report.baseline_tokens = len(margins)
    report.distinct_generated_tokens = len({t for out in base for t in out})
    report.reference_seconds = round(time.monotonic() - t0, 1)


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
