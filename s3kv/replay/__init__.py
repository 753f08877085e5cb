"""Trace-driven fleet simulation: what s3kv would save, and cost, on recorded traffic.

``s3kv replay`` replays a request trace (:mod:`s3kv.replay.trace`) in virtual
time through a simulated fleet of engines (:mod:`s3kv.replay.sim`), using
s3kv's own rules rather than copies of them: chunk ids from
:func:`s3kv.keys.chunk_id`, admission from :mod:`s3kv.admission`, GC
selection from :mod:`s3kv.gc`, shard counts, model shapes and prices from
:mod:`s3kv.capacity`. Nothing here imports vLLM or torch; the plots
(:mod:`s3kv.replay.plots`) import matplotlib only when drawing.
"""

from s3kv.replay.sim import (
    PROFILES,
    ROUTINGS,
    FleetConfig,
    FleetConfigError,
    ReplayReport,
    Routing,
    StoreProfile,
    replay,
)
from s3kv.replay.trace import Trace, TraceError, TraceRequest, read_trace, upper_bound_hit_tokens

__all__ = ["PROFILES", "ROUTINGS", "FleetConfig", "FleetConfigError", "ReplayReport", "Routing",
           "StoreProfile", "Trace", "TraceError", "TraceRequest", "read_trace", "replay",
           "upper_bound_hit_tokens"]
