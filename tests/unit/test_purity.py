"""The sans-I/O modules import no asyncio, socket or os (DESIGN.md): they can be tested, and
reasoned about, without any I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "postroom"
PURE = [
    "smtp/server_engine.py",
    "smtp/client_engine.py",
    "smtp/commands.py",
    "wire/framing.py",
    "wire/replies.py",
    "pop3/engine.py",
    "sasl.py",
    "passwords.py",
    "clienthello.py",
    "queue/schedule.py",
    "delivery/dsn.py",
    "delivery/advice.py",
    "delivery/mime_downgrade.py",
]
FORBIDDEN = {"asyncio", "socket", "os", "ssl", "subprocess", "selectors"}


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    tree = ast.parse((SRC / module).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, imported & FORBIDDEN
