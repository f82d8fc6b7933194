"""TLS contexts for the servers and the delivery client, and the embedded self-signed pair.

Policy: TLS 1.2 and 1.3 only, the system's modern cipher list (RFC 8996, RFC 9325). The server
context is loaded from ``[tls] cert``/``key``; without them a self-signed certificate for
``hostname`` is made on first start under ``{data_dir}/tls/`` (cryptography) and reused after
(made again when ``hostname`` changes).
The pair is read as bytes (:func:`read_pair`: by root at start, by the privileged supervisor at
a reload, so a root-only ``privkey.pem`` works after the drop), checked (:func:`check_pair`:
errors name the file at fault) and loaded from memory (:func:`load_pair`) into a new context,
at a reload too: every listener, implicit TLS included, takes the new context at its next
handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import time
from pathlib import Path

from postroom.config import MAX_FILE, Config
from postroom.errors import ConfigError
from postroom.storage.local import files


def cert_paths(cfg: Config) -> tuple[Path, Path]:
    """The certificate and key files the servers use (the configured pair or the embedded one)."""
    if cfg.tls.cert is not None and cfg.tls.key is not None:
        return cfg.tls.cert, cfg.tls.key
    tls_dir = cfg.data_dir / "tls"
    return tls_dir / "cert.pem", tls_dir / "key.pem"


def ensure_self_signed(cfg: Config) -> None:
    """Make the embedded self-signed pair if no ``[tls]`` pair is configured and none exists
    for ``hostname`` (a changed hostname gets a new one)."""
    if cfg.tls.cert is not None:
        return
    cert, key = cert_paths(cfg)
    if key.exists() and _names_host(cert, cfg.hostname):
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cfg.hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(cfg.hostname)]
    if cfg.hostname == "localhost":  # (clients that connect by address check it too)
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(private, hashes.SHA256())
    )
    tmp_key = key.with_suffix(".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.replace(tmp_key, key)
    tmp_cert = cert.with_suffix(".tmp")
    tmp_cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert)


def _names_host(cert: Path, hostname: str) -> bool:
    """True if the PEM certificate ``cert`` can be read and names ``hostname``."""
    from cryptography import x509

    try:
        names = x509.load_pem_x509_certificate(
            files.read_regular(cert, limit=MAX_FILE)
        ).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    return hostname in names.value.get_values_for_type(x509.DNSName)


def read_pair(cfg: Config) -> tuple[bytes, bytes]:
    """The PEM certificate chain and key, read now (as root, before the drop, or by the
    privileged supervisor at a reload); ConfigError names the file that could not be read."""
    ensure_self_signed(cfg)
    out = []
    keys = ("cert", "key")  # the key at fault, named as the config file has it
    for key, what, path in zip(keys, ("certificate", "key"), cert_paths(cfg), strict=True):
        try:
            out.append(files.read_regular(path, limit=MAX_FILE))
            mode = path.stat().st_mode & 0o777
        except OSError as exc:
            raise ConfigError(
                f"{cfg.path or '<default>'}: tls.{key}: cannot read {what} {path}: {exc.strerror}"
            ) from None
        if what == "key" and mode & 0o077:  # (as OpenSSH refuses, and Postfix warns)
            logging.getLogger("postroom").warning(
                "%s: tls.key: %s may be read by others than its owner (mode %03o): chmod 600 it",
                cfg.path or "<default>",
                path,
                mode,
            )
    expiry = certificate_expiry(out[0])
    if 0 < expiry < time.time():  # served all the same: clients that check refuse it
        logging.getLogger("postroom").warning(
            "%s: tls.cert: %s expired on %s: renew it (clients that check it refuse TLS)",
            cfg.path or "<default>",
            cert_paths(cfg)[0],
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expiry)),
        )
    return out[0], out[1]


def check_pair(cfg: Config, cert_pem: bytes, key_pem: bytes) -> None:
    """ConfigError naming the file at fault unless ``cert_pem`` is a PEM chain and
    ``key_pem`` the private key of its first certificate (cryptography parses both, so the
    error says which one is wrong, not OpenSSL's NO_CERTIFICATE_ASSIGNED)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = cert_paths(cfg)
    where = f"{cfg.path or '<default>'}: tls."
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        theirs = chain[0].public_key().public_bytes(serialization.Encoding.DER, public)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{where}cert: {cert_path} is no PEM certificate chain: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        mine = key.public_key().public_bytes(serialization.Encoding.DER, public)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # a curve it cannot load, say
        raise ConfigError(
            f"{where}key: {key_path} is no unencrypted PEM private key: {exc}"
        ) from None
    if mine != theirs:
        raise ConfigError(f"{where}key: key {key_path} does not match certificate {cert_path}")


def load_pair(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Load the pair into a new ``ctx`` from memory (memfd files: the key never touches the
    disk again). Not into a context in use: OpenSSL keeps one pair per key type, and a pair
    of another type would be served beside the old one (a reload makes a new context)."""
    fds = []
    try:
        for data in (cert_pem, key_pem):
            fd = os.memfd_create("postroom-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


def server_context(cfg: Config, pair: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
    """The server-side context for STARTTLS, STLS and the implicit-TLS ports, with ``pair``
    (default: read from the configured files now)."""
    cert_pem, key_pem = pair if pair is not None else read_pair(cfg)
    check_pair(cfg, cert_pem, key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20")
    load_pair(ctx, cert_pem, key_pem)
    return ctx


def certificate_expiry(cert_pem: bytes) -> float:
    """When the first certificate of the chain ``cert_pem`` (the pair in force, not the file,
    which a reload that kept the old pair did not take) expires, as Unix time; 0 if it cannot
    be parsed."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return 0.0
    return cert.not_valid_after_utc.timestamp()


def _ssl_object(transport: object) -> ssl.SSLObject | None:
    get = getattr(transport, "get_extra_info", None)
    return get("ssl_object") if get is not None else None


def tls_version(transport: object) -> str | None:
    """``TLSv1.3`` and the like, for an asyncio transport over TLS (None otherwise)."""
    ssl_object = _ssl_object(transport)
    return ssl_object.version() if ssl_object is not None else None


def tls_session(transport: object) -> str | None:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384``: the version and cipher of an asyncio transport
    over TLS, as a delivery's log line gives them (None otherwise)."""
    ssl_object = _ssl_object(transport)
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0]}" if cipher else ssl_object.version()


def client_context(verify: bool) -> ssl.SSLContext:
    """The delivery client's context: opportunistic (no checks) unless ``verify``."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
