"""A real HTTP S3 endpoint for tests: moto's threaded server, or any endpoint
given by ``S3KV_TEST_ENDPOINT_URL`` (for example a Ceph RGW tier)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import boto3


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    kind: str  # "moto" or "external"

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def new_bucket(self, stem: str = "t") -> str:
        name = f"{stem}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def ensure_fake_credentials() -> None:
    """moto accepts any keys; a real external endpoint brings its own."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.pop("AWS_PROFILE", None)


def start_moto() -> tuple[object, S3Endpoint]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, S3Endpoint(f"http://{host}:{port}", "moto")
