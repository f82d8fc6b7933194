"""The embedded self-signed pair named the first ``hostname`` for ever: after the admin set
the real name, the server kept presenting a certificate for the old one."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from postroom import tls
from postroom.config import from_dict


def _names(cert: Path) -> list[str]:
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return list(san.value.get_values_for_type(x509.DNSName))


def test_a_new_hostname_gets_a_new_self_signed_pair(tmp_path: Path) -> None:
    first = from_dict(
        {"hostname": "old.example", "domains": ["example"], "data_dir": str(tmp_path)}
    )
    tls.ensure_self_signed(first)
    cert, key = tls.cert_paths(first)
    assert _names(cert) == ["old.example"]
    kept = key.read_bytes()
    tls.ensure_self_signed(first)  # the same name: the pair is kept
    assert key.read_bytes() == kept

    second = from_dict(
        {"hostname": "mx.example", "domains": ["example"], "data_dir": str(tmp_path)}
    )
    tls.ensure_self_signed(second)
    assert _names(cert) == ["mx.example"]
    assert key.read_bytes() != kept
    tls.check_pair(second, cert.read_bytes(), key.read_bytes())  # a matching pair
    assert key.stat().st_mode & 0o777 == 0o600


def test_the_embedded_defaults_pair_names_both_loopback_addresses(tmp_path: Path) -> None:
    """Clients that connect to the embedded default by address check the certificate for
    it: 127.0.0.1 was named, ::1 not (curl pop3s://[::1]/ failed; ipv6 probe)."""
    import ipaddress

    cfg = from_dict({"hostname": "localhost", "domains": ["localhost"], "data_dir": str(tmp_path)})
    tls.ensure_self_signed(cfg)
    san = x509.load_pem_x509_certificate(
        tls.cert_paths(cfg)[0].read_bytes()
    ).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
