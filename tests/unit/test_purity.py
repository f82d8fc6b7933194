"""The import graph of ``src/``: the sans-I/O modules stay pure, and nothing imports in a circle.

Pure modules (the engines, the command parser, ``wire/``, ``sasl.py``, ``queue/schedule.py``,
``delivery/dsn.py``) import no asyncio, socket, os, ssl, subprocess or selectors, and nothing
of ``postroom.storage``, directly or through the postroom modules they import: they can be
tested, and reasoned about, without any I/O. The whole graph (imports under ``TYPE_CHECKING``
included) has no cycle, so every module can be read, and loaded, after what it needs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PURE = [
    "postroom.smtp.server_engine",
    "postroom.smtp.client_engine",
    "postroom.smtp.commands",
    "postroom.pop3.engine",
    "postroom.sasl",
    "postroom.passwords",
    "postroom.queue.schedule",
    "postroom.delivery.dsn",
    "postroom.delivery.mime_downgrade",
    *(
        f"postroom.wire.{p.stem}"
        for p in sorted((SRC / "postroom" / "wire").glob("*.py"))
        if p.stem != "__init__"
    ),
]
FORBIDDEN = {"asyncio", "socket", "os", "ssl", "subprocess", "selectors"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "postroom").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str, *, type_checking: bool) -> tuple[set[str], set[str]]:
    """(postroom modules, other top-level modules) that module ``name`` imports."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    skip: set[int] = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    ours: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{name}: relative import"
            targets = [node.module]
            targets += [f"{node.module}.{a.name}" for a in node.names]
        for target in targets:
            if target.split(".")[0] != "postroom":
                others.add(target.split(".")[0])
            elif target in MODULES:
                ours.add(target)
    return ours - {name}, others


def test_the_graph_is_built_from_every_module() -> None:
    assert "postroom.smtp.server_engine" in MODULES and len(MODULES) > 30
    ours, _ = imports("postroom.app", type_checking=True)
    assert "postroom.services" in ours


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io_even_indirectly(module: str) -> None:
    seen, todo = {module}, [module]
    bad: list[str] = []
    while todo:
        current = todo.pop()
        ours, others = imports(current, type_checking=False)
        bad += [f"{current} imports {o}" for o in sorted(others & FORBIDDEN)]
        bad += [f"{current} imports {o}" for o in sorted(ours) if o.startswith("postroom.storage")]
        for dep in ours - seen:
            seen.add(dep)
            todo.append(dep)
    assert not bad, bad


def test_no_import_cycle() -> None:
    graph = {m: imports(m, type_checking=True)[0] for m in MODULES}
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        if node in on_path:
            cycle = [*path[path.index(node) :], node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        on_path.add(node)
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        on_path.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module)
