"""Logging for the server: one line per event on stderr, text or JSON, written in batches.

Two kinds of entries share one buffer (so their order is kept): events from ``events.py``
(structured: a name and fields, rendered only when the batch is written) and ordinary
``logging`` records from the rest of the code. :func:`flush` writes what is buffered in few
writes (whole lines, up to ``PIPE_BUF`` each: see :func:`_chunks`): in a server, at most
:data:`FLUSH_DELAY` after the first line of a batch (see :func:`flush_from`), so that a
process killed at once (kill -9, the OOM killer) loses no more of its last moments than that;
warnings and errors go at once, and shutdown writes the rest.

``log_format = "text"`` writes ``TIME HOSTNAME postroom/COMPONENT[PID]: [warning: ]MESSAGE``,
the shape of Postfix's lines in a syslog file with RFC 3339 times (what pflogsumm reads), with
the queue id first where there is one.
``log_format = "json"`` writes one object per line with ``ts`` (ISO 8601 UTC), ``level`` and
``event`` first, then the event's fields (ordinary records: ``event = "log"`` and ``message``).
Start-up lines read ``TIME HOSTNAME postroom: ...`` in text. Control characters in values are
replaced in text lines, so that a value from the network cannot forge a line. Security: entries
carry what the code hands them; events.py never passes passwords, SASL payloads or messages.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import select
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TextIO

from postroom.config import Config

DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR
BATCH = 256
PIPE_BUF = select.PIPE_BUF  # octets a write to a pipe keeps whole (POSIX: at least 512)
FLUSH_DELAY = 0.1  # seconds a line may wait in a server's buffer (ten writes a second at most)
_LEVEL_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error", 50: "critical"}
FORMAT_VARIABLE = "POSTROOM_LOG_FORMAT"  # "FORMAT HOSTNAME", for helper processes

Fields = Mapping[str, object]
# A renderer gives the text of a line, or of several (a tuple; "@component text" lines are
# written as from that component).
Render = Callable[[Fields], str | tuple[str, ...]]


# One event waiting to be written: (time, level, event, component, fields, text renderer);
# component None is a start-up line ("postroom: ..."). A tuple: cheaper to make than an object.
Entry = tuple[float, int, str, str | None, Fields, Render]


class _State:
    level = INFO
    json = False
    host = "localhost"  # the config's hostname, as syslog puts it after the time
    stream: TextIO | None = None  # None: sys.stderr as it is when written
    loop: asyncio.AbstractEventLoop | None = None  # the loop that writes the batches
    loop_thread = 0
    armed = False  # a flush is due within FLUSH_DELAY


_state = _State()
_buffer: list[Entry | logging.LogRecord] = []
_lock = threading.Lock()
_stamp: tuple[int, str] = (-1, "")
# One encoder for every JSON line: json.dumps with options builds a new JSONEncoder per call, a
# quarter of what a line's JSON costs.
_json = json.JSONEncoder(ensure_ascii=False, default=str).encode
_ascii_json = json.JSONEncoder().encode  # ensure_ascii: "\u2028", surrogate pairs above U+FFFF


def _iso(ts: float) -> str:
    """``2025-01-02T03:04:05.678Z``; the part up to the second is made once per second."""
    global _stamp
    second = int(ts)
    if _stamp[0] != second:
        when = datetime.datetime.fromtimestamp(second, datetime.UTC)
        _stamp = (second, when.strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_stamp[1]}.{int((ts - second) * 1000):03d}Z"


def enabled(level: int) -> bool:
    return level >= _state.level


def emit(
    level: int,
    event: str,
    component: str | None,
    fields: Fields,
    text: Render,
    always: bool = False,
) -> None:
    """Buffer one event (cheap: its line is made when the batch is written); ``always``: even
    below ``log_level`` (the few start-up lines scripts wait for)."""
    if level < _state.level and not always:
        return
    _flush_later()
    _buffer.append((time.time(), level, event, component, fields, text))
    if level >= WARNING or len(_buffer) >= BATCH:
        flush()


class _Handler(logging.Handler):
    """Puts ordinary ``logging`` records in the same buffer as events."""

    def emit(self, record: logging.LogRecord) -> None:
        _flush_later()
        _buffer.append(record)
        if record.levelno >= WARNING or len(_buffer) >= BATCH:
            flush()


def flush_from(loop: asyncio.AbstractEventLoop | None) -> None:
    """Have ``loop`` (called from its thread; None: no more) write each batch at most
    :data:`FLUSH_DELAY` after its first line. A line from another thread waits for the next
    line from the loop's, or for the idle sweeper's flush once a second."""
    _state.loop = loop
    _state.loop_thread = threading.get_ident()
    _state.armed = False


def _flush_later() -> None:
    loop = _state.loop
    if _state.armed or loop is None or threading.get_ident() != _state.loop_thread:
        return
    if not loop.is_closed():
        _state.armed = True
        loop.call_later(FLUSH_DELAY, flush)


def _format_entry(entry: Entry, pid: int) -> str:
    when, level, event, component, fields, text = entry
    if _state.json:
        data: dict[str, object] = {
            "ts": _iso(when),
            "level": _LEVEL_NAMES.get(level, "info"),
            "event": event,
        }
        data.update(fields)
        return _json_line(data)
    message = text(fields)
    if not _printable(message):  # a value held a control character
        message = text({k: _clean(v) for k, v in fields.items()})
    ts = _iso(when)
    if component is None:
        return f"{ts} {_state.host} {message}"
    prefix = "" if level == INFO else f"{_LEVEL_NAMES.get(level, 'info')}: "
    if isinstance(message, str):
        return f"{ts} {_state.host} postroom/{component}[{pid}]: {prefix}{message}"
    lines = []
    for line in message:
        if line.startswith("@"):  # a further line from another component: "@qmgr text"
            component, _, line = line[1:].partition(" ")
        lines.append(f"{ts} {_state.host} postroom/{component}[{pid}]: {prefix}{line}")
    return "\n".join(lines)


def _printable(message: str | tuple[str, ...]) -> bool:
    if isinstance(message, str):
        return message.isprintable()
    return all(line.isprintable() for line in message)


_TAB = "\t"  # (an f-string of Python 3.11 may hold no backslash)


def printable(text: str, keep: str = "", mark: str = "?") -> str:
    """``text`` with ``mark`` for every character that is not printable, but those in
    ``keep``: control characters (CR and LF above all, but also C1 ones such as NEL and CSI,
    and the terminal's escapes), line and paragraph separators and format characters (bidi
    overrides) from the network would forge or hide log lines, or act on an admin's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else mark for c in text)


