"""The PostgreSQL password file is read before the privilege drop, and only when needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.storage.postgresql import db

URL = "postgresql://postroom@db.a.test:5433/mail"


def test_password_file_read_once_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text("other.test:*:*:*:wrong\ndb.a.test:5433:mail:postroom:s3cret\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setattr(db, "_PASSWORDS", {})
    db.remember_password(URL)
    passfile.unlink()  # as if unreadable after the drop: the password is kept
    assert db._PASSWORDS == {URL: "s3cret"}


def test_nothing_kept_when_the_url_or_environment_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "_PASSWORDS", {})
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "missing"))
    db.remember_password(URL)
    db.remember_password("postgresql://postroom:pw@db.a.test/mail")
    monkeypatch.setenv("PGPASSWORD", "from-env")
    db.remember_password(URL)
    assert db._PASSWORDS == {}
