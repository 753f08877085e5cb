"""The object store as an engine's scheduler and workers open it.

Both sides open the configured backend the same way: counted (every request
in the metrics) and hedged (``s3kv.store.hedged``). A store that cannot be
opened (no credentials, a bad endpoint) is not an error to the engine: it
serves without the cache, and says so once.
"""

from __future__ import annotations

import logging

from s3kv.aio import LoopThread
from s3kv.config import Settings
from s3kv.stats import Counters
from s3kv.store import ObjectStore, open_store
from s3kv.store.hedged import hedged

log = logging.getLogger("s3kv.store")


def open_engine_store(settings: Settings, counters: Counters, io: LoopThread
                      ) -> ObjectStore | None:
    """The configured store, counted and hedged, opened on ``io``'s loop; None
    if it cannot be opened. Opening performs no request, so it never waits on
    the store (the first request is the caller's)."""
    try:
        return hedged(io.run(open_store(settings.store), timeout=60), settings, counters)
    except Exception as exc:  # missing credentials, bad endpoint: serve without cache
        # The exception names what failed, never a credential (the AWS chain
        # keeps those out of its messages).
        log.warning("s3kv: cannot open the object store (%s: %s); serving without the cache",
                    type(exc).__name__, exc)
        return None
