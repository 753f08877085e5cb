"""vLLM plugin entry point: registers the connector name ``S3KVConnector``.

Runs in every vLLM process (``vllm.general_plugins``), so it only registers
a lazy module path; nothing heavy is imported here.
"""

from __future__ import annotations


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    name = "S3KVConnector"
    if name in getattr(KVConnectorFactory, "_registry", {}):
        return
    KVConnectorFactory.register_connector(name, "s3kv.vllm.connector", "S3KVConnector")
