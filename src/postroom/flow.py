"""Read/write flow control shared by the SMTP and POP3 connection glue.

Both glues own a transport and an engine with an output buffer; the rules for pausing the
peer's input and flushing replies are the same, so they live here once.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class _Engine(Protocol):
    def data_to_send(self) -> bytes: ...


class FlowControl:
    """Mixin: ``transport``, ``proto`` and the ``_lost``/``_read_paused`` flags of a connection."""

    transport: asyncio.Transport | None
    _lost: bool
    _read_paused: bool
    sent = 0  # octets written (for the metrics, reported when the connection ends)

    def _engine(self) -> _Engine | None:
        raise NotImplementedError

    def _pause_reading(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.pause_reading()
            self._read_paused = True

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self._lost:
            self._read_paused = False
            self.transport.resume_reading()

    def _flush(self) -> None:
        """Write what the engine has queued (all replies of one batch in one write)."""
        engine = self._engine()
        if engine is not None and self.transport is not None and not self._lost:
            out = engine.data_to_send()
            if out:
                self.sent += len(out)
                self.transport.write(out)
