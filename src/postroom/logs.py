"""Logging for the server: one line per event on stderr, written in batches.

Set up once per process by :func:`setup`; :func:`flush` writes what is buffered (the idle
sweeper calls it once a second, shutdown at the end).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys

from postroom.config import Config


class _BatchedStderr(logging.handlers.MemoryHandler):
    """Buffers records and writes each batch to stderr in one ``write``.

    MemoryHandler alone hands its buffer to a StreamHandler record by record, and that
    flushes the stream after each: one system call per log line after all.
    """

    def flush(self) -> None:
        self.acquire()  # held while writing too, so that batches keep their order
        try:
            if self.buffer:
                sys.stderr.write("".join(self.format(r) + "\n" for r in self.buffer))
                self.buffer.clear()
                sys.stderr.flush()
        except (OSError, ValueError):
            self.buffer.clear()  # stderr is gone (closed terminal): nowhere to log to
        finally:
            self.release()


def setup(cfg: Config) -> None:
    """Log lines go to stderr in batches (one write per 256 lines or per second, at once for
    warnings and errors): a write per accepted message would cost a system call each."""
    # What a record costs (the logging HOWTO's "Optimization"): no caller frame lookup and no
    # thread names; the process id stays (it names the worker in every line).
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = False
    buffered = _BatchedStderr(256, flushLevel=logging.WARNING)
    buffered.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [buffered]
    root.setLevel(getattr(logging, cfg.log_level.upper()))


def flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
