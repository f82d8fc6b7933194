"""``postroom_tls_certificate_expiry_timestamp_seconds`` was read from the certificate file,
not from the pair in force: a SIGHUP that kept the old pair (a renewed certificate whose key
was not yet in place) reported the new file's expiry while the old certificate went on being
served, so the expiry alert was silenced for the certificate clients actually get. Now the
metric is that of the pair loaded, at start and at every reload."""

from __future__ import annotations

import datetime
import os
import shutil
import ssl
import urllib.request
from pathlib import Path

import trustme

from postroom.metrics import parse
from tests.conftest import ServerFactory
from tests.regress.test_certificate_reload import reload, served, tls_table

SERVICES = ("submissions", "http")


def write_pair(directory: Path, days: int) -> tuple[bytes, float]:
    """A pair valid for ``days``; its leaf's DER and expiry (Unix time)."""
    expires = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(
        days=days
    )
    leaf = trustme.CA().issue_cert("mx.a.test", not_after=expires)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (directory / "privkey.pem").write_bytes(leaf.private_key_pem.bytes())
    os.chmod(directory / "privkey.pem", 0o600)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    return der, expires.timestamp()


def expiry_metric(host: str, port: int) -> float:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        samples = parse(resp.read().decode())
    return samples[("postroom_tls_certificate_expiry_timestamp_seconds", ())]


def test_expiry_metric_is_that_of_the_pair_served(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    live, renewed = tmp_path / "live", tmp_path / "renewed"
    old, old_expiry = write_pair(live, 20)
    srv = server_factory(services=SERVICES, extra_toml=tls_table(live))
    assert expiry_metric(srv.host, srv.ports["http"]) == old_expiry
    # The renewed certificate is in place, its key not yet: the reload keeps the old pair.
    write_pair(renewed, 90)
    shutil.copy(renewed / "fullchain.pem", live / "fullchain.pem")
    log = reload(srv, 1)
    assert "stay as they were" in log
    assert served(srv, "submissions") == old
    assert expiry_metric(srv.host, srv.ports["http"]) == old_expiry
    # The key follows: the next reload takes the new pair, and the metric with it.
    shutil.copy(renewed / "privkey.pem", live / "privkey.pem")
    reload(srv, 2)
    new_expiry = expiry_metric(srv.host, srv.ports["http"])
    assert new_expiry > old_expiry + 60 * 86400
    assert srv.stop() == 0
