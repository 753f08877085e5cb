"""The obstore backend's credentials: the AWS chain through obstore's boto3
provider, refreshed well before they expire, and never shown in a repr.

Constructing the store sends no request, so these need no server.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from obstore.auth.boto3 import Boto3CredentialProvider

from s3kv.config import StoreSettings
from s3kv.errors import AccessDenied
from s3kv.store.s3_obstore import ObstoreStore

SECRET = "S3KVs3cr3t-obstore-provider-0b9e7d"
SETTINGS = StoreSettings(bucket="my-bucket", endpoint_url="http://127.0.0.1:9", region="eu-west-1")


@pytest.fixture
def only_env_chain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """An AWS chain with nothing in it but what the test puts in the environment."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def test_session_credentials_reach_obstore_with_a_short_expiry(
    only_env_chain: pytest.MonkeyPatch,
) -> None:
    only_env_chain.setenv("AWS_ACCESS_KEY_ID", "AKIAS3KVPROVIDER01")
    only_env_chain.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    only_env_chain.setenv("AWS_SESSION_TOKEN", "session-token-1")
    store = ObstoreStore(SETTINGS)
    provider = store.client.credential_provider
    assert isinstance(provider, Boto3CredentialProvider)
    creds = provider()
    assert creds["access_key_id"] == "AKIAS3KVPROVIDER01"
    assert creds["secret_access_key"] == SECRET  # it does hold the secret
    assert creds.get("token") == "session-token-1"
    expires = creds["expires_at"]
    assert expires is not None
    # botocore refreshes at least 10 min before expiry; the cached copy must not outlive that.
    assert expires - datetime.now(UTC) <= timedelta(minutes=5)
    for text in (repr(provider), str(provider), repr(store), str(store), repr(store.client),
                 repr(vars(store))):
        assert SECRET not in text
    assert "my-bucket" in repr(store)
    # The settings' region wins over anything the provider carries.
    assert store.client.config.get("region") == "eu-west-1"


def test_an_empty_chain_is_access_denied(only_env_chain: pytest.MonkeyPatch) -> None:
    with pytest.raises(AccessDenied, match="no usable AWS credentials"):
        ObstoreStore(SETTINGS)
