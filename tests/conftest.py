from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.fault_proxy import FaultProxy
from tests.s3server import S3Endpoint, ensure_fake_credentials, start_moto

logging.getLogger("werkzeug").setLevel(logging.ERROR)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _project_tmpdir() -> None:
    """vLLM and torch leave sockets and compile caches in TMPDIR: keep them local."""
    tmp = ROOT / ".tmp"
    tmp.mkdir(exist_ok=True)
    os.environ.setdefault("TMPDIR", str(tmp))
    shutil.rmtree(tmp / "engine-logs", ignore_errors=True)  # this session's logs only


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[S3Endpoint]:
    ensure_fake_credentials()
    server, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        server.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def s3_endpoint(moto_endpoint: S3Endpoint) -> S3Endpoint:
    """The endpoint the integration tests use: moto unless an external one is set."""
    external = os.environ.get("S3KV_TEST_ENDPOINT_URL")
    if external:
        return S3Endpoint(external, "external")
    return moto_endpoint


@pytest.fixture
def bucket(s3_endpoint: S3Endpoint) -> str:
    return s3_endpoint.new_bucket()


@pytest.fixture
def fault_proxy(moto_endpoint: S3Endpoint) -> Iterator[FaultProxy]:
    """A fresh fault proxy (no rules) in front of the session's moto server."""
    proxy = FaultProxy(moto_endpoint.url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def fault_bucket(moto_endpoint: S3Endpoint) -> str:
    """A bucket on moto, created directly (not through the proxy)."""
    return moto_endpoint.new_bucket("fault")
