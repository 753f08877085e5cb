"""Lets s3kv's worker side import where vLLM is absent (GPU hosts with only CUDA PyTorch).

``s3kv.vllm.metadata`` subclasses vLLM's ``KVConnectorMetadata``, an empty
marker base class, and imports nothing else from vLLM on the worker path.
Where vLLM is installed this does nothing.
"""

from __future__ import annotations

import importlib
import sys
import types

_BASE = "vllm.distributed.kv_transfer.kv_connector.v1.base"


def install_if_missing() -> bool:
    """Returns True when the stub was installed (vLLM is not importable)."""
    try:
        importlib.import_module(_BASE)
        return False
    except ImportError:
        pass
    parts = _BASE.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        mod = sys.modules.get(name) or types.ModuleType(name)
        mod.__path__ = []  # type: ignore[attr-defined]
        sys.modules[name] = mod
        if i > 1:
            setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)

    class KVConnectorMetadata:  # mirrors vLLM's empty marker class
        pass

    sys.modules[_BASE].KVConnectorMetadata = KVConnectorMetadata  # type: ignore[attr-defined]
    return True