def _json_line(data: dict[str, object]) -> str:
    """One JSON line; the characters that are not printable inside its strings escaped, so
    that a reader splitting on U+2028 or NEL (JavaScript, ``str.splitlines``) or showing bidi
    overrides sees the line as it is (JSON escapes only the C0 controls)."""
    line = _json(data)
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else _ascii_json(c)[1:-1] for c in line)


def _clean(value: object) -> object:
    """:func:`printable` for each string of a log field's value."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _format_record(record: logging.LogRecord) -> str:
    message = record.getMessage()
    exc = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
    if _state.json:
        data: dict[str, object] = {
            "ts": _iso(record.created),
            "level": _LEVEL_NAMES.get(record.levelno, "info"),
            "event": "log",
            "logger": record.name,
            "message": message,
        }
        if exc:
            data["exc"] = exc
        return _json_line(data)
    prefix = "" if record.levelno == INFO else f"{_LEVEL_NAMES.get(record.levelno, 'info')}: "
    name = record.name.replace(".", "/")
    head = f"{_iso(record.created)} {_state.host} {name}[{record.process}]: {prefix}"
    # A traceback's lines each carry the head too (marked "| "), as syslog would have them:
    # a reader by line, or a grep for the pid, never meets a line without its origin.
    # The message and the traceback cleaned as events are (printable): one may quote what a
    # client, a remote host or DNS sent (an address, a reply, a record).
    lines = exc.rstrip("\n").split("\n") if exc else []
    tail = "".join(f"\n{head}| {printable(text, keep=_TAB)}" for text in lines)
    return head + printable(message, keep=_TAB) + tail


def flush() -> None:
    """Write what is buffered."""
    _state.armed = False
    with _lock:
        if not _buffer:
            return
        items = _buffer[:]
        del _buffer[: len(items)]
        pid = os.getpid()
        lines = []
        for item in items:
            try:
                if isinstance(item, tuple):
                    lines.append(_format_entry(item, pid))
                else:
                    lines.append(_format_record(item))
            except Exception as exc:  # a bad entry must not take the others with it
                lines.append(f"{_iso(time.time())} postroom: error: cannot log an entry: {exc}")
        stream = _state.stream or sys.stderr
        try:
            for chunk in _chunks(lines):
                stream.write(chunk)
                stream.flush()
        except (OSError, ValueError):
            pass  # stderr is gone (closed terminal): nowhere to log to


def _chunks(lines: list[str]) -> list[str]:
    """``lines`` joined into writes of whole lines, each at most ``PIPE_BUF`` octets (a line
    longer goes alone): POSIX keeps a write that size whole on a pipe, so that the lines of
    several workers sharing stderr (a pipe under systemd or Docker) never tear each other."""
    chunks: list[str] = []
    chunk: list[str] = []
    size = 0
    for line in "\n".join(lines).split("\n"):  # (a traceback's entry holds several lines)
        octets = len(line) + 1 if line.isascii() else len(line.encode("utf-8", "replace")) + 1
        if chunk and size + octets > PIPE_BUF:
            chunks.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(line + "\n")
        size += octets
    if chunk:
        chunks.append("".join(chunk))
    return chunks


class _CommandFormatter(logging.Formatter):
    """``postroom: warning: MESSAGE``, cleaned as server lines are (the message may quote DNS
    answers or replies from the network), a traceback's lines one by one."""

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVEL_NAMES.get(record.levelno, "warning")
        text = f"postroom: {level}: {printable(record.getMessage(), keep=_TAB)}"
        if record.exc_info:
            trace = self.formatException(record.exc_info).splitlines()
            text += "".join("\n" + printable(line, keep=_TAB) for line in trace)
        return text


