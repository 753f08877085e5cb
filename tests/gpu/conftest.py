"""GPU tests: s3kv's own device code on real tensors, without vLLM.

Tests marked ``cuda`` need ``torch.cuda.is_available()`` and skip with that
reason elsewhere; the CPU variants of the same checks run everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from devtools.gpu_layouts import Layout
from devtools.gpu_rig import Rig

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=cuda)]


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    """Builds rigs and shuts their worker sides down after the test."""
    made: list[Rig] = []

    def build(layout: Layout, device: str, **kw: object) -> Rig:
        rig = Rig(layout, device, **kw)  # type: ignore[arg-type]
        made.append(rig)
        return rig

    yield build
    for rig in made:
        rig.close()


@pytest.fixture(scope="session")
def cycles_per_ms() -> float:
    """GPU clock cycles per millisecond, for ``torch.cuda._sleep`` (measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm up
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return float(50_000_000 / start.elapsed_time(end))
