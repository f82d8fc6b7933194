"""Sender authentication for the Postfix peer: OpenDKIM, OpenDMARC and policyd-spf, private.

The usual Debian stack: OpenDKIM (signs for the peer's domain, verifies everything else) and
OpenDMARC as milters of the Postfix instance (``benchlib.postfix``), and policyd-spf
(postfix-policyd-spf-python) as its policy service, spawned by Postfix's master. Each daemon
gets its own config file, pid file and socket under the tree; nothing of /etc/opendkim*,
/etc/opendmarc* or /etc/postfix-policyd-spf-python is read.

DNS: OpenDMARC and policyd-spf ask the C library's resolver (``/etc/resolv.conf``, port 53) and
have no setting for another server; Debian's OpenDKIM resolves with libunbound, which recurses
from the root servers unless ``Nameservers`` names a forwarder (port 53 again). So the loopback
DNS server listens on port 53 of an address of its own, OpenDKIM is pointed at it with
``Nameservers``, and every daemon of the stack (and Postfix, whose smtpd and spawned policyd-spf
inherit it) runs in a private mount namespace (``unshare --mount``) where ``/etc/resolv.conf``
is a bind mount of the tree's own file naming that server. Unbound answers NXDOMAIN itself for
the special-use ``test.`` names (RFC 6761), so the domains whose keys OpenDKIM looks up must be
elsewhere (``.example``). Telling it otherwise (``ResolverConfiguration`` with ``local-zone:
"test." nodefault``) made OpenDKIM 2.11 die under concurrent load ("fatal flex scanner internal
error"). The machine's ``/etc/resolv.conf`` is never changed; the namespace ends with the last
process in it. Needs root (CAP_SYS_ADMIN), as Postfix does here.

Keys: :func:`make_key` makes an RSA-2048 or Ed25519 key, returning the PEM and the TXT
value to publish; OpenDKIM wants its key files owned by its user and not readable by others.
"""

from __future__ import annotations

import base64
import os
import pwd
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from benchlib.proc import BenchError, Cleanup, start_daemon, wait_port

OPENDKIM_PORT = 8891
OPENDMARC_PORT = 8893
PSL = Path("/usr/share/publicsuffix/public_suffix_list.dat")


def private_resolv_conf(cmd: Sequence[str], resolv_conf: Path) -> list[str]:
    """``cmd`` run in a private mount namespace whose /etc/resolv.conf is ``resolv_conf``."""
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    unshare = ["unshare", "--mount", "--propagation", "private"]
    return [*unshare, "sh", "-c", script, str(resolv_conf), *cmd]


