from __future__ import annotations

import datetime
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from s3kv.cli.app import app
from s3kv.keys import KeyLayout, new_writer_id
from tests.helpers_bucket import ChunkWriter, fingerprint, list_keys
from tests.s3server import S3Endpoint

PREFIX = "s3kv"


@dataclass
class Bucket:
    """One fresh bucket on the test endpoint, and a way to run the CLI against it."""

    endpoint: S3Endpoint
    name: str
    backend: str = "obstore"

    @property
    def client(self) -> Any:
        return self.endpoint.client()  # type: ignore[no-untyped-call]

    @property
    def layout(self) -> KeyLayout:
        return KeyLayout(PREFIX)

    @property
    def env(self) -> dict[str, str]:
        return {"S3KV_BUCKET": self.name, "S3KV_ENDPOINT_URL": self.endpoint.url,
                "S3KV_BACKEND": self.backend}

    def writer(self, model: str = "tiny-llama", *, tp: int = 1, writer: str = "test",
               doc: bool = True, tag: str = "", legacy: bool = False) -> ChunkWriter:
        """A writer at TP ``tp``; its id is ``new_writer_id(tp, writer)``. The
        namespace depends on the model and tag only, never on ``tp``. ``legacy``
        writes the older shard key form (see ChunkWriter)."""
        fp = fingerprint(model, tag)
        w = ChunkWriter(self.client, self.name, self.layout, fp.namespace,
                        writer=new_writer_id(tp, writer), tp=tp, legacy=legacy)
        if doc:
            w.put_namespace_doc(fp)
        return w

    def cli(self, *args: str, env: Mapping[str, str | None] | None = None,
            input: str | None = None) -> Result:
        full: dict[str, str | None] = {**self.env, **(env or {})}
        return CliRunner().invoke(app, list(args), env=full, input=input)

    def json(self, *args: str) -> dict[str, Any]:
        res = self.cli(*args, "--format", "json")
        assert res.exit_code == 0, (res.stdout, res.stderr)
        doc = json.loads(res.stdout)
        assert isinstance(doc, dict)
        return doc

    def object_keys(self, prefix: str = PREFIX + "/") -> list[str]:
        return list_keys(self.client, self.name, prefix)

    def age(self, seconds: float, prefix: str = PREFIX + "/") -> None:
        """Make objects look older: the in-process moto server's Last-Modified is
        rewritten, which is the only way to get old objects without waiting."""
        if self.endpoint.kind != "moto":
            pytest.skip("ageing objects needs the in-process moto server")
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        store = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[self.name]
        for key in store.keys.values():
            if key.name.startswith(prefix):
                key.last_modified -= datetime.timedelta(seconds=seconds)


@pytest.fixture(params=["obstore"])
def s3(request: pytest.FixtureRequest, s3_endpoint: S3Endpoint, bucket: str) -> Iterator[Bucket]:
    yield Bucket(s3_endpoint, bucket, request.param)


@pytest.fixture(params=["obstore", "aioboto3"])
def s3_any(request: pytest.FixtureRequest, s3_endpoint: S3Endpoint,
           bucket: str) -> Iterator[Bucket]:
    """For behaviour that differs per backend (errors, multipart uploads)."""
    yield Bucket(s3_endpoint, bucket, request.param)
