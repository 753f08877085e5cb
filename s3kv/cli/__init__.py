"""The ``s3kv`` command line: inspect and maintain a bucket prefix of KV chunks.

Nothing under this package imports torch or vLLM: operators run it from a
laptop or a cron job, far from any GPU.
"""
