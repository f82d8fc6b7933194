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


def drop(cfg: Config) -> None:
    if cfg.user is None or os.getuid() != 0:
        return
    try:
        pw = pwd.getpwnam(cfg.user)
    except KeyError:
        raise ConfigError(f"{cfg.path or '<default>'}: user: no such user {cfg.user!r}") from None
    _chown_tree(str(cfg.data_dir), pw.pw_uid, pw.pw_gid)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
