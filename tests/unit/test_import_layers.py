"""The modules of trtpipe import each other in layers, with no circle.

Lazy imports inside functions count too: a circle hidden in a function still means two modules
that cannot be read (or moved) one without the other. Package ``__init__`` files are left out:
importing a submodule runs its package's ``__init__`` anyway.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "trtpipe"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The trtpipe modules (not packages) ``path`` imports anywhere in its body."""
    package = module_name(path).rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) - {module_name(p)} for p in files}


def test_the_graph_is_read():
    graph = import_graph()
    # A known downward arrow, so an empty graph (a parsing slip) cannot pass as "no circle".
    assert "trtpipe.server.protocol" in graph["trtpipe.server.shared_memory"]
    assert "trtpipe.server.grpc_codec" in graph["trtpipe.server.generation_v2"]
    assert sum(len(targets) for targets in graph.values()) > 100


def test_no_import_circle():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle: {' -> '.join(exc.args[1])}")


def test_a_circle_is_caught(tmp_path, monkeypatch):
    """The check itself: two modules that import each other (one lazily) are a circle."""
    package = tmp_path / "trtpipe"
    package.mkdir()
    (package / "a.py").write_text("from trtpipe import b\n")
    (package / "b.py").write_text("def f():\n    from trtpipe.a import x\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