def write_resolv_conf(path: Path, nameserver: str) -> Path:
    """A resolv.conf naming only ``nameserver`` (port 53), one try, short time-out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"nameserver {nameserver}\noptions timeout:2 attempts:1\n")
    path.chmod(0o644)
    return path


def nameserver_of(resolv_conf: Path) -> str:
    """The first ``nameserver`` of a resolv.conf."""
    for line in resolv_conf.read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            return words[1]
    raise BenchError(f"no nameserver in {resolv_conf}")


def unshare_problem() -> str | None:
    """Why daemons cannot get a private resolv.conf here (None: they can)."""
    probe = Path("/etc/resolv.conf")
    if not probe.exists():
        return "/etc/resolv.conf does not exist (nothing to bind-mount over)"
    try:
        proc = subprocess.run(
            [*private_resolv_conf(["true"], probe)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if proc.returncode != 0:
        return f"unshare --mount failed ({proc.returncode}): {proc.stderr.strip()[:300]}"
    return None


@dataclass(frozen=True)
class SigningKey:
    """A DKIM key for OpenDKIM (``pem``) and its record (``txt`` at SELECTOR._domainkey)."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    pem: bytes
    txt: str

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def make_key(domain: str, selector: str, algorithm: str = "rsa") -> SigningKey:
    """A fresh RSA-2048 or Ed25519 key and its DKIM TXT record (RFC 6376 §3.6.1, RFC 8463)."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    txt = f"v=DKIM1; k={algorithm}; p={base64.b64encode(public).decode()}"
    return SigningKey(domain, selector, algorithm, pem, txt)


def signed_message(path: Path, key: SigningKey, sender: str, rcpt: str, size: int) -> Path:
    """A message from ``sender`` to ``rcpt`` of about ``size`` octets, DKIM-signed with ``key``
    (relaxed/relaxed, the usual header fields), written with LF line ends for smtp-source
    ``-F`` (which sends each line with CRLF)."""
    head = (
        f"From: Sender <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <bench.1@{key.domain}>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    signature_size = 560  # an RSA-2048 DKIM-Signature field with this h= list, about
    body = line * max(1, (size - len(head) - signature_size) // len(line))
    message = head + body
    signature = dkim.sign(
        message,
        key.selector.encode(),
        key.domain.encode(),
        key.pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[
            b"from",
            b"to",
            b"subject",
            b"date",
            b"message-id",
            b"mime-version",
            b"content-type",
        ],
    )
    path.write_bytes((signature + message).replace(b"\r\n", b"\n"))
    return path


def _owned_dir(path: Path, user: str) -> pwd.struct_passwd:
    entry = pwd.getpwnam(user)
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o750)
    return entry


def _hosts_file(path: Path, hosts: Sequence[str]) -> Path:
    path.write_text("".join(f"{h}\n" for h in hosts))
    path.chmod(0o644)
    return path


def start_opendkim(
    root: Path,
    host: str,
    authserv_id: str,
    keys: Sequence[SigningKey],
    internal_hosts: Sequence[str],
    resolv_conf: Path,
    cleanup: Cleanup,
) -> str:
    """OpenDKIM on ``host:OPENDKIM_PORT``: signs (relaxed/relaxed, RSA) mail from
    ``internal_hosts`` whose From: domain has a key in ``keys``, verifies all other mail and
    adds its Authentication-Results. Returns the milter address for Postfix."""
    user = _owned_dir(root, "opendkim")
    key_table: list[str] = []
    signing_table: list[str] = []
    for key in keys:
        path = root / f"{key.selector}.private"
        path.write_bytes(key.pem)
        os.chown(path, user.pw_uid, user.pw_gid)
        path.chmod(0o600)
        key_table.append(f"{key.selector} {key.domain}:{key.selector}:{path}\n")
        signing_table.append(f"*@{key.domain} {key.selector}\n")
    signing = [
        f"KeyTable {root / 'KeyTable'}",
        f"SigningTable refile:{root / 'SigningTable'}",
    ]
    (root / "KeyTable").write_text("".join(key_table))
    (root / "SigningTable").write_text("".join(signing_table))
    conf = root / "opendkim.conf"
    conf.write_text(
        "\n".join(
            [
                "Syslog no",
                "Mode sv" if keys else "Mode v",
                f"Socket inet:{OPENDKIM_PORT}@{host}",
                f"PidFile {root / 'opendkim.pid'}",
                "UserID opendkim",
                "UMask 007",
                f"AuthservID {authserv_id}",
                "Canonicalization relaxed/relaxed",
                "SignatureAlgorithm rsa-sha256",
                *(signing if keys else []),
                f"InternalHosts {_hosts_file(root / 'internal', internal_hosts)}",
                "QueryCache yes",
                f"Nameservers {nameserver_of(resolv_conf)}",
                "On-Default accept",
                # The tree is under /tmp (world-writable): OpenDKIM would call its keys unsafe.
                "RequireSafeKeys false",
                "",
            ]
        )
    )
    cmd = ["opendkim", "-f", "-x", str(conf)]
    return _start_milter(root, "opendkim", cmd, host, OPENDKIM_PORT, resolv_conf, cleanup)


def start_opendmarc(
    root: Path,
    host: str,
    authserv_id: str,
    internal_hosts: Sequence[str],
    resolv_conf: Path,
    cleanup: Cleanup,
    *,
    reject_failures: bool = True,
) -> str:
    """OpenDMARC on ``host:OPENDMARC_PORT``, trusting the Authentication-Results of
    ``authserv_id`` (OpenDKIM's and policyd-spf's); refuses DMARC failures of p=reject
    domains when ``reject_failures``. Mail from ``internal_hosts`` (those OpenDKIM signs
    for) is not judged; its default would exempt 127.0.0.1, where the bench's load comes from."""
    _owned_dir(root, "opendmarc")
    conf = root / "opendmarc.conf"
    lines = [
        f"Socket inet:{OPENDMARC_PORT}@{host}",
        f"PidFile {root / 'opendmarc.pid'}",
        "UserID opendmarc",
        "Syslog false",
        f"AuthservID {authserv_id}",
        f"TrustedAuthservIDs {authserv_id}",
        f"IgnoreHosts {_hosts_file(root / 'ignore', internal_hosts)}",
        "IgnoreAuthenticatedClients true",
        f"RejectFailures {'true' if reject_failures else 'false'}",
        "SPFSelfValidate false",
        "FailureReports false",
    ]
    if PSL.exists():
        lines.append(f"PublicSuffixList {PSL}")
    conf.write_text("\n".join(lines) + "\n")
    cmd = ["opendmarc", "-f", "-c", str(conf)]
    return _start_milter(root, "opendmarc", cmd, host, OPENDMARC_PORT, resolv_conf, cleanup)


