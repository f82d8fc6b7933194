"""A private Dovecot POP3 instance (``dovecot -F -c CONF``) serving the bench Maildirs.

Own base_dir, state_dir and log under the bench tree; listens only on the given address. Users
come from a passwd-file with ARGON2ID hashes (the same class of hash postroom stores, so a login
costs both servers about the same); mail is ``maildir:<root>/mail/<domain>/<local>`` owned by
nobody. Plaintext USER/PASS is allowed (for the plaintext case) and STLS is offered with the
run's self-signed certificate. The auth socket ``auth-client`` also serves Postfix's SASL.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchlib import maildir
from benchlib.proc import Cleanup, run, start_daemon, wait_port
from benchlib.servers import NOBODY, PASSWORD, Addr, Server

PORT_POP3 = 2110


def conf(
    root: Path,
    host: str,
    cert: Path | None,
    key: Path | None,
    port: int = PORT_POP3,
    extra: str = "",
) -> str:
    """dovecot.conf for a private instance under ``root`` (no TLS without ``cert``);
    ``extra`` lines go in as they are (``pop3_uidl_format = ...``, say)."""
    tls = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}" if cert and key else "ssl = no"
    return f"""\
base_dir = {root / "run"}
state_dir = {root / "state"}
instance_name = bench-dovecot-{port}
protocols = pop3
listen = {host}
log_path = {root / "dovecot.log"}
{tls}
{extra}
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = username_format=%u {root / "users"}
}}
userdb {{
  driver = static
  args = uid={NOBODY[0]} gid={NOBODY[1]} home={root / "mail"}/%d/%n
}}
mail_location = maildir:~
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
}}
"""


def auth_socket(root: Path) -> Path:
    """Dovecot's SASL socket, for Postfix's ``smtpd_sasl_path``."""
    return root / "run" / "auth-client"


def start_dovecot(
    root: Path, host: str, mail_users: list[str], cert: Path, key: Path, cleanup: Cleanup
) -> Server:
    """Write dovecot.conf and the passwd-file, run Dovecot in the foreground, wait for POP3."""
    for sub in ("run", "state", "mail"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    os.chown(root / "mail", *NOBODY)
    hashed = run(["doveadm", "pw", "-s", "ARGON2ID", "-p", PASSWORD]).stdout.strip()
    (root / "users").write_text("".join(f"{u}:{hashed}\n" for u in mail_users))
    conf_file = root / "dovecot.conf"
    conf_file.write_text(conf(root, host, cert, key))
    server = Server(
        name="dovecot", mail_root=root / "mail", pop3=Addr(host, PORT_POP3), owner=NOBODY
    )
    for user in mail_users:
        maildir.ensure(server.mailbox(user), NOBODY)
    log = root / "dovecot.stdout"
    proc = start_daemon(["dovecot", "-F", "-c", str(conf_file)], log, cleanup, "dovecot")
    wait_port(host, PORT_POP3, proc=proc, log=root / "dovecot.log")
    return server
