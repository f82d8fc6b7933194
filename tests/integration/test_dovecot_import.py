"""Issue 17: ``postroom import-maildir`` keeps the POP3 UIDLs a real Dovecot reported.

A private Dovecot (``dovecot -F -c``, as bench/benchlib/dovecot.py runs one) serves a Maildir
over POP3; its UIDL list is fetched, Dovecot is stopped, the Maildir is imported into postroom,
and postroom's UIDL list must be the same, message numbers included: a POP3 client that left
mail on the server downloads nothing twice. Once with Dovecot's default ``pop3_uidl_format``,
once with a different format and stored ``P`` values in ``dovecot-uidlist``.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerFactory, free_port, need_tool, wait_port

NOBODY = (65534, 65534)
MESSAGES = [
    # (subdirectory, Dovecot-style name, content)
    ("cur", "1700000001.M1P10.old,S=60,W=62:2,S", b"Subject: one\r\n\r\nfirst, seen, CRLF\r\n"),
    ("cur", "1700000002.M2P10.old:2,RS", b"Subject: two\n\nsecond, replied, LF\n.dot line\n"),
    ("new", "1700000003.M3P10.old", b"Subject: three\r\n\r\nthird, unseen\r\n"),
    ("new", "1700000004.M4P10.old", b"Subject: four\n\nfourth\n"),
]


def _conf(root: Path, port: int, uidl_format: str | None) -> str:
    """bench/benchlib/dovecot.py's configuration, without TLS, with our users file."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from benchlib import dovecot as bench_dovecot
    finally:
        sys.path.pop(0)
    extra = f"pop3_uidl_format = {uidl_format}" if uidl_format else ""
    return bench_dovecot.conf(root, "127.0.0.1", None, None, port, extra)


def make_maildir(box: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    for sub, name, data in MESSAGES:
        (box / sub / name).write_bytes(data)


@contextlib.contextmanager
def dovecot(root: Path, uidl_format: str | None = None) -> Iterator[int]:
    binary = need_tool("dovecot")
    if os.geteuid() != 0:
        pytest.skip("a private Dovecot needs root (it changes to the mail user)")
    for sub in ("run", "state"):
        (root / sub).mkdir(exist_ok=True)
    root.chmod(0o755)
    (root / "users").write_text("bob@a.test:{PLAIN}dovepw\n")
    (root / "mail").chmod(0o755)
    port = free_port()
    conf = root / "dovecot.conf"
    conf.write_text(_conf(root, port, uidl_format))
    for path in [root / "mail", *(root / "mail").rglob("*")]:
        os.chown(path, *NOBODY)
    proc = subprocess.Popen(
        [binary, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port("127.0.0.1", port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fetch(port: int, user: str, password: str) -> tuple[list[bytes], list[bytes]]:
    """The UIDL listing and every message (RETR), as a POP3 client sees them."""
    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        pop.user(user)
        pop.pass_(password)
        uidls = list(pop.uidl()[1])
        return uidls, [b"\n".join(pop.retr(i)[1]) for i in range(1, len(uidls) + 1)]
    finally:
        pop.quit()


@pytest.fixture
def dovecot_root() -> Iterator[Path]:
    """A tree Dovecot's unprivileged processes can reach (pytest's tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="postroom-dovecot-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("variant", ["default", "stored"])
def test_dovecot_uidls_survive_import(
    server_factory: ServerFactory, dovecot_root: Path, variant: str
) -> None:
    root = dovecot_root
    box = root / "mail" / "a.test" / "bob"
    make_maildir(box)
    fmt = None
    if variant == "stored":
        # A mailbox migrated to Dovecot earlier: UIDLs of the old server kept as P values
        # (one message has none and falls back to pop3_uidl_format).
        fmt = "%f"
        bases = [name.split(":2,")[0] for _s, name, _d in MESSAGES]
        lines = ["3 V1600000000 N5 G0123456789abcdef0123456789abcdef"]
        lines += [f"1 P{'UID1-OLD.server'} :{bases[0]}", f"2 :{bases[1]}"]
        lines += [f"3 P{'xx/yy:3'} :{bases[2]}", f"4 P{'000004x'} :{bases[3]}"]
        (box / "dovecot-uidlist").write_text("\n".join(lines) + "\n")
    with dovecot(root, fmt) as port:
        before, bodies = fetch(port, "bob@a.test", "dovepw")
    assert len(before) == len(MESSAGES)
    if variant == "default":  # %08Xu%08Xv: UID and UIDVALIDITY, 8 hex digits each
        assert all(len(line.split()[1]) == 16 for line in before)
    if variant == "stored":
        assert b"1 UID1-OLD.server" in before and b"3 xx/yy:3" in before
    assert (box / "dovecot-uidlist").exists()

    srv = server_factory(services=("pop3",), extra_toml="[auth]\nallow_plaintext = true\n")
    srv.add_user("bob@a.test", "newpw")
    args = ["import-maildir", "bob@a.test", str(box)]
    if fmt:
        args += ["--uidl-format", fmt]
    out = srv.cli(*args).stdout
    assert "4 messages imported" in out
    assert fetch(srv.ports["pop3"], "bob@a.test", "newpw") == (before, bodies)
    # Files look like postroom's own: LF line ends, ,S= and ,W= in the name, flags kept.
    files = sorted(p for p in srv.maildir("bob@a.test").glob("*/*") if p.parent.name != "tmp")
    assert all(b"\r\n" not in p.read_bytes() for p in files)
    assert all(",S=" in p.name and ",W=" in p.name for p in files)
    assert sum(p.name.endswith(":2,RS") for p in files) == 1
    # A second run copies nothing twice.
    assert "0 messages imported, 4 already there" in srv.cli(*args).stdout
    assert fetch(srv.ports["pop3"], "bob@a.test", "newpw")[0] == before


def test_import_refuses_unknown_user_and_non_maildir(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    srv = server_factory(services=("smtp",), start=False)
    srv.add_user("bob@a.test")
    proc = srv.cli("import-maildir", "nobody@a.test", str(tmp_path), check=False)
    assert proc.returncode == 1 and "no such user" in proc.stderr
    proc = srv.cli("import-maildir", "bob@a.test", str(tmp_path), check=False)
    assert proc.returncode == 1 and "not a Maildir" in proc.stderr
