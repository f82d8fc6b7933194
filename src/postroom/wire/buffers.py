"""The two byte buffers of a sans-I/O server engine: the input its line reader holds, and the
outbox of replies it has queued for the glue to send.

A mixin of the SMTP and POP3 server engines (``smtp/server_engine.py``, ``pop3/engine.py``),
which declare the two fields themselves (``_reader``, ``_out``) and append rendered replies to
``_out``. The glue reads the outbox with :meth:`Buffers.data_to_send` (joined) or
:meth:`Buffers.parts_to_send` (unjoined, for ``writelines``), and watches
:meth:`Buffers.pending_input` for flow control and for the empty-buffer check at the TLS
switch (RFC 3207 §4.2, RFC 2595 §4). These run once per reply: a mixin, so that the methods
are the engines' own and cost no extra call or allocation.
"""

from __future__ import annotations

from postroom.wire.framing import LineReader

# An outbox this full (replies, or one large part: a listing) is sent before more input is read.
OUTBOX_PARTS = 64
OUTBOX_LARGE = 16 << 10


class Buffers:
    """An engine's input buffer (``_reader``) and outbox (``_out``)."""

    _reader: LineReader
    _out: list[bytes]
    _flush_asked: bool  # FLUSH was returned for this outbox

    def outbox_full(self) -> bool:
        """Whether to return FLUSH before the next command: once per outbox that holds
        :data:`OUTBOX_PARTS` replies or ends in a part of :data:`OUTBOX_LARGE` octets."""
        out = self._out
        if self._flush_asked or not out:
            return False
        if len(out) >= OUTBOX_PARTS or len(out[-1]) >= OUTBOX_LARGE:
            self._flush_asked = True
            return True
        return False

    def pending_input(self) -> int:
        """Octets received and not yet read as commands or message data."""
        return self._reader.pending()

    def data_to_send(self) -> bytes:
        """Everything queued so far, joined; the outbox is then empty."""
        out = b"".join(self._out)
        self._out.clear()
        self._flush_asked = False
        return out

    def parts_to_send(self) -> list[bytes]:
        """:meth:`data_to_send` unjoined, for a writer that sends a list (``writelines``)."""
        out, self._out = self._out, []
        self._flush_asked = False
        return out
