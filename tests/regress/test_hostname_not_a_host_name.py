"""``hostname`` was taken as written: an internationalised name (``mx.bücher.test``) made
``serve`` end in a traceback from the self-signed certificate (and would have put raw UTF-8 in
the SMTP banner and EHLO), and a name SMTP does not allow (``mx_1.a.test``, RFC 5321 §4.1.2
Domain) was used as it was. Now it is IDNA-encoded and lower-cased as ``domains`` are, and a
name that is none is a bad config naming ``hostname``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, first_line, run_cli


def test_international_hostname_is_idna_encoded(server_factory: ServerFactory) -> None:
    srv = server_factory(host="127.0.0.174", hostname="MX.Bücher.test", services=("smtp",))
    with socket.create_connection((srv.host, srv.ports["smtp"]), timeout=20) as sock:
        assert first_line(sock).startswith(b"220 mx.xn--bcher-kva.test ")


@pytest.mark.parametrize("name", ["mx_1.a.test", "mx..a.test", "-mx.a.test", "mx.a.test/x"])
def test_hostname_that_is_no_host_name_is_a_bad_config(tmp_path: Path, name: str) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'hostname = "{name}"\ndomains = ["a.test"]\ndata_dir = "{tmp_path / "d"}"\n')
    proc = run_cli("user", "list", config=cfg, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"postroom: error: {cfg}: hostname: ")
    assert len(proc.stderr.splitlines()) == 1
