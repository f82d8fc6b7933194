"""One self-signed certificate (ECDSA P-256, made with ``openssl`` at run time) for every server.

All servers present the same key type, so TLS handshake cost is equal across them.
"""

from __future__ import annotations

from pathlib import Path

from benchlib.proc import run


def make_cert(directory: Path, common_name: str = "bench.test") -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` (world-readable, for the unprivileged daemons)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={common_name}",
            "-addext",
            f"subjectAltName=DNS:{common_name},DNS:*.{common_name},IP:127.0.0.1",
        ]
    )
    cert.chmod(0o644)
    key.chmod(0o644)
    return cert, key
