"""Test, benchmark and demo tooling that is not part of the installed product.

Lives beside ``s3kv/`` at the repository root, outside the wheel
(``[tool.setuptools.packages.find] include = ["s3kv*"]``): the engine runner,
the tiny random-weight models, the in-memory store, the fault-injecting S3
proxy, the GPU worker rig (with its KV cache layouts and vLLM stand-in) and
the demo are what the tests, ``bench/``, ``tests/gpu`` and ``scripts/demo.sh``
share; ``bench/`` and ``devtools`` never import ``tests``. Importing this
package imports nothing: ``tests/gpu`` runs on machines with only CUDA
PyTorch, so no module here may be pulled in by another one that needs vLLM,
moto or boto3. ``s3kv`` never imports ``devtools`` (a unit test checks).
"""
