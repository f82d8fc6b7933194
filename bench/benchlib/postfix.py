"""A private Postfix instance (``postfix -c DIR start``) for a virtual Maildir domain.

Nothing of the system's /etc/postfix is used except the daemons: the instance has its own
config_directory, queue_directory, data_directory and log file under the bench tree, and binds
only the address given. Mail for ``domain`` goes to Maildirs ``mail/<domain>/<local>/`` owned by
nobody (Postfix's virtual(8) refuses root). Postfix fsyncs its queue file before the 250 and
virtual(8) fsyncs the Maildir file: the same durability postroom promises.

Submission (when ``sasl_socket`` is given) authenticates through Dovecot's auth socket
(``smtpd_sasl_type = dovecot``), requires STARTTLS and relays for authenticated users.
``transports`` routes whole domains to ``[host]:port`` with transport_maps: Postfix has no
setting for a DNS server on a non-standard port, so the relay case uses a static route.

With an :class:`AuthStack` (``benchlib.authstack``), smtpd passes each message through the
given milters (OpenDKIM, OpenDMARC) and asks the policy service (policyd-spf) at RCPT, its
outgoing mail leaves from its own address, and the instance runs in a private mount namespace
whose /etc/resolv.conf names the loopback DNS server.
"""

from __future__ import annotations

import os
import pwd
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import maildir
from benchlib.authstack import private_resolv_conf
from benchlib.proc import BenchError, Cleanup, run, wait_port
from benchlib.servers import NOBODY, Addr, Server

PORT_SMTP = 2525
PORT_SUBMISSION = 2587

MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass(frozen=True)
class AuthStack:
    """What sender authentication adds to an instance (see ``benchlib.authstack``)."""

    milters: tuple[str, ...]  # "inet:host:port", in order
    policy_service: str  # the master.cf line of the policy service named "policyd-spf"
    resolv_conf: Path


def _main_cf(
    root: Path,
    hostname: str,
    domain: str,
    cert: Path,
    key: Path,
    sasl_socket: Path | None,
    has_transports: bool,
    auth: AuthStack | None = None,
    host: str = "",
) -> str:
    etc = root / "etc"
    lines = [
        "compatibility_level = 3.6",
        f"config_directory = {etc}",
        f"queue_directory = {root / 'spool'}",
        f"data_directory = {root / 'data'}",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        f"myhostname = {hostname}",
        f"mydomain = {hostname.partition('.')[2]}",
        "myorigin = $myhostname",
        "mydestination =",
        # The listener address is set per service in master.cf; inet_interfaces must name an
        # address that exists as such on an interface, and 127.0.0.x is only part of lo's /8.
        "inet_interfaces = loopback-only",
        "inet_protocols = ipv4",
        "mynetworks = 127.0.0.0/8",
        "alias_maps =",
        "alias_database =",
        "local_recipient_maps =",
        "smtputf8_enable = no",
        "biff = no",
        f"virtual_mailbox_domains = {domain}",
        f"virtual_mailbox_base = {root / 'mail'}",
        f"virtual_mailbox_maps = texthash:{etc / 'vmailbox'}",
        f"virtual_uid_maps = static:{NOBODY[0]}",
        f"virtual_gid_maps = static:{NOBODY[1]}",
        "virtual_minimum_uid = 100",
        "virtual_mailbox_limit = 0",
        "message_size_limit = 52428800",
        "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated,"
        " reject_unauth_destination",
        f"maillog_file = {root / 'maillog'}",
        f"maillog_file_prefixes = {root}",
        f"smtpd_tls_cert_file = {cert}",
        f"smtpd_tls_key_file = {key}",
        "smtpd_tls_security_level = may",
        "smtp_tls_security_level = may",
        # Equal footing with the Python servers on one box: no DNS lookups of the client.
        "smtpd_peername_lookup = no",
    ]
    if sasl_socket is not None:
        lines += ["smtpd_sasl_type = dovecot", f"smtpd_sasl_path = {sasl_socket}"]
    if has_transports:
        lines.append(f"transport_maps = texthash:{etc / 'transport'}")
    if auth is not None:
        lines += [
            f"smtpd_milters = {', '.join(auth.milters)}",
            "non_smtpd_milters = $smtpd_milters",
            "milter_default_action = tempfail",
            "milter_protocol = 6",
            # First: mail from mynetworks (all of loopback) is checked as well.
            "smtpd_recipient_restrictions = check_policy_service unix:private/policyd-spf",
            "policyd-spf_time_limit = 3600",
            f"smtp_bind_address = {host}",
        ]
    return "\n".join(lines) + "\n"


def _master_cf(host: str, with_submission: bool, auth: AuthStack | None = None) -> str:
    text = f"{host}:{PORT_SMTP} inet n - n - - smtpd\n"
    if with_submission:
        text += (
            f"{host}:{PORT_SUBMISSION} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/submission\n"
            "  -o smtpd_tls_security_level=encrypt\n"
            "  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n"
        )
    return text + MASTER_SERVICES + (auth.policy_service if auth else "")


def _postfix(root: Path, *args: str, check: bool = True, resolv_conf: Path | None = None) -> str:
    cmd = ["postfix", "-c", str(root / "etc"), *args]
    if resolv_conf is not None:
        cmd = private_resolv_conf(cmd, resolv_conf)
    proc = run(cmd, timeout=60, check=False)
    if check and proc.returncode != 0:
        log = root / "maillog"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise BenchError(
            f"postfix {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}"
        )
    return proc.stdout


def start_postfix(
    root: Path,
    host: str,
    hostname: str,
    domain: str,
    mail_users: list[str],
    cert: Path,
    key: Path,
    cleanup: Cleanup,
    sasl_socket: Path | None = None,
    transports: dict[str, str] | None = None,
    auth: AuthStack | None = None,
) -> Server:
    """Write the instance's config under ``root``, start it, and wait for its SMTP port."""
    etc = root / "etc"
    for sub in ("etc", "spool", "data", "mail"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    postfix_uid = pwd.getpwnam("postfix").pw_uid
    os.chown(root / "data", postfix_uid, -1)
    os.chown(root / "mail", *NOBODY)
    (etc / "main.cf").write_text(
        _main_cf(root, hostname, domain, cert, key, sasl_socket, bool(transports), auth, host)
    )
    (etc / "master.cf").write_text(_master_cf(host, sasl_socket is not None, auth))
    (etc / "vmailbox").write_text(
        "".join(f"{u} {domain}/{u.partition('@')[0]}/\n" for u in mail_users)
    )
    if transports:
        (etc / "transport").write_text("".join(f"{d} {t}\n" for d, t in transports.items()))
    server = Server(
        name="postfix", mail_root=root / "mail", smtp=Addr(host, PORT_SMTP), owner=NOBODY
    )
    if sasl_socket is not None:
        server.submission = Addr(host, PORT_SUBMISSION)
    for user in mail_users:
        maildir.ensure(server.mailbox(user), NOBODY)
    _postfix(root, "check")
    _postfix(root, "start", resolv_conf=auth.resolv_conf if auth else None)
    cleanup.push(f"postfix {host}", lambda: stop_postfix(root))
    wait_port(host, PORT_SMTP, log=root / "maillog")
    return server


def stop_postfix(root: Path) -> None:
    """``postfix stop``, then wait (bounded) for the master to exit."""
    pid_file = root / "spool" / "pid" / "master.pid"
    _postfix(root, "stop", check=False)
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)  # the master of *our* instance, by its own pid file
