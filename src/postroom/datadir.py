"""The data directory: checked before anything is written to it, and made (0700) if missing.

Every command, ``serve`` included, calls :func:`check` before it creates a single file, so that a
``data_dir`` nobody can use (a file in the way, a read-only file system, a directory the server's
user cannot reach or write) stops it with one line naming ``data_dir``, the reason and a fix
(exit 2), instead of a traceback from whichever process met it first and root-owned files left
behind. The process's own identity is checked with ``os.access`` (which sees ACLs and read-only
mounts); the user that a root process becomes (``user``) is checked in a short-lived child that
switches to that user first, exactly as the server and the Maildir writer will, since
``access(2)`` can only answer for the caller. :func:`create` then makes a missing directory and
says so, with its absolute path: the embedded default's ``./postroom-data`` depends on the
directory a command runs in, and a second, silent store is the surprise this prevents.
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
from collections.abc import Callable
from pathlib import Path

from postroom import privileges
from postroom.config import Config
from postroom.errors import ConfigError
from postroom.storage.local import files


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")  # pragma: no cover - "/" always exists


def _unreachable(path: Path, who: str) -> str | None:
    """Why ``who`` (this process) cannot get to ``path``: the first ancestor it cannot search."""
    for ancestor in reversed(path.parents):
        if not os.path.lexists(ancestor):
            return None  # made on the way, by us
        if not os.path.isdir(ancestor):
            return f"{ancestor} is a file, not a directory; set data_dir to a directory"
        if not os.access(ancestor, os.X_OK):
            return (
                f"{who} cannot reach {path}: {ancestor} is closed to {who}; choose a directory "
                f"{who} can reach (e.g. /var/lib/postroom) or open {ancestor} to {who}"
            )
    return None


def _unwritable(target: Path, who: str, *, creating: bool) -> str | None:
    """Why this process cannot create a directory in ``target``, or use ``target`` itself."""
    if os.access(target, os.W_OK | os.X_OK | (0 if creating else os.R_OK)):
        return None
    if os.statvfs(target).f_flag & os.ST_RDONLY:
        return f"{target} is on a read-only file system; choose a writable place for data_dir"
    st = os.stat(target)
    owner = _name(st.st_uid)
    state = f"owner {owner}, mode {stat.S_IMODE(st.st_mode):04o}"
    if creating:
        return (
            f"{who} cannot create a directory in {target} ({state}); create it as root and "
            f"chown it to {who}, or choose a directory {who} can write"
        )
    if owner == who:
        return f"{target} is not writable by its owner {who} ({state}); chmod u+rwx {target}"
    return (
        f"{target} is not writable by {who} ({state}); run postroom as {owner} "
        f"(sudo -u {owner} postroom ...), or chown -R {who} {target}"
    )


def _problem(path: Path, who: str, *, owner: bool) -> str | None:
    """What keeps this process from making or using ``path`` (None: nothing). ``owner``: it
    will use the files itself, so the first level of the tree must be its to use too (else it
    is root, which hands the tree to ``user``)."""
    problem = _unreachable(path, who)
    if problem is not None:
        return problem
    if not os.path.lexists(path):
        return _unwritable(_nearest_existing(path), who, creating=True)
    if not os.path.isdir(path):
        return f"{path} is a file, not a directory; move it away or set data_dir to a directory"
    problem = _unwritable(path, who, creating=False)
    if problem is not None:
        return problem
    if not owner:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o700 != 0o700:  # the user it is given to gets the owner's rights, no more
            return f"{path} has mode {mode:04o}, so its owner cannot write in it; chmod 700 {path}"
        return None
    with os.scandir(path) as entries:
        for entry in entries:
            mode = os.R_OK | os.W_OK | (os.X_OK if entry.is_dir(follow_symlinks=False) else 0)
            if not entry.is_symlink() and not os.access(entry.path, mode):
                holder = _name(entry.stat(follow_symlinks=False).st_uid)
                return (
                    f"{entry.path} belongs to {holder} and is not usable by {who}; run postroom "
                    f"as the user that owns the data, or chown -R {who} {path}"
                )
    return None


def as_user(uid: int, gid: int, ask: Callable[[], str | None]) -> str | None:
    """``ask()`` as ``uid``/``gid`` (no other groups, as the server runs): in a child that
    becomes them, since ``access(2)`` only answers for the caller."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child (its answer is what the tests check)
        answer = ""
        try:
            os.close(read_end)
            privileges.become(uid, gid)
            answer = ask() or ""
        except BaseException as exc:
            answer = f"cannot check as uid {uid}: {exc}"
        finally:
            os.write(write_end, answer.encode("utf-8", "replace"))
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode("utf-8", "replace")
    os.waitpid(pid, 0)
    return answer or None


def check(cfg: Config) -> None:
    """ConfigError (``FILE: data_dir: reason and fix``) unless every process that will use
    ``data_dir`` can. Creates nothing."""
    path = cfg.data_dir
    ids = privileges.target_ids(cfg)  # root with ``user``: it gives the tree to that user
    problem = _problem(path, _name(os.geteuid()), owner=ids is None)
    if problem is None and ids is not None and cfg.user is not None:
        # The tree itself is given to ``user`` (chown) before it is used: it must reach it.
        user = cfg.user
        problem = as_user(ids[0], ids[1], lambda: _unreachable(path, user))
    if problem is not None:
        raise ConfigError(f"{cfg.path or '<default>'}: data_dir: {problem}")


def create(cfg: Config) -> bool:
    """Make ``data_dir`` (0700) if it does not exist yet; True if it was made now."""
    if os.path.lexists(cfg.data_dir):
        return False
    try:
        files.make_data_dir(cfg.data_dir)
    except OSError as exc:  # what check() cannot foresee: /proc, /sys, a full disk
        raise ConfigError(
            f"{cfg.path or '<default>'}: data_dir: cannot create {cfg.data_dir}: "
            f"{exc.strerror or exc}; choose a directory on a writable file system"
        ) from None
    return True


def add_user_command(cfg: Config) -> str:
    """A ``user add`` command line that finds this ``data_dir`` from any directory. With a
    config file it runs in this directory too: a relative ``data_dir`` in the file is relative
    to the directory a command runs in."""
    address = f"you@{cfg.domains[0]}"
    if cfg.path is not None:
        config = shlex.quote(os.path.abspath(cfg.path))
        return f"cd {shlex.quote(os.getcwd())} && postroom -c {config} user add {address}"
    return f"cd {shlex.quote(str(cfg.data_dir.parent))} && postroom user add {address}"