def _start_milter(
    root: Path,
    name: str,
    cmd: list[str],
    host: str,
    port: int,
    resolv_conf: Path,
    cleanup: Cleanup,
) -> str:
    """Run a milter in the foreground with the private resolv.conf; its address for Postfix.
    It keeps nothing worth a clean stop, and after SIGTERM OpenDKIM took 5 s and OpenDMARC 3 s
    to exit (10 s of each interop test's teardown): SIGKILL follows after 1 s."""
    log = root / f"{name}.log"
    proc = start_daemon(private_resolv_conf(cmd, resolv_conf), log, cleanup, name, grace=1.0)
    wait_port(host, port, proc=proc, log=log)
    return f"inet:{host}:{port}"


def policyd_spf_conf(path: Path, authserv_id: str) -> Path:
    """policyd-spf checking the MAIL FROM identity (as postroom does), never the HELO of a
    non-null sender, recording its result as an Authentication-Results field for OpenDMARC;
    loopback clients are not skipped (its default skips 127.0.0.0/8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "\n".join(
            [
                "debugLevel = 0",
                "TestOnly = 1",
                "HELO_reject = No_Check",
                "Mail_From_reject = False",
                "PermError_reject = False",
                "TempError_Defer = False",
                "skip_addresses = 192.0.2.0/24",
                "Header_Type = AR",
                f"Authserv_Id = {authserv_id}",
                "Lookup_Time = 10",
                "",
            ]
        )
    )
    path.chmod(0o644)
    return path


def policyd_spf_service(conf: Path) -> str:
    """The master.cf line that spawns policyd-spf as its own user."""
    return f"policyd-spf unix - n n - 0 spawn user=policyd-spf argv=/usr/bin/policyd-spf {conf}\n"


def check_tools() -> None:
    """BenchError naming what is missing for the stack."""
    missing = [
        name
        for name in ("opendkim", "opendmarc", "policyd-spf", "unshare")
        if not any(Path(d, name).exists() for d in os.environ.get("PATH", "").split(":"))
        and not Path("/usr/bin", name).exists()
        and not Path("/usr/sbin", name).exists()
    ]
    if missing:
        raise BenchError(
            f"missing: {', '.join(missing)} (apt-get install opendkim opendmarc "
            "postfix-policyd-spf-python util-linux)"
        )
