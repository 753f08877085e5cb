"""Strict JSON for documents read from the bucket (manifests, shard headers,
namespace documents).

Anyone who can write to the bucket can put any bytes there, and every reader
(the engine, ``ls``, ``gc``, ``verify``) must turn hostile input into its own
error type at a bounded cost. The standard parser lets two things through
that no s3kv document contains: ``NaN`` and ``Infinity`` (which later raise
``OverflowError`` where an int is expected) and nesting deep enough to raise
``RecursionError``. Both are refused here, as ``ValueError``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from typing_extensions import Buffer


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid in an s3kv document")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def loads_strict(data: Buffer) -> Any:
    """Parse ``data`` as JSON; ``ValueError`` for anything an s3kv writer never
    produces (not UTF-8, not JSON, NaN, Infinity or a number out of range,
    nesting past the parser)."""
    try:
        return json.loads(bytes(data), parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None
