"""A TLS 1.0 or 1.1 client got a bare close (RFC 8996 deprecates them; asyncio and uvloop drop
the alert OpenSSL queues when a handshake fails), so scanners and old clients reported a
network error. Every TLS entry (465 and 995 implicit, STARTTLS on 25/587, STLS on 110) now
answers with a fatal ``protocol_version`` alert; TLS 1.2 and 1.3 work as before."""

from __future__ import annotations

import socket
import ssl
import subprocess
import warnings

import pytest

from tests.conftest import Server, need_tool

SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s")


def client(high: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = high
    return ctx


def plain_upgrade(sock: socket.socket, service: str) -> None:
    """Read the greeting and ask for TLS, as the client of ``service`` does."""
    f = sock.makefile("rb")
    f.readline()
    if service == "pop3":
        sock.sendall(b"STLS\r\n")
        assert f.readline().startswith(b"+OK")
        return
    sock.sendall(b"EHLO c\r\n")
    while f.readline()[3:4] != b" ":
        pass
    sock.sendall(b"STARTTLS\r\n")
    assert f.readline().startswith(b"220")


def handshake(srv: Server, service: str, high: ssl.TLSVersion) -> str:
    sock = socket.create_connection((srv.host, srv.ports[service]), timeout=10)
    try:
        if service in ("smtp", "submission", "pop3"):
            plain_upgrade(sock, service)
        try:
            tls = client(high).wrap_socket(sock)
        except ssl.SSLError as exc:
            return exc.reason or str(exc)
        except (ConnectionError, OSError) as exc:
            return f"closed: {exc}"
        version = tls.version() or ""
        tls.close()
        return version
    finally:
        sock.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Server:
    from tests.conftest import free_port

    base = tmp_path_factory.mktemp("oldtls")
    ports = {s: free_port() for s in SERVICES}
    listen = "\n".join(f'{s} = ["127.0.0.1:{p}"]' for s, p in ports.items())
    cfg = base / "p.toml"
    cfg.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{base}/data"\n'
        f"[listen]\n{listen}\n"
    )
    server = Server(cfg, base / "data", "127.0.0.1", ports, ["a.test"], log=base / "log")
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_versions_get_protocol_version_alert(
    srv: Server, service: str, version: ssl.TLSVersion
) -> None:
    assert handshake(srv, service, version) == "TLSV1_ALERT_PROTOCOL_VERSION"


@pytest.mark.parametrize("service", SERVICES)
def test_current_versions_still_work(srv: Server, service: str) -> None:
    assert handshake(srv, service, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert handshake(srv, service, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_openssl_s_client_sees_alert_70(srv: Server) -> None:
    openssl = need_tool("openssl")
    for service, extra in (("submissions", []), ("pop3s", []), ("smtp", ["-starttls", "smtp"])):
        out = subprocess.run(
            [
                openssl,
                "s_client",
                "-connect",
                f"127.0.0.1:{srv.ports[service]}",
                "-tls1",
                "-cipher",
                "DEFAULT@SECLEVEL=0",
                *extra,
            ],
            input="",
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert "alert number 70" in out.stdout + out.stderr, (service, out.stderr)
