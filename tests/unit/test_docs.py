"""The reference pages match the code: every config key is in docs/configuration.md (in the
section of its table), every command and option of the argparse parser is in docs/cli.md, and
the module list of docs/architecture.md is exactly the tree under ``src/postroom``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

from postroom import cli, config

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "postroom"


def _section(text: str, heading: str) -> str:
    """The text under the ``## heading`` line, up to the next ``## `` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _config_tables() -> dict[str, list[str]]:
    """Section heading of docs/configuration.md -> the keys it must list."""
    hints = typing.get_type_hints(config.Config)
    top: list[str] = []
    tables: dict[str, list[str]] = {"Top level": top}
    for f in dataclasses.fields(config.Config):
        if f.name == "path":  # where the file was found, not a key
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            tables[f"`[{f.name}]`"] = [g.name for g in dataclasses.fields(hint)]
        else:
            top.append(f.name)
    return tables


def test_every_config_key_is_documented_in_its_table() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = []
    for heading, keys in _config_tables().items():
        section = _section(text, heading)
        missing += [f"{heading} {key}" for key in keys if f"| `{key}` |" not in section]
    assert not missing, f"not in docs/configuration.md: {missing}"


def test_config_walk_sees_every_table() -> None:
    # The walk above would pass vacuously if it found no tables.
    assert {"`[listen]`", "`[storage]`", "`[auth]`", "`[limits]`"} <= set(_config_tables())
    assert "lease_time" in _config_tables()["`[storage]`"]


def _commands(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], list[str]]]:
    """Every leaf command as its words (``("queue", "show")``) with its options."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out = []
            for name, sub in action.choices.items():
                out += _commands(sub, (*words, name))
            return out
    options = [
        o
        for action in parser._actions
        for o in action.option_strings
        if o.startswith("--") and o not in ("--help", "--config")
    ]
    return [(words, options)]


def test_every_command_and_option_is_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    commands = _commands(cli._parser())
    assert len(commands) >= 15  # the walk found the nested actions
    missing = []
    for words, options in commands:
        line = next((ln for ln in text.splitlines() if f"`postroom {' '.join(words)}" in ln), None)
        if line is None:
            missing.append(" ".join(words))
            continue
        missing += [f"{' '.join(words)} {o}" for o in options if o not in text]
    assert not missing, f"not in docs/cli.md: {missing}"


def _listed_modules() -> set[str]:
    section = _section((DOCS / "architecture.md").read_text(), "Modules")
    names = re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE)
    return {f"{n}__init__.py" if n.endswith("/") else n for n in names}


def test_architecture_module_list_matches_the_tree() -> None:
    tree = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")}
    listed = _listed_modules()
    assert sorted(tree - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - tree) == [], "docs/architecture.md lists modules that do not exist"