class _CommandHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr of a command other than ``serve``."""


def setup_command() -> None:
    """Logging for the commands other than ``serve``: warnings and errors on stderr (the
    stderr of now: a caller may have replaced it), in place of logging's bare last resort."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, _CommandHandler):
            handler.setStream(sys.stderr)
            return
    handler = _CommandHandler(sys.stderr)
    handler.setLevel(WARNING)
    handler.setFormatter(_CommandFormatter())
    root.addHandler(handler)


def setup(cfg: Config, stream: TextIO | None = None) -> None:
    """Configure from ``log_level`` and ``log_format`` (also called again by a reload)."""
    # What a record costs (the logging HOWTO's "Optimization"): no caller frame lookup and no
    # thread names; the process id stays (it names the worker in every line).
    flush()  # what is buffered goes where and as it was meant to
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = False
    _state.level = getattr(logging, cfg.log_level.upper())
    _state.json = cfg.log_format == "json"
    _state.host = cfg.hostname
    # For the helper processes started from now on (the Maildir writer logs without the
    # config): the same shape of line (see journal.warn).
    os.environ[FORMAT_VARIABLE] = f"{cfg.log_format} {cfg.hostname}"
    _state.stream = stream
    root = logging.getLogger()
    if not any(isinstance(h, _Handler) for h in root.handlers):
        root.handlers[:] = [_Handler()]
    root.setLevel(_state.level)
