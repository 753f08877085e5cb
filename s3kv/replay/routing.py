"""Which engine serves each request.

* ``random``: uniformly at random (seeded), what a plain load balancer does.
* ``round-robin``: in arrival order.
* ``prefix-affinity``: longest prefix match with a load check. The router
  remembers which engines it sent each block to (block ids are
  prefix-chained, so one id names the whole prefix up to it), as vLLM
  production stack's ``prefixaware`` router does; the engines sent the
  longest run of a request's leading blocks are its candidates (every
  engine when none matches), and of those the one with the least backlog
  takes it. Alone, that rule herds: a prefix every request starts with (a
  system prompt: the Mooncake conversation trace starts all 12,031
  requests with the same block) lives on the first engine that got it, so
  every later request matches there and nowhere else. Production routers
  therefore weigh load as well (llm-d's queue scorers, Ray Serve's and
  SGLang's imbalance thresholds); here without a tuning knob: a request
  leaves its prefix's engine for the least-loaded one when waiting there
  would take longer than recomputing the matched prefix elsewhere, the
  same trade as s3kv's deadline rule. Backlogs are the router's own
  estimate: the tokens it sent each engine (less the prefix it expected
  there), drained at ``prefill_tokens_per_s``. Ties go to the engine sent
  the fewest blocks, then the lowest index. The router's memory is
  unbounded: it believes an engine still holds every prefix it was sent.
  (A hash of the first block alone would send that whole trace to one
  engine.)

None of the rules look at the simulated engines (the affinity router's
backlogs are its own estimate), so a request's engine depends only on the
trace and the config: the replay with the S3 tier and the comparison without
it route every request alike.
"""

from __future__ import annotations

import random

from s3kv.replay.fleet import FleetConfig
from s3kv.replay.trace import Trace


def route_all(trace: Trace, cfg: FleetConfig) -> list[int]:
    """The engine of each request, in the trace's order."""
    engines = cfg.engines
    if cfg.routing == "round-robin":
        return [i % engines for i in range(len(trace.requests))]
    if cfg.routing == "random":
        rng = random.Random(cfg.seed)
        return [rng.randrange(engines) for _ in trace.requests]
    return _prefix_affinity(trace, engines, cfg.prefill_tokens_per_s)


def _prefix_affinity(trace: Trace, engines: int, tokens_per_s: float) -> list[int]:
    everyone = (1 << engines) - 1
    sent: dict[tuple[int, int], int] = {}  # (block id, block tokens) -> bitmask of engines
    blocks_sent = [0] * engines
    backlog = [0.0] * engines  # seconds of prefill the router believes are queued
    last_t = trace.requests[0].arrival_s if trace.requests else 0.0
    out: list[int] = []
    for req in trace.requests:
        drained = req.arrival_s - last_t
        last_t = req.arrival_s
        for e in range(engines):
            backlog[e] = max(0.0, backlog[e] - drained)
        bt = req.block_tokens
        best, matched = everyone, 0
        for h in req.blocks:
            narrower = best & sent.get((h, bt), 0)
            if not narrower:
                break
            best, matched = narrower, matched + 1
        prefix_s = min(matched * bt, req.input_tokens) / tokens_per_s

        def load(e: int) -> tuple[float, int, int]:
            return backlog[e], blocks_sent[e], e

        candidate = min((e for e in range(engines) if best >> e & 1), key=load)
        idlest = min(range(engines), key=load)
        engine = candidate
        if backlog[candidate] - backlog[idlest] > prefix_s:
            engine = idlest
        expected = prefix_s if engine == candidate else 0.0
        backlog[engine] += req.input_tokens / tokens_per_s - expected
        bit = 1 << engine
        for h in req.blocks:
            key = (h, bt)
            had = sent.get(key, 0)
            if not had & bit:
                blocks_sent[engine] += 1
                sent[key] = had | bit
        out.append(engine)
    return out
