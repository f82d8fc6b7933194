"""Dropping root: bind the ports first, then become ``user`` from the config.

Started as root (needed for ports below 1024), postroom gives ownership of ``data_dir`` to
the configured user (modes 0700/0600, see :mod:`postroom.storage.local.files`) and switches
its uid/gid (and clears supplementary groups) before it serves a single connection, so the
network-facing code never runs as root. Without ``user``, or when not root, nothing changes.
"""

from __future__ import annotations

import os
import pwd

from postroom.config import Config
from postroom.errors import ConfigError
from postroom.storage.local import files


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


def preload(cfg: Config) -> None:
    """Before a drop: load now what is otherwise loaded on demand, in the middle of mail (the
    IDNA codecs and idna's tables, DNS record types, the public suffix list, postroom's own
    modules): the new user may not be able to read the Python installation's files (a pyenv
    under /root, say). Nothing when no drop follows."""
    if target_ids(cfg) is None:
        return
    import encodings.idna
    import encodings.punycode  # noqa: F401
    import importlib
    import pkgutil

    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    import postroom
    from postroom import address
    from postroom.auth import dmarc

    for module in pkgutil.walk_packages(postroom.__path__, "postroom."):
        if module.name == "postroom.__main__":
            continue  # it runs the command line
        if ".postgresql" not in module.name or cfg.storage.backend == "postgresql":
            importlib.import_module(module.name)
    for rdtype in ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "SOA", "NS"):
        kind = dns.rdatatype.from_text(rdtype)
        dns.rdata.get_rdata_class(dns.rdataclass.IN, kind)  # type: ignore[no-untyped-call]
    dmarc.organizational_domain("example.com")  # reads the list
    address.normalise_domain("bücher.example")  # idna's UTS #46 tables, read at first use


def secure_data_dir(cfg: Config) -> None:
    """For ``serve`` (once, by the primary worker, before it serves): the whole data tree
    belongs to the server's user (``user``, else whoever runs it) with modes 0700/0600, also
    in an install made by an older version or under a looser umask."""
    files.tighten(cfg.data_dir, target_ids(cfg))


def drop(cfg: Config) -> None:
    """For ``serve``: become ``user`` (after :func:`secure_data_dir`)."""
    pw = _lookup(cfg)
    if pw is None:
        return
    become(pw.pw_uid, pw.pw_gid)


def drop_for_cli(cfg: Config) -> None:
    """For the admin commands: become ``user`` too, so that what they create (accounts,
    mailboxes) belongs to the server's user. Only the top of the data tree (the account store
    among it) is re-owned and tightened to 0700/0600: the rest is ``serve``'s job at start."""
    files.make_data_dir(cfg.data_dir)
    pw = _lookup(cfg)
    files.tighten(cfg.data_dir, None if pw is None else (pw.pw_uid, pw.pw_gid), deep=False)
    if pw is not None:
        become(pw.pw_uid, pw.pw_gid)


def become(uid: int, gid: int) -> None:
    """Switch to ``uid``/``gid`` for good, with no supplementary groups (gid first: after
    setuid the process may no longer change it)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
