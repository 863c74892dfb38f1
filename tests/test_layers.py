"""The import layers of qlib_ext/ (docs/architecture.md): no module imports a higher layer.

Every ``import``/``from ... import`` anywhere in a module counts, lazy imports inside functions too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qlib_ext"

LAYERS: list[tuple[str, ...]] = [
    # the base: imported by everyone; pool.record is the schema of the pool's documents, identity the canonical
    # JSON and its digests (stdlib only)
    ("qlib_ext", "qlib_ext.errors", "qlib_ext.defaults", "qlib_ext.identity", "qlib_ext.pool.record",
     "qlib_ext.tables", "qlib_ext.names"),
    ("qlib_ext.store", "qlib_ext.data"),
    ("qlib_ext.workflow",),
    ("qlib_ext.pool",),
    ("qlib_ext.cache", "qlib_ext.backtest"),
    ("qlib_ext.tracking",),
    ("qlib_ext.analysis",),
    ("qlib_ext.worker", "qlib_ext.search"),
    # the run session (submit, proposer, warm-up, workers, summary) and the summary it prints; launch starts the
    # workers on a cluster scheduler instead (SLURM, Kubernetes)
    ("qlib_ext.session", "qlib_ext.summary", "qlib_ext.launch"),
    # thin entry points over the session: the command line and the Python API (neither imports the other)
    ("qlib_ext.api", "qlib_ext.cli", "qlib_ext.__main__", "qlib_ext.profile"),
]
"""Lowest first. A module belongs to the longest prefix listed; it may import its own layer and below."""

TOP = len(LAYERS) - 1

FACADE = {("qlib_ext", "qlib_ext.api")}
"""Allowed upward edges: the package's ``__getattr__`` forwards ``qlib_ext.run``/``leaderboard``/... to the
notebook API on first use (importing ``qlib_ext`` for ``__version__`` loads nothing above the base)."""


def layer_of(module: str) -> int:
    """The layer of a dotted module name (ValueError when no prefix is listed: add the new package)."""
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    if best is None:
        raise ValueError(f"module {module} is in no layer of tests/test_layers.py")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every qlib_ext module ``path`` imports, resolved to the deepest module
    (``from qlib_ext import defaults`` is ``qlib_ext.defaults``; relative imports are resolved)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                out.append((node.lineno, sub if is_module else base))
    return [(line, m) for line, m in out if m == "qlib_ext" or m.startswith("qlib_ext.")]


def upward_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        for line, target in imported(path):
            theirs = layer_of(target)
            if theirs > mine and (me, target) not in FACADE:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} (layer {mine}) imports {target} "
                             f"(layer {theirs})")
    return found


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_checker_sees_lazy_relative_and_from_package_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "qlib_ext"
    (pkg / "workflow").mkdir(parents=True)
    (pkg / "worker").mkdir()
    for f in ("__init__.py", "defaults.py", "workflow/__init__.py", "worker/__init__.py", "worker/loop.py"):
        (pkg / f).write_text("")
    (pkg / "workflow" / "expand.py").write_text(
        "from qlib_ext import defaults\n"
        "def f():\n    from ..worker import loop\n"
        "def g():\n    import qlib_ext.worker.loop\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert [m for _, m in imported(pkg / "workflow" / "expand.py")] == [
        "qlib_ext.defaults", "qlib_ext.worker.loop", "qlib_ext.worker.loop"]
    assert len(upward_imports()) == 2


@pytest.mark.parametrize(("module", "layer"), [("qlib_ext.pool.record", 0), ("qlib_ext.pool.manager", 3),
                                               ("qlib_ext.cli", TOP), ("qlib_ext.worker.body", 7)])
def test_layer_of(module, layer):
    assert layer_of(module) == layer


def test_the_command_line_and_the_api_do_not_import_each_other():
    # both are thin layers over the run session (qlib_ext.session); neither calls the other
    def part(module: str) -> str:
        return next((p for p in ("qlib_ext.cli", "qlib_ext.api") if module == p or module.startswith(p + ".")), "")

    edges = {(part(module_name(p)), part(m)) for p in PACKAGE.rglob("*.py") for _, m in imported(p)}
    assert ("qlib_ext.cli", "qlib_ext.api") not in edges and ("qlib_ext.api", "qlib_ext.cli") not in edges
