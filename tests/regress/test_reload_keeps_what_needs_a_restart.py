"""Found by driving SIGHUP from outside. A reload said that a new ``data_dir`` "takes effect
only after a restart", yet made the self-signed pair under it and served that (or, when it
could not be made, the supervisor died with the whole server), and wrote DMARC records there;
a key of an algorithm cryptography cannot load killed the server at a reload; and a reload
that lowered the time-outs cut sessions opened before it ("open sessions go on untouched")."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from postroom import config as config_mod
from postroom import tls
from postroom.errors import ConfigError
from tests.conftest import ServerFactory, first_line
from tests.regress.test_certificate_reload import reload, served


def test_a_new_data_dir_waits_for_the_restart(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    srv = server_factory(services=("smtp", "submissions"))
    before = served(srv, "submissions")
    text = srv.config.read_text()
    for count, elsewhere in enumerate((tmp_path / "moved", Path("/proc/no/such/dir")), 1):
        srv.config.write_text(text.replace(f'"{srv.data_dir}"', f'"{elsewhere}"'))
        log = reload(srv, count)
        assert "data_dir changed; it takes effect only after a restart" in log
        assert not (tmp_path / "moved").exists()
        assert served(srv, "submissions") == before  # the running server's own pair
    srv.config.write_text(text)  # (for the CLI)
    srv.add_user("bob@a.test")
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:  # still serving
        c.sendmail("x@r.test", ["bob@a.test"], b"Subject: x\r\n\r\nx\r\n")
    assert len(srv.wait_messages("bob@a.test", 1)) == 1


def test_a_key_cryptography_cannot_load_is_a_config_error(tmp_path: Path) -> None:
    key = subprocess.run(
        ["openssl", "ecparam", "-name", "secp112r1", "-genkey", "-noout"],
        capture_output=True,
        check=False,
    )
    if key.returncode != 0:
        pytest.skip(f"this openssl makes no secp112r1 key: {key.stderr!r}")
    cfg = config_mod.from_dict(
        {"hostname": "mx.a.test", "domains": ["a.test"], "data_dir": str(tmp_path / "d")}
    )
    cert, _key = tls.read_pair(cfg)  # a valid certificate, then a key of an unloadable curve
    with pytest.raises(ConfigError, match="is no unencrypted PEM private key"):
        tls.check_pair(cfg, cert, key.stdout)


def test_open_sessions_keep_the_time_outs_they_started_with(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(services=("smtp",))
    with socket.create_connection((srv.host, srv.ports["smtp"]), timeout=20) as old:
        assert first_line(old).startswith(b"220 ")
        text = srv.config.read_text()
        srv.config.write_text(text + '\n[limits]\ncommand_timeout = "1s"\n')
        reload(srv, 1)
        time.sleep(2.5)  # past the new limit, far within the old one (5 minutes)
        old.sendall(b"NOOP\r\n")
        assert first_line(old).startswith(b"250 ")
        with socket.create_connection((srv.host, srv.ports["smtp"]), timeout=20) as new:
            assert first_line(new).startswith(b"220 ")
            assert first_line(new).startswith(b"421 ")  # the next session has the new one


def test_a_key_others_may_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A [tls] key of mode 0644 was loaded without a word (OpenSSH refuses such keys).
    data = tmp_path / "d"
    made = config_mod.from_dict(
        {"hostname": "mx.a.test", "domains": ["a.test"], "data_dir": str(data)}
    )
    tls.read_pair(made)  # the embedded pair, 0600: nothing said
    assert "chmod 600" not in caplog.text
    cert, key = tls.cert_paths(made)
    key.chmod(0o644)
    cfg = config_mod.from_dict(
        {
            "hostname": "mx.a.test",
            "domains": ["a.test"],
            "data_dir": str(data),
            "tls": {"cert": str(cert), "key": str(key)},
        }
    )
    tls.read_pair(cfg)
    assert f"tls.key: {key} may be read by others than its owner (mode 644)" in caplog.text
