"""The installed package holds the product only.

Test, benchmark and demo tooling lives in ``devtools/`` at the repository
root, outside the wheel. If ``s3kv`` imported it, an installed s3kv would
fail at import time (devtools is not installed), and the demo's moto server
would become a product dependency; so the boundary is checked here, by
reading the source rather than importing it (an import that happens only on
some code path would otherwise slip through).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "s3kv"
TOOLING = ("engine_run.py", "tiny_model.py", "hybrid_model.py", "demo.py", "memory_store.py",
           "fault_proxy.py", "gpu_rig.py", "gpu_layouts.py", "vllm_stub.py")


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions, ``if`` blocks)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_product_never_imports_devtools() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p)
                                         if m == "devtools" or m.startswith("devtools."))
        for p in sorted(PACKAGE.rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_product_never_names_devtools_modules() -> None:
    """Catches the string forms too (``python -m devtools.engine_run``,
    ``importlib.import_module("devtools...")``)."""
    hits = [str(p.relative_to(ROOT)) for p in sorted(PACKAGE.rglob("*.py"))
            if "devtools." in p.read_text()]
    assert hits == []


def test_tooling_modules_are_not_in_the_package() -> None:
    assert [str(p) for p in PACKAGE.rglob("*.py") if p.name in TOOLING] == []
    assert all((ROOT / "devtools" / name).exists() for name in TOOLING)


def test_bench_and_devtools_never_import_tests() -> None:
    """Benchmarks and tooling share code through ``devtools``: a benchmark that
    imported ``tests`` would run test modules (and their fixtures' imports)."""
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p)
                                         if m == "tests" or m.startswith("tests."))
        for top in ("bench", "devtools") for p in sorted((ROOT / top).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}
