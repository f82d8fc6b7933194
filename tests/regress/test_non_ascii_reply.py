"""A reply carried ``§`` (the 550 for a bare CR/LF): RFC 5321 §4.2 allows printable US-ASCII
in reply text only, and RFC 1939 §3 the same for POP3. Every reply constant, every string
literal the SMTP and POP3 code could send, and text made at run time stay within it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from postroom.pop3.engine import Pop3Engine
from postroom.pop3.engine import Pop3Features as PopFeatures
from postroom.wire import replies
from postroom.wire.replies import Reply

SRC = Path(__file__).resolve().parents[2] / "src" / "postroom"
# Everything that answers a client: the engines, their glue, and what they take text from.
REPLYING = [
    *sorted((SRC / "smtp").glob("*.py")),
    *sorted((SRC / "pop3").glob("*.py")),
    *sorted((SRC / "wire").glob("*.py")),
    SRC / "connection.py",
    SRC / "sasl_session.py",
    SRC / "services.py",
    SRC / "sasl.py",
    SRC / "throttle.py",
]
WIRE = re.compile(rb"^[\x20-\x7e]*\r\n$")


def wire_lines(data: bytes) -> list[bytes]:
    return [line + b"\r\n" for line in data.split(b"\r\n")[:-1]]


def all_constants() -> list[tuple[str, Reply]]:
    return [(n, v) for n, v in vars(replies).items() if isinstance(v, Reply)]


@pytest.mark.parametrize(("name", "reply"), all_constants(), ids=lambda v: str(v)[:20])
def test_every_reply_constant_is_printable_ascii(name: str, reply: Reply) -> None:
    for line in wire_lines(reply.render()):
        assert WIRE.match(line), (name, line)


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            out.add(id(first.value))
    return out


@pytest.mark.parametrize("path", REPLYING, ids=lambda p: p.name)
def test_no_literal_a_client_could_see_is_outside_ascii(path: Path) -> None:
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in docs:
            value = node.value
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if isinstance(value, str):
                # NUL, CR, LF and TAB are framing, never reply text.
                text = value.replace("\0", "").replace("\r", "").replace("\n", "")
                text = text.replace("\t", "")
                assert text.isascii() and text.isprintable(), (path.name, node.lineno, value)


def test_text_made_at_run_time_is_made_printable() -> None:
    reply = Reply(550, "5.1.1", ("caf\u00e9 \u00a7 bad\r\nRCPT TO:<x>",))
    (line,) = wire_lines(reply.render())
    assert WIRE.match(line), line
    assert line.startswith(b"550 5.1.1 caf? ? bad??RCPT")
    proto = Pop3Engine(PopFeatures(starttls=False, login_allowed=True))
    proto.close("na\u00efve \u00a7\r\n+OK fake")
    out = proto.data_to_send()
    assert out == b"-ERR na?ve ???+OK fake\r\n"
