"""Each engine's transition table is the diagram in its module docstring, and nothing else.

The table (``TRANSITIONS``) is what the engine's methods consult; the diagram is what a reader
sees. A change to one without the other fails here (h11's ``_state.py`` is the model).
"""

from __future__ import annotations

import re
from types import ModuleType

import pytest

from postroom.errors import EngineMisuse
from postroom.pop3 import engine as pop3_engine
from postroom.smtp import client_engine, server_engine

ENGINES = [server_engine, client_engine, pop3_engine]
_EDGE = re.compile(r"^ {4}([A-Z_|]+) --([A-Z_]+)--> ([A-Z_]+)$", re.M)


def diagram(module: ModuleType) -> set[tuple[str, str, str]]:
    assert module.__doc__ is not None
    edges = set()
    for sources, trigger, target in _EDGE.findall(module.__doc__):
        for source in sources.split("|"):
            edge = (source, trigger, target)
            assert edge not in edges, f"{edge} drawn twice"
            edges.add(edge)
    return edges


def table(module: ModuleType) -> set[tuple[str, str, str]]:
    return {
        (str(source), str(trigger), str(target))
        for source, moves in module.TRANSITIONS.items()
        for trigger, target in moves.items()
    }


@pytest.mark.parametrize("module", ENGINES, ids=lambda m: m.__name__)
def test_table_is_the_docstring_diagram(module: ModuleType) -> None:
    drawn = diagram(module)
    assert drawn, "no diagram found"
    assert table(module) == drawn


@pytest.mark.parametrize("module", ENGINES, ids=lambda m: m.__name__)
def test_every_state_is_in_the_table_and_reachable(module: ModuleType) -> None:
    transitions = module.TRANSITIONS
    states = set(transitions)
    assert states == set(type(next(iter(transitions))))
    start = next(iter(transitions))
    seen, todo = {start}, [start]
    while todo:
        for target in transitions[todo.pop()].values():
            if target not in seen:
                seen.add(target)
                todo.append(target)
    assert seen == states
    triggers = {t for moves in transitions.values() for t in moves}
    assert triggers == set(type(next(iter(triggers))))


def test_no_state_is_assigned_outside_the_table() -> None:
    """Methods move only through ``_go`` (one assignment each, in the table lookup)."""
    for module in ENGINES:
        assert module.__file__ is not None
        with open(module.__file__, encoding="utf-8") as fh:
            source = fh.read()
        assignments = re.findall(r"self\.state = (.*)", source)
        assert all(a.startswith("TRANSITIONS[") or "GREETING" in a for a in assignments), (
            module.__name__,
            assignments,
        )


def test_a_move_the_table_lacks_is_a_misuse_error() -> None:
    smtp = server_engine.ServerEngine(server_engine.ServerFeatures("mx.test", 1000))
    with pytest.raises(EngineMisuse):
        smtp.tls_started(smtp.features)  # no STARTTLS was agreed
    with pytest.raises(EngineMisuse):
        smtp.auth_finish(server_engine.replies.AUTH_OK)  # no AUTH in progress
    pop3 = pop3_engine.Pop3Engine(pop3_engine.Pop3Features())
    with pytest.raises(EngineMisuse):
        pop3.bye()
    client = client_engine.ClientEngine("me.test")
    with pytest.raises(EngineMisuse):
        client.quit()  # before the greeting
