"""Tests, benchmarks and tooling use s3kv through its public names only.

Scans the Python files under ``tests/``, ``bench/`` and ``devtools/`` and
fails (exit status 1, one ``file:line`` per finding) on

* an attribute ``X._name`` (leading underscore, not a dunder) read, written or
  deleted on anything but ``self`` or ``cls``;
* a literal ``"_name"`` handed to ``getattr``, ``setattr``, ``hasattr`` or
  ``delattr`` (``monkeypatch.setattr`` included), or a dotted
  ``"pkg.mod._name"`` target handed to ``setattr``/``delattr``;
* ``from s3kv... import _name`` or ``from devtools... import _name``, or a
  module path with a private part (``s3kv._x``);

unless the file and name are in :data:`ALLOWED` below, each with its reason.
A private name is a module's own business, so these are never findings:

* names in :data:`THIRD_PARTY`: private or underscore-named API of other
  libraries (the standard library, torch) that tests call on purpose; s3kv
  defines none of them;
* names the scanned file defines itself (``def _x``, ``class _X``,
  ``self._x = ...``, a class or module level ``_x``): Python's underscore
  marks a name private to its module, and the module may use it anywhere
  within itself (the fault proxy's request handler calls its server's
  ``_match``). A test file that defined a private of the same name as a
  product attribute would hide that attribute's use in that file: keep
  helpers' names distinct.

Standard library only: it runs before anything is installed.
Usage: ``python scripts/check_privates.py [ROOT]`` (ROOT: the repository).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# (file relative to the repository root, private name) -> why the access stays.
ALLOWED: dict[tuple[str, str], str] = {
    ("tests/vllm/test_stats.py", "_sched"): (
        "a connector built without a vLLM config gets a stand-in scheduler side; "
        "S3KVConnector (s3kv/vllm/connector.py) has no public way to set it"),
    ("tests/vllm/test_stats.py", "_worker"): (
        "same bare connector: its worker side set to None (the scheduler role); "
        "S3KVConnector has no public way to set it"),
}

# Underscore-named attributes of other libraries, used on purpose.
THIRD_PARTY: dict[str, str] = {
    "_exit": "os._exit: leave a forked or spawned process without teardown",
    "_getframe": "sys._getframe",
    "_sleep": "torch.cuda._sleep: a GPU spin of a known length (stands in for a forward)",
    "_replace": "namedtuple API (public despite the underscore)",
    "_asdict": "namedtuple API (public despite the underscore)",
    "_fields": "namedtuple API (public despite the underscore)",
    "_make": "namedtuple API (public despite the underscore)",
    "_field_defaults": "namedtuple API (public despite the underscore)",
}

SCANNED = ("tests", "bench", "devtools")
OWN_PACKAGES = ("s3kv", "devtools")
RECEIVERS = frozenset({"self", "cls"})
ATTR_FUNCTIONS = frozenset({"getattr", "setattr", "hasattr", "delattr"})
DOTTED_TARGET_FUNCTIONS = frozenset({"setattr", "delattr"})  # monkeypatch's string form


@dataclass(frozen=True, order=True)
class Finding:
    path: str
    line: int
    name: str
    how: str  # "attribute", "by-name" (a literal name to getattr & co) or "import"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.how} {self.name}"


def is_private(name: str) -> bool:
    """``_x`` or ``__x``; not ``_`` alone and not a dunder like ``__init__``."""
    if len(name) < 2 or not name.startswith("_"):
        return False
    return not (name.startswith("__") and name.endswith("__"))


def _own_names(tree: ast.Module) -> set[str]:
    """The private names a file defines: its functions and classes, attributes
    it sets on ``self``/``cls``, and names bound at module or class level."""
    names: set[str] = set()

    def bind(target: ast.expr, scope_level: bool) -> None:
        if isinstance(target, ast.Name) and scope_level:
            names.add(target.id)
        elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
              and target.value.id in RECEIVERS):
            names.add(target.attr)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                bind(elt, scope_level)

    def visit(body: Iterable[ast.stmt], scope_level: bool) -> None:
        for stmt in body:
            for node in ast.walk(stmt):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        bind(target, scope_level=False)
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                    bind(node.target, scope_level=False)
            # Names bound directly in a module or class body.
            if isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    bind(target, scope_level)
            elif isinstance(stmt, ast.AnnAssign):
                bind(stmt.target, scope_level)
            elif isinstance(stmt, ast.ClassDef):
                visit(stmt.body, scope_level=True)

    visit(tree.body, scope_level=True)
    return {n for n in names if is_private(n)}


def _literal_name(node: ast.Call) -> tuple[str, int] | None:
    """The private name a ``getattr``-style call names by a literal, if any."""
    func = node.func
    fname = func.id if isinstance(func, ast.Name) else (
        func.attr if isinstance(func, ast.Attribute) else None)
    if fname not in ATTR_FUNCTIONS:
        return None
    args = node.args
    if len(args) >= 2 and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
        return args[1].value, node.lineno
    if (fname in DOTTED_TARGET_FUNCTIONS and args and isinstance(args[0], ast.Constant)
            and isinstance(args[0].value, str) and "." in args[0].value):
        return args[0].value.rsplit(".", 1)[1], node.lineno
    return None


def find_privates(source: str, path: str) -> list[Finding]:
    """Every private access in ``source`` that is neither a third-party name nor
    one the file defines itself (the allow-list is not applied here)."""
    tree = ast.parse(source, filename=path)
    own = _own_names(tree)
    found: set[Finding] = set()

    def note(name: str, line: int, how: str) -> None:
        if is_private(name) and name not in THIRD_PARTY and name not in own:
            found.add(Finding(path, line, name, how))

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            receiver = node.value
            if not (isinstance(receiver, ast.Name) and receiver.id in RECEIVERS):
                note(node.attr, node.lineno, "attribute")
        elif isinstance(node, ast.Call):
            literal = _literal_name(node)
            if literal is not None:
                note(literal[0], literal[1], "by-name")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] not in OWN_PACKAGES:
                continue
            for part in parts[1:]:
                if is_private(part):
                    found.add(Finding(path, node.lineno, node.module, "import"))
            for alias in node.names:
                if is_private(alias.name):
                    found.add(Finding(path, node.lineno, alias.name, "import"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in OWN_PACKAGES and any(is_private(p) for p in parts[1:]):
                    found.add(Finding(path, node.lineno, alias.name, "import"))
    return sorted(found)


def check_source(source: str, path: str,
                 allowed: Mapping[tuple[str, str], str] = ALLOWED) -> list[Finding]:
    """The findings in ``source`` (named ``path``) that the allow-list does not excuse."""
    return [f for f in find_privates(source, path) if (f.path, f.name) not in allowed]


def python_files(root: Path) -> list[Path]:
    return sorted(p for top in SCANNED for p in (root / top).rglob("*.py")
                  if ".venv" not in p.parts and "__pycache__" not in p.parts)


def main(argv: list[str]) -> int:
    root = Path(argv[1]).resolve() if len(argv) > 1 else Path(__file__).resolve().parent.parent
    findings: list[Finding] = []
    used: set[tuple[str, str]] = set()
    for file in python_files(root):
        rel = file.relative_to(root).as_posix()
        for f in find_privates(file.read_text(encoding="utf-8"), rel):
            if (f.path, f.name) in ALLOWED:
                used.add((f.path, f.name))
            else:
                findings.append(f)
    stale = sorted(set(ALLOWED) - used)
    for f in findings:
        print(f"{f}: use a public name (or add it to ALLOWED in scripts/check_privates.py, "
              "with a reason)")
    for path, name in stale:
        print(f"{path}: {name}: ALLOWED entry no longer needed; remove it")
    if findings or stale:
        print(f"check_privates: {len(findings)} private access(es), "
              f"{len(stale)} stale allow-list entr(ies)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
