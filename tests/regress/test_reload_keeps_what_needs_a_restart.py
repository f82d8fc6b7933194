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


def test_a_reload_says_which_values_the_workers_keep(server_factory: ServerFactory) -> None:
    """A probe: changing ``[dns] cache_size`` or ``[delivery] max_concurrent`` logged
    nothing, though running workers keep them (configuration.md)."""
    srv = server_factory(services=("smtp",))
    text = srv.config.read_text()
    srv.config.write_text(text + "\n[dns]\ncache_size = 5\n\n[delivery]\nmax_concurrent = 3\n")
    log = reload(srv, 1)
    assert "dns.cache_size changed; for the sender checks it takes effect only after" in log
    assert "delivery.max_concurrent changed; for the delivery slots it takes effect" in log
    assert "dns.timeout changed" not in log


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


def test_an_expired_certificate_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe: an expired [tls] pair was served at start and at a reload without a word
    (only the expiry metric showed it)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.a.test")])
    ended = datetime.datetime(2020, 2, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(ended - datetime.timedelta(days=90))
        .not_valid_after(ended)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cfg = config_mod.from_dict(
        {
            "hostname": "mx.a.test",
            "domains": ["a.test"],
            "data_dir": str(tmp_path / "d"),
            "tls": {"cert": str(cert_path), "key": str(key_path)},
        }
    )
    tls.check_pair(cfg, *tls.read_pair(cfg))  # still served: a warning, not an error
    assert f"tls.cert: {cert_path} expired on 2020-02-01 00:00:00 UTC" in caplog.text
