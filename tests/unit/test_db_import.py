"""db import's reading of a local data_dir (storage/postgresql/maintenance.py): the messages
and UIDLs the node's POP3 served, nothing that is no regular file."""

from __future__ import annotations

import os
from pathlib import Path

from postroom.blocking import BlockingPool
from postroom.storage.local.dovecot_import import UIDL_MAP
from postroom.storage.local.maildrop import MaildirMaildrop
from postroom.storage.postgresql import maintenance


def test_db_import_reads_what_pop3_served_and_only_files(tmp_path: Path) -> None:
    # It named each file by its own unique name (not the UIDL Dovecot gave, which import-
    # maildir kept: clients fetched everything again), gave two files of one name one UIDL
    # (the second was dropped as "there already"), copied a link's target (the TLS key) as a
    # message, hung on a FIFO and stopped at a directory.
    box = tmp_path / "data" / "mail" / "a.test" / "ann"
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "new" / "1700000001.M1.h").write_bytes(b"Subject: a\n\nA\n")
    (box / "cur" / "1700000001.M1.h:2,S").write_bytes(b"Subject: b\n\nB\n")  # one name, two
    (box / "new" / "1700000002.M2.h,S=14,W=16").write_bytes(b"Subject: c\n\nC\n")
    (box / UIDL_MAP).write_text("1700000002.M2.h\tdovecot-uidl-2\n")
    secret = tmp_path / "key.pem"
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    (box / "new" / "1700000003.link.h").symlink_to(secret)
    os.mkfifo(box / "new" / "1700000004.fifo.h")
    (box / "new" / "1700000005.dir.h").mkdir()
    sources = list(maintenance._mail_files(tmp_path / "data"))
    rows = [maintenance._message_row(*source) for source in sources]
    served = MaildirMaildrop(box, BlockingPool(1)).listing()
    assert sorted(row[1] for row in rows if row) == sorted(f.uid for f in served)
    assert len({row[1] for row in rows if row}) == 3 and "dovecot-uidl-2" in {
        r[1] for r in rows if r
    }
    assert all(b"PRIVATE KEY" not in row[4] for row in rows if row)
    assert {row[4] for row in rows if row} == {
        b"Subject: a\r\n\r\nA\r\n",
        b"Subject: b\r\n\r\nB\r\n",
        b"Subject: c\r\n\r\nC\r\n",
    }
