"""Dropping root: bind the ports first, then become ``user`` from the config.

Started as root (needed for ports below 1024), postroom gives ownership of ``data_dir`` to
the configured user and switches its uid/gid (and clears supplementary groups) before it
serves a single connection, so the network-facing code never runs as root. Without ``user``,
or when not root, nothing changes.
"""

from __future__ import annotations

import os
import pwd

from postroom.config import Config
from postroom.errors import ConfigError


def _chown_tree(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _lookup(cfg: Config) -> pwd.struct_passwd | None:
    if cfg.user is None or os.getuid() != 0:
        return None
    try:
        return pwd.getpwnam(cfg.user)
    except KeyError:
        raise ConfigError(f"{cfg.path or '<default>'}: user: no such user {cfg.user!r}") from None


def target_ids(cfg: Config) -> tuple[int, int] | None:
    """The (uid, gid) that ``serve`` will become, or None if it keeps its own."""
    pw = _lookup(cfg)
    return None if pw is None else (pw.pw_uid, pw.pw_gid)


def drop(cfg: Config, chown: bool = True) -> None:
    """For ``serve``: give the whole data tree to ``user`` (once, by the primary worker), then
    become that user."""
    pw = _lookup(cfg)
    if pw is None:
        return
    if chown:
        _chown_tree(str(cfg.data_dir), pw.pw_uid, pw.pw_gid)
    become(pw.pw_uid, pw.pw_gid)


def drop_for_cli(cfg: Config) -> None:
    """For the admin commands: become ``user`` too, so that what they create (accounts,
    mailboxes) belongs to the server's user. Only the top of the data tree is re-owned."""
    pw = _lookup(cfg)
    if pw is None:
        return
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    os.chown(cfg.data_dir, pw.pw_uid, pw.pw_gid)
    for entry in os.scandir(cfg.data_dir):
        os.chown(entry.path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    become(pw.pw_uid, pw.pw_gid)


def become(uid: int, gid: int) -> None:
    """Switch to ``uid``/``gid`` for good, with no supplementary groups (gid first: after
    setuid the process may no longer change it)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
