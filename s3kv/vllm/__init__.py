"""The vLLM-facing package: the only part of s3kv that imports torch or vLLM.

Importing this package imports neither; its modules do.
"""
