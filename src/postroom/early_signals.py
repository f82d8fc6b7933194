"""Signals that come while ``serve`` starts, kept for the supervisor to act on.

By default SIGTERM and SIGHUP end a Python process, and SIGINT raises KeyboardInterrupt
wherever the start happens to be: a stop or a ``systemctl reload`` in the server's first half
second ended it by the signal, with no word (exit status 143), not as a stop (exit 0) or a
reload. Light on purpose: ``python -m postroom`` imports it before the server's modules.
"""

from __future__ import annotations

import signal

_HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_pending: set[int] = set()


def hold() -> None:
    """From the very start of ``serve``: each of these signals is kept, not acted on."""
    for sig in _HELD:
        signal.signal(sig, _keep)


def _keep(sig: int, _frame: object) -> None:
    _pending.add(sig)


def pending() -> frozenset[int]:
    """The signals that came since :func:`hold`."""
    return frozenset(_pending)
