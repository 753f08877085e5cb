"""Exception tree and the one table that maps S3 error codes to it.

Every backend translates client errors through :func:`from_s3_error` so the
rest of the code reasons about *meaning* (not found, already exists, throttled,
unreachable) instead of each client library's exception zoo.
"""

from __future__ import annotations


class S3KVError(Exception):
    """Base of every error s3kv raises on purpose."""


class ConfigError(S3KVError, ValueError):
    """A configuration value is missing, unknown or out of range.

    The message always names the offending key and, where there is a closed
    set, the valid choices, so the user can fix it without reading code.
    """

    def __init__(self, key: str, problem: str, choices: object | None = None) -> None:
        msg = f"s3kv config key {key!r}: {problem}"
        if choices is not None:
            msg += f" (valid: {choices})"
        super().__init__(msg)
        self.key = key


class WeightsUnresolved(S3KVError):
    """The weights cannot be identified and no ``weights_id`` pins them.

    Keying the cache by anything weaker (the model's name) would let two
    checkpoints of one name read each other's KV: wrong tokens. The connector
    serves without the cache instead; the message names the fix.
    """

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(
            f"s3kv: cannot identify the weights of {model!r} ({reason}); serving WITHOUT "
            "the cache. Set weights_id in kv_connector_extra_config (e.g. the "
            "checkpoint's commit) to name them and enable the cache"
        )
        self.model = model


# --- store errors -------------------------------------------------------------


class StoreError(S3KVError):
    """An object-store request failed."""

    def __init__(self, message: str, *, key: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.code = code


class NotFound(StoreError):
    """The object (or the bucket) does not exist."""


class NoSuchBucket(NotFound):
    """The bucket itself does not exist."""


class PreconditionFailed(StoreError):
    """A conditional request's precondition did not hold (HTTP 412)."""


class AlreadyExists(PreconditionFailed):
    """A ``mode="create"`` put found the key already there."""


class ConditionalConflict(StoreError):
    """A concurrent conditional write is in progress (HTTP 409); retry later."""


class AccessDenied(StoreError):
    """The credentials are missing, invalid or not allowed to do this."""


class Throttled(StoreError):
    """The server asked us to slow down (503 SlowDown and friends)."""


class Unavailable(StoreError):
    """The endpoint could not be reached or timed out."""


class InvalidRange(StoreError):
    """A ranged GET asked for bytes outside the object."""


# --- data errors --------------------------------------------------------------


class ManifestError(S3KVError, ValueError):
    """A manifest document is malformed, too large, or inconsistent."""


class IntegrityError(S3KVError):
    """Shard bytes do not match their manifest (size, checksum, or missing).

    The connector turns this into a recompute; it must never be swallowed
    into a partial load.
    """


# One table: S3 error code (or bare HTTP status) -> exception type.
S3_ERROR_TABLE: dict[str, type[StoreError]] = {
    "NoSuchKey": NotFound,
    "NotFound": NotFound,
    "404": NotFound,
    "NoSuchBucket": NoSuchBucket,
    "NoSuchUpload": NotFound,
    "PreconditionFailed": PreconditionFailed,
    "412": PreconditionFailed,
    "ConditionalRequestConflict": ConditionalConflict,
    "OperationAborted": ConditionalConflict,
    "409": ConditionalConflict,
    "AccessDenied": AccessDenied,
    "AllAccessDisabled": AccessDenied,
    "InvalidAccessKeyId": AccessDenied,
    "SignatureDoesNotMatch": AccessDenied,
    "ExpiredToken": AccessDenied,
    "InvalidToken": AccessDenied,
    "TokenRefreshRequired": AccessDenied,
    "403": AccessDenied,
    "SlowDown": Throttled,
    "Throttling": Throttled,
    "ThrottlingException": Throttled,
    "RequestLimitExceeded": Throttled,
    "503": Throttled,
    "ServiceUnavailable": Unavailable,
    "InternalError": Unavailable,
    "500": Unavailable,
    "RequestTimeout": Unavailable,
    "InvalidRange": InvalidRange,
    "416": InvalidRange,
}


def from_s3_error(
    code: str | None, message: str, *, key: str | None = None, status: int | None = None
) -> StoreError:
    """Build the exception for an S3 error code, falling back to the HTTP status."""
    exc_type = S3_ERROR_TABLE.get(code or "")
    if exc_type is None and status is not None:
        exc_type = S3_ERROR_TABLE.get(str(status))
    fallback = str(status) if status else None
    return (exc_type or StoreError)(message, key=key, code=code or fallback)
