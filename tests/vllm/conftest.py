from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the vLLM CPU build is installed by scripts/bootstrap.sh")

from devtools.tiny_model import TinyModelSpec, create_tiny_model
from tests.s3server import S3Endpoint
from tests.vllm.harness import TMP, EngineResult, bucket_keys, job, make_prompts, run_engine


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


@dataclass(frozen=True)
class Written:
    """A bucket that one cold TP=1 engine with the connector filled."""

    bucket: str
    result: EngineResult


@pytest.fixture(scope="session")
def written_tp1(tiny_model: Path, prompts: list[list[int]], s3_endpoint: S3Endpoint) -> Written:
    """One cold TP=1 engine with the connector over ``prompts``, into a bucket of
    its own. Many tests start from exactly this writer (same model, prompts,
    settings, TP): it is run once per session, and each test reads a copy of
    its bucket (``cold_tp1``), so what a test deletes, corrupts or adds stays
    its own. Greedy engines are deterministic: the copy holds the chunks a fresh
    writer would (only the random writer id in the shard keys differs, which
    no test compares)."""
    bucket = s3_endpoint.new_bucket("w")
    res = run_engine(job(tiny_model, prompts, {"bucket": bucket, "endpoint_url": s3_endpoint.url}))
    return Written(bucket, res)


@pytest.fixture
def cold_tp1(written_tp1: Written, s3: Any, bucket: str) -> EngineResult:
    """This test's ``bucket`` filled as by ``written_tp1``'s engine (server-side
    copies of every object), and that engine's result."""
    for key in bucket_keys(s3, written_tp1.bucket):
        s3.copy_object(Bucket=bucket, Key=key,
                       CopySource={"Bucket": written_tp1.bucket, "Key": key})
    return written_tp1.result


@pytest.fixture
def conn(s3_endpoint: S3Endpoint, bucket: str) -> dict[str, Any]:
    return {"bucket": bucket, "endpoint_url": s3_endpoint.url}


@pytest.fixture
def s3(s3_endpoint: S3Endpoint) -> Iterator[Any]:
    yield s3_endpoint.client()
