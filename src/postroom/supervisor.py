"""The supervisor: the one process ``postroom serve`` leaves with its starting privileges.

It binds nothing and speaks to no client (network input never reaches it); it forks the
workers, restarts one that dies, and does what needs the privileges the workers dropped,
as Postfix's master and Dovecot's master do. At SIGHUP it reads the config file and the TLS
pair itself (a ``privkey.pem`` readable by root only, as certbot leaves it, keeps working
after the drop), checks them, and sends both to every worker over the worker's socketpair;
each worker loads the pair into its live TLS context (every listener, implicit TLS included,
uses it for the next handshake) and applies the new settings to new sessions; a worker started
again later is given them too (not those of the start). What cannot
change without new sockets or processes (``listen``, ``data_dir``, ``user``, ``workers``,
``pin_cpus``, ``storage``) is logged as needing a restart. A reload that fails keeps what runs:
a bad config keeps the old one whole; a certificate or key that cannot be read or does not match
keeps the old pair (the rest of the new config applies), and the log names the file.

Workers die with the supervisor (PR_SET_PDEATHSIG). A worker that dies before it was ever ready
stops the server (a start-up error: a bad config, PostgreSQL away at the first start). One that dies
after its slot has served is started again, at once the first time and then after a back-off that
doubles (1, 2, 4, 8 s: MAX_RESTARTS bounds it) while it keeps dying, also when the new one dies
before it is ready; more than :data:`MAX_RESTARTS` deaths of a slot within :data:`RESTART_WINDOW`
stop the server (a crash loop is the service manager's to see). A restarted worker on PostgreSQL
waits for an unreachable database rather than exit, so an outage costs one restart, and the node
heals by itself. SIGTERM/SIGINT go to every worker; the supervisor exits when they have, with the
primary's status.

Wire format of the socketpair: worker -> supervisor one byte, ``R`` (ready); supervisor ->
worker a 4-byte big-endian length and a pickle of ``(Config, (cert_pem, key_pem) | None)``
(only ever from the more privileged side to the less privileged one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import sqlite3
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from postroom import config as config_mod
from postroom import early_signals, logs, metrics, privileges
from postroom import tls as tls_mod
from postroom.config import Config
from postroom.errors import ConfigError, PostroomError
from postroom.storage.local import files

log = logging.getLogger("postroom")

RESTART_ONLY = ("listen", "data_dir", "user", "workers", "pin_cpus", "storage")
# Kept by each worker from its own start (configuration.md): the sender checks' DNS, the slots.
KEPT_BY_WORKERS = (
    ("dns", "nameservers"),
    ("dns", "timeout"),
    ("dns", "cache_size"),
    ("delivery", "max_concurrent"),
)
MAX_RESTARTS = 5  # per worker slot within RESTART_WINDOW; beyond, the server stops
RESTART_WINDOW = 60.0  # restarts of a slot within this long make the back-off grow
STOP_GRACE = 11.0  # workers exit within 10 s of SIGTERM; then SIGKILL
_LEN = struct.Struct(">I")
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
Pair = tuple[bytes, bytes]  # the PEM certificate chain and key
# (index, primary, channel to the supervisor, fd to wait on before serving or None, started
# again after its slot served, the config and TLS pair to serve with) -> status
WorkerMain = Callable[[int, bool, socket.socket, int | None, bool, Config, Pair], int]


@dataclass
class _Slot:
    index: int
    pid: int = 0
    channel: socket.socket | None = None
    ready: bool = False
    served: bool = False  # a worker of this slot was ready once: a later death is restarted
    due: float | None = None  # when (monotonic) to start the slot again
    restarts: list[float] = field(default_factory=list)


def backoff(restarts: int) -> float:
    """The wait before the ``restarts``-th restart of a slot within RESTART_WINDOW: none for
    the first, then 1, 2, 4... seconds (at most 8: a sixth death stops the server)."""
    return 0.0 if restarts <= 1 else 2.0 ** (restarts - 2)


class Supervisor:
    """Forks ``cfg.workers`` workers running ``main`` with ``pair`` and looks after them."""

    def __init__(
        self,
        cfg: Config,
        pair: Pair,
        main: WorkerMain,
        on_stop: Callable[[], None] | None = None,
        on_worker_gone: Callable[[int, int], None] | None = None,
    ) -> None:
        self.started_cfg = cfg  # what the listeners, the data lock and the slots were made for
        self.cfg = cfg  # the last config loaded (at start or SIGHUP)
        self.pair = pair  # the last pair loaded and checked
        self.main = main
        self.on_stop = on_stop  # called once, when the server begins to stop
        self.on_worker_gone = on_worker_gone  # called with the index and pid of a worker gone
        self.slots = [_Slot(i) for i in range(cfg.workers)]
        self.stopping = False
        self.status = 0
        self._flags: set[int] = set()
        self._wake_r, self._wake_w = os.pipe()

    # -- forking -------------------------------------------------------------------------------

    def _fork(self, slot: _Slot, go_r: int | None, keep: list[int]) -> None:
        mine, theirs = socket.socketpair()
        logs.flush()  # or the child would write the buffered lines a second time
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                mine.close()
                for fd in (self._wake_r, self._wake_w, *keep):
                    os.close(fd)
                for other in self.slots:
                    if other.channel is not None:
                        other.channel.close()
                signal.set_wakeup_fd(-1)
                for sig in _SIGNALS:
                    # SIGHUP ignored until the worker's loop takes it (a reload reaches it over
                    # its channel anyway): by default it would end the worker while it starts.
                    signal.signal(sig, signal.SIG_IGN if sig == signal.SIGHUP else signal.SIG_DFL)
                code = self.main(
                    slot.index, slot.index == 0, theirs, go_r, slot.served, *self._settings()
                )
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except (PostroomError, sqlite3.DatabaseError) as exc:
                # Data it cannot use (the account store damaged, say): one line, no traceback.
                what = "the account store: " if isinstance(exc, sqlite3.DatabaseError) else ""
                log.error("worker %d cannot start: %s%s", slot.index, what, exc)
            except BaseException:  # a child must never return into the supervisor's code
                log.exception("worker %d failed", slot.index)
            finally:
                logs.flush()
                os._exit(code)
        theirs.close()
        slot.pid, slot.channel, slot.ready = pid, mine, False
        log.info("worker %d started, pid %d", slot.index, pid)

    def _settings(self) -> tuple[Config, Pair]:
        """What a worker forked now serves with: what the running workers were last sent (a
        worker started again after a SIGHUP gets the reloaded pair and settings, not those of
        the start; the settings that need a restart stay as the listeners were made)."""
        return self.cfg, self.pair

    def start(self) -> None:
        for sig in _SIGNALS:
            signal.signal(sig, self._on_signal)
        self._flags |= early_signals.pending()  # what came while the server was starting
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        go_r, go_w = os.pipe()  # the primary releases the others once the queue is recovered
        for slot in self.slots:
            if slot.index == 0:
                self._fork(slot, go_w if len(self.slots) > 1 else None, [go_r])
            else:
                self._fork(slot, go_r, [go_w])
        os.close(go_r)
        os.close(go_w)

    def _on_signal(self, sig: int, _frame: object) -> None:
        self._flags.add(sig)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Until every worker has exited after a stop; returns the exit status."""
        self.start()
        deadline: float | None = None
        while any(s.pid or s.due is not None for s in self.slots):
            channels = {s.channel.fileno(): s for s in self.slots if s.channel is not None}
            wake = [t for t in (deadline, *(s.due for s in self.slots)) if t is not None]
            timeout = max(0.0, min([1.0, *(t - time.monotonic() for t in wake)]))
            try:
                readable, _w, _x = select.select([self._wake_r, *channels], [], [], timeout)
            except InterruptedError:
                readable = []
            for r in readable:
                if r == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                else:
                    self._from_worker(channels[r])
            flags, self._flags = self._flags, set()
            if flags & {signal.SIGTERM, signal.SIGINT} and not self.stopping:
                self.stop()
            if signal.SIGHUP in flags and not self.stopping:
                self.reload()
            self._reap()
            self._restart_due()
            if self.stopping and deadline is None:
                deadline = time.monotonic() + STOP_GRACE
            if deadline is not None and time.monotonic() > deadline:
                self._signal_all(signal.SIGKILL)
            logs.flush()
        return self.status

    def _from_worker(self, slot: _Slot) -> None:
        assert slot.channel is not None
        try:
            data = slot.channel.recv(64)
        except OSError:
            data = b""
        if b"R" in data and not slot.ready:
            slot.ready = slot.served = True
            log.info("worker %d ready", slot.index)
        if b"H" in data:  # a SIGHUP sent to the worker (which may not signal us: see ask)
            self._flags.add(signal.SIGHUP)
        if not data:  # the worker is gone (or going): reaped by _reap
            slot.channel.close()
            slot.channel = None

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass
                except PermissionError:  # (a sandbox without CAP_KILL: the workers are `user`)
                    log.error(
                        "cannot signal worker %d (pid %d, %s): this process lacks CAP_KILL",
                        slot.index,
                        slot.pid,
                        signal.Signals(sig).name,
                    )
                    raise

    def stop(self, status: int | None = None) -> None:
        if not self.stopping and self.on_stop is not None:
            self.on_stop()
        self.stopping = True
        for slot in self.slots:
            slot.due = None
        if status is not None and not self.status:
            self.status = status
        self._signal_all(signal.SIGTERM)

    def _reap(self) -> None:
        for slot in self.slots:
            if not slot.pid:
                continue
            try:
                pid, wait_status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:
                pid, wait_status = slot.pid, 0
            if pid == 0:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            slot.pid = 0
            metrics.forget_worker(self.cfg.data_dir, pid)
            if self.on_worker_gone is not None:
                self.on_worker_gone(slot.index, pid)
            if slot.channel is not None:
                slot.channel.close()
                slot.channel = None
            if self.stopping:
                if slot.index == 0 and code > 0 and not self.status:
                    self.status = code
                continue
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            if not slot.served:
                log.error("worker %d %s while starting: stopping", slot.index, how)
                self.stop(code if code > 0 else 1)
                continue
            if not slot.ready:
                how += " before it was ready"
            now = time.monotonic()
            slot.restarts = [t for t in slot.restarts if now - t < RESTART_WINDOW] + [now]
            if len(slot.restarts) > MAX_RESTARTS:
                log.error(
                    "worker %d %s, %d times within a minute: stopping",
                    slot.index,
                    how,
                    len(slot.restarts),
                )
                self.stop(1)
                continue
            delay = backoff(len(slot.restarts))
            slot.due = now + delay
            if delay:
                log.error(
                    "worker %d (pid %d) %s, %d times within a minute: starting it again in %d s",
                    slot.index,
                    pid,
                    how,
                    len(slot.restarts),
                    delay,
                )
            else:
                log.warning("worker %d (pid %d) %s: starting it again", slot.index, pid, how)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.due is not None and slot.due <= now:  # stop() cleared every due
                slot.due = None
                self._fork(slot, None, [])

    # -- SIGHUP --------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read and check the config and the TLS pair (with this process's privileges), then
        hand them to every worker."""
        cfg = self.cfg
        try:
            new = config_mod.load(cfg.path) if cfg.path is not None else cfg
        except ConfigError as exc:
            log.error("reload failed, the running configuration stays: %s", exc)
            return
        for doubt in config_mod.doubts(new):
            log.warning("reload: %s", doubt)
        for key in RESTART_ONLY:  # against what runs, not the last reload
            if getattr(new, key) != getattr(self.started_cfg, key):
                log.warning("reload: %s changed; it takes effect only after a restart", key)
        for table, key in KEPT_BY_WORKERS:
            if getattr(getattr(new, table), key) != getattr(getattr(self.started_cfg, table), key):
                where = "the sender checks" if table == "dns" else "the delivery slots"
                log.warning(
                    "reload: %s.%s changed; for %s it takes effect only after a restart",
                    table,
                    key,
                    where,
                )
        # ...and ignored until then: the TLS pair made under data_dir, the DMARC records, the
        # metrics of a worker that dies all stay where the running server keeps them.
        new = replace(new, **{key: getattr(self.started_cfg, key) for key in RESTART_ONLY})
        pair: tuple[bytes, bytes] | None
        try:
            pair = tls_mod.read_pair(new)  # (a changed hostname: a new self-signed pair)
            tls_mod.check_pair(new, *pair)
            if new.tls.cert is None:  # made by this process, maybe as root: the user's
                files.tighten(tls_mod.cert_paths(new)[0].parent, privileges.target_ids(new))
        except (ConfigError, OSError) as exc:  # (a self-signed pair that cannot be made)
            pair = None
            log.error("reload: the TLS certificate and key stay as they were: %s", exc)
        self.cfg = new
        logs.setup(new)  # log_format, log_level: this process's lines too
        if pair is not None:
            self.pair = pair
        message = pickle.dumps((new, pair))
        for slot in self.slots:
            if slot.channel is None:
                continue
            try:
                slot.channel.settimeout(5)
                slot.channel.sendall(_LEN.pack(len(message)) + message)
            except OSError as exc:
                log.error("reload: worker %d did not take the new settings: %s", slot.index, exc)
        what = "configuration" if pair is None else "configuration and TLS pair"
        log.info("reload: %s sent to the workers", what)


def read_message(channel: socket.socket) -> tuple[Config, tuple[bytes, bytes] | None] | None:
    """For a worker: one message from the supervisor (blocking, it is sent whole); None when
    the supervisor is gone."""
    channel.settimeout(5)
    head = _recv_exactly(channel, _LEN.size)
    if head is None:
        return None
    body = _recv_exactly(channel, _LEN.unpack(head)[0])
    if body is None:
        return None
    # Only ever from the supervisor, which has at least the worker's privileges.
    cfg, pair = pickle.loads(body)  # noqa: S301
    return cfg, pair


def _recv_exactly(channel: socket.socket, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        chunk = channel.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def ready(channel: socket.socket) -> None:
    """For a worker: tell the supervisor it serves."""
    with contextlib.suppress(OSError):
        channel.sendall(b"R")


def ask_reload(channel: socket.socket) -> None:
    """For a worker that got a SIGHUP: ask the supervisor to reload. Over the channel, not
    by a signal: a worker that dropped root may not signal a supervisor that kept it."""
    with contextlib.suppress(OSError):
        channel.sendall(b"H")
