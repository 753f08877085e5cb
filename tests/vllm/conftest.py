from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the vLLM CPU build is installed by scripts/bootstrap.sh")

from devtools.tiny_model import TinyModelSpec, create_tiny_model
from tests.s3server import S3Endpoint
from tests.vllm.harness import TMP, job, make_prompts, run_engine


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return create_tiny_model(TMP / "models" / "tiny", TinyModelSpec())


@pytest.fixture(scope="session")
def other_model() -> Path:
    """Same architecture and shape, different weights."""
    return create_tiny_model(TMP / "models" / "tiny-seed1", TinyModelSpec(seed=1))


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    return make_prompts()


@pytest.fixture(scope="session")
def baseline_tp1(tiny_model: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy outputs of an engine with NO connector at all."""
    return run_engine(job(tiny_model, prompts)).outputs


@pytest.fixture(scope="session")
def baseline_tp2(tiny_model: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy outputs of a TP=2 engine with NO connector."""
    return run_engine(job(tiny_model, prompts, tp=2)).outputs


@pytest.fixture
def conn(s3_endpoint: S3Endpoint, bucket: str) -> dict[str, Any]:
    return {"bucket": bucket, "endpoint_url": s3_endpoint.url}


@pytest.fixture
def s3(s3_endpoint: S3Endpoint) -> Iterator[Any]:
    yield s3_endpoint.client()
