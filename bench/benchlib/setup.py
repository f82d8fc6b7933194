"""Bring up the servers a run needs, each on its own 127.0.0.x address under one temp tree.

127.0.0.10  postroom            smtp 2525, submission 2587, pop3 2110
127.0.0.11  Postfix             smtp 2525, submission 2587 (SASL via Dovecot)
127.0.0.12  Dovecot             pop3 2110
127.0.0.13  aiosmtpd sink       smtp 2525
127.0.0.14  postroom "remote"   smtp 2525, domain relay.test (relay case)
127.0.0.15  Postfix "remote"    smtp 2525, domain relay.test (relay case)
127.0.0.16  DNS (dnslib)        5353 udp/tcp: relay.test MX -> mx.relay.test A 127.0.0.14
                                (and port 53 for the auth group: the reference daemons
                                resolve through resolv.conf, see benchlib.authstack)
127.0.0.17  smtp-sink           smtp 2525: the MX of sink.test (mixed case)
127.0.0.18  postroom            smtp 2525, submission 2587: every check and DKIM signing on
127.0.0.19  postroom            the same with [auth] checks and dkim_sign off
127.0.0.20  Postfix             smtp 2525 + OpenDKIM (8891), OpenDMARC (8893), policyd-spf
127.0.0.21  postroom on PostgreSQL, node 1 (a private PostgreSQL: benchlib.pgnode)
127.0.0.22  postroom on PostgreSQL, node 2, the same database
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import authstack, dovecot, pgnode, postfix, postroom
from benchlib.dns import Zone, start_dns
from benchlib.proc import BenchError, Cleanup, port_open, run, start_daemon, wait_port
from benchlib.servers import DOMAIN, RELAY_DOMAIN, SENDER_DOMAIN, Addr, Server, users
from benchlib.tlscert import make_cert

HOSTS = {
    "postroom": "127.0.0.10",
    "postfix": "127.0.0.11",
    "dovecot": "127.0.0.12",
    "aiosmtpd": "127.0.0.13",
    "postroom-remote": "127.0.0.14",
    "postfix-remote": "127.0.0.15",
    "dns": "127.0.0.16",
    "sink": "127.0.0.17",  # Postfix's smtp-sink: the remote MX of sink.test (mixed case)
    "postroom-auth": "127.0.0.18",
    "postroom-plain": "127.0.0.19",
    "postfix-auth": "127.0.0.20",
    **pgnode.HOSTS,  # postroom on PostgreSQL: node 1 and node 2, one database (.21, .22)
}
SINK_DOMAIN = "sink.test"
AUTH_SERVERS = ("postroom-auth", "postroom-plain", "postfix-auth")
DNS_PORT = 5353
SINK_PORT = 2525
USER_COUNT = 8


@dataclass
class Lab:
    """The started servers by name, and what could not be started (name -> reason)."""

    root: Path
    cleanup: Cleanup
    servers: dict[str, Server] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    zone: Zone | None = None
    signed_message: Path | None = None  # the auth group's message, DKIM-signed

    def get(self, name: str) -> Server | None:
        return self.servers.get(name)


def _attempt(lab: Lab, name: str, start: object) -> None:
    """Call ``start()``; on failure remember why and go on with the other servers."""
    assert callable(start)
    try:
        lab.servers[name] = start()
    except (BenchError, OSError) as exc:
        lab.failed[name] = str(exc)
        print(f"bench: {name} did not start: {str(exc)[:1500]}", flush=True)


def start_sink(root: Path, cleanup: Cleanup) -> Server:
    host = HOSTS["aiosmtpd"]
    mail_root = root / "mail"
    box = mail_root / DOMAIN / "u1"
    script = Path(__file__).with_name("maildir_sink.py")
    log = root / "sink.log"
    root.mkdir(parents=True, exist_ok=True)
    proc = start_daemon(
        [sys.executable, str(script), host, str(SINK_PORT), str(box)], log, cleanup, "aiosmtpd sink"
    )
    wait_port(host, SINK_PORT, proc=proc, log=log)
    return Server(
        name="aiosmtpd", mail_root=mail_root, smtp=Addr(host, SINK_PORT), proc=proc, log=log
    )


def bring_up(
    root: Path,
    wanted: set[str],
    relay: bool,
    cleanup: Cleanup,
    postroom_cmd: str | None,
    workers: int | None = None,
    pin_cpus: bool = False,
    sender_checks: bool = True,
) -> Lab:
    """Start every server in ``wanted`` (plus the relay pair when ``relay``); postroom with
    ``workers`` worker processes (None: its default) and ``pin_cpus``."""
    lab = Lab(root, cleanup)
    auth = any(name in wanted for name in AUTH_SERVERS)
    dns_ports = (DNS_PORT, 53) if auth else (DNS_PORT,)
    # The addresses this run uses (another run's servers elsewhere do not matter).
    used = {"dns", *wanted, *(("postroom-remote", "postfix-remote") if relay else ())}
    busy = [
        f"{h}:{p}"
        for name, h in HOSTS.items()
        if name in used
        for p in (2525, 2587, 2110, *dns_ports)
        if port_open(h, p)
    ]
    if busy:
        raise BenchError(f"already in use (a stale instance?): {', '.join(busy)}")
    cert, key = make_cert(root / "tls")
    local_users = users(USER_COUNT)
    dns_addr = f"{HOSTS['dns']}:{DNS_PORT}"
    lab.zone = start_dns(
        HOSTS["dns"],
        dns_ports,
        cleanup,
        mx={RELAY_DOMAIN: f"mx.{RELAY_DOMAIN}", SINK_DOMAIN: f"mx.{SINK_DOMAIN}"},
        a={f"mx.{RELAY_DOMAIN}": HOSTS["postroom-remote"], f"mx.{SINK_DOMAIN}": HOSTS["sink"]},
    )
    if "dovecot" in wanted or "postfix" in wanted:
        _attempt(
            lab,
            "dovecot",
            lambda: dovecot.start_dovecot(
                root / "dovecot", HOSTS["dovecot"], local_users, cert, key, cleanup
            ),
        )
    if "postfix" in wanted:
        sasl = dovecot.auth_socket(root / "dovecot") if "dovecot" in lab.servers else None
        transports = {RELAY_DOMAIN: f"smtp:[{HOSTS['postfix-remote']}]:{postfix.PORT_SMTP}"}
        _attempt(
            lab,
            "postfix",
            lambda: postfix.start_postfix(
                root / "postfix",
                HOSTS["postfix"],
                f"mx.{DOMAIN}",
                DOMAIN,
                local_users,
                cert,
                key,
                cleanup,
                sasl_socket=sasl,
                transports=transports,
            ),
        )
        if relay:
            _attempt(
                lab,
                "postfix-remote",
                lambda: postfix.start_postfix(
                    root / "postfix-remote",
                    HOSTS["postfix-remote"],
                    f"mx.{RELAY_DOMAIN}",
                    RELAY_DOMAIN,
                    users(1, RELAY_DOMAIN),
                    cert,
                    key,
                    cleanup,
                ),
            )
    if "aiosmtpd" in wanted:
        _attempt(lab, "aiosmtpd", lambda: start_sink(root / "aiosmtpd", cleanup))
    spec = postroom.PostroomSpec(
        root / "postroom",
        HOSTS["postroom"],
        f"mx.{DOMAIN}",
        DOMAIN,
        cert,
        key,
        nameserver=dns_addr,
        delivery_port=postroom.PORT_SMTP,
        workers=workers,
        pin_cpus=pin_cpus,
        checks=sender_checks,
    )  # the local node; the PostgreSQL nodes are made from it
    pg_nodes = [n for n in pgnode.HOSTS if n in wanted]
    if pg_nodes:
        try:
            lab.servers.update(
                pgnode.start_nodes(spec, root, local_users, cleanup, postroom_cmd, len(pg_nodes))
            )
        except (BenchError, OSError, AssertionError) as exc:
            for name in pg_nodes:
                lab.failed[name] = str(exc)
            print(f"bench: postroom on PostgreSQL did not start: {str(exc)[:1500]}", flush=True)
    if "postroom" in wanted:
        _attempt(
            lab,
            "postroom",
            lambda: postroom.start_postroom(spec, local_users, cleanup, postroom_cmd),
        )
        if relay:
            remote = postroom.PostroomSpec(
                root / "postroom-remote",
                HOSTS["postroom-remote"],
                f"mx.{RELAY_DOMAIN}",
                RELAY_DOMAIN,
                cert,
                key,
                nameserver=dns_addr,
                workers=workers,
                pin_cpus=False,  # A and B would crowd the same two CPUs
            )
            _attempt(
                lab,
                "postroom-remote",
                lambda: postroom.start_postroom(
                    remote, users(1, RELAY_DOMAIN), cleanup, postroom_cmd
                ),
            )
    if auth:
        _bring_up_auth(lab, wanted, cert, key, cleanup, postroom_cmd, workers, pin_cpus)
    return lab


def start_smtp_sink(root: Path, cleanup: Cleanup) -> Path:
    """Postfix's ``smtp-sink`` on the sink address: accepts and discards, in C, so that a
    remote recipient costs the sender its own work only. Its counters go to the file
    returned (see :func:`sink_count`)."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "smtp-sink.out"
    cmd = ["/usr/sbin/smtp-sink", "-c", "-u", "nobody", f"{HOSTS['sink']}:{SINK_PORT}", "256"]
    start_daemon(cmd, log, cleanup, "smtp-sink")
    wait_port(HOSTS["sink"], SINK_PORT)
    return log


def sink_count(log: Path) -> int:
    """Messages smtp-sink has taken so far (its last ``mesg=N`` counter)."""
    tail = log.read_bytes()[-200:].split(b"mesg=")
    return int(tail[-1].split(b"\r")[0] or 0) if len(tail) > 1 else 0


def _bring_up_auth(
    lab: Lab,
    wanted: set[str],
    cert: Path,
    key: Path,
    cleanup: Cleanup,
    postroom_cmd: str | None,
    workers: int | None,
    pin_cpus: bool,
) -> None:
    """The sender-authentication group: postroom with every check on, the same with them off,
    and Postfix with OpenDKIM, OpenDMARC and policyd-spf; the sender's records (SPF, DKIM,
    DMARC p=reject) and postroom's own (its DKIM keys, so that it signs) in the zone, served
    on port 53 too; and one message signed for the sender's domain, which both sides check."""
    assert lab.zone is not None
    zone, root = lab.zone, lab.root
    sender_key = authstack.make_key(SENDER_DOMAIN, "bench", "rsa")
    zone.txt(SENDER_DOMAIN, "v=spf1 ip4:127.0.0.1 -all")  # smtp-source connects from there
    zone.txt(f"_dmarc.{SENDER_DOMAIN}", f"v=DMARC1; p=reject; rua=mailto:dmarc@{SENDER_DOMAIN}")
    zone.txt(sender_key.record_name, sender_key.txt)
    lab.signed_message = authstack.signed_message(
        root / "signed-1k.eml", sender_key, f"sender@{SENDER_DOMAIN}", f"u1@{DOMAIN}", 1024
    )
    nameserver = f"{HOSTS['dns']}:53"
    local_users = users(USER_COUNT)
    for name, on in (("postroom-auth", True), ("postroom-plain", False)):
        if name not in wanted:
            continue
        spec = postroom.PostroomSpec(
            root / name,
            HOSTS[name],
            f"mx.{DOMAIN}",
            DOMAIN,
            cert,
            key,
            nameserver=nameserver,
            workers=workers,
            pin_cpus=pin_cpus,
            checks=on,
            dkim_sign=on,
            name="postroom" if on else "postroom-checks-off",
        )
        _attempt(
            lab,
            name,
            lambda spec=spec: postroom.start_postroom(spec, local_users, cleanup, postroom_cmd),
        )
    if "postroom-auth" in lab.servers:
        config = root / "postroom-auth" / "postroom.toml"
        proc = run(
            [*postroom.command(postroom_cmd), "dns", DOMAIN, "-c", str(config)],
            env=postroom.environment(),
        )
        zone.load_master(proc.stdout)
    if "postfix-auth" in wanted:
        _attempt(lab, "postfix-auth", lambda: _start_postfix_auth(lab, cert, key, cleanup))


def _start_postfix_auth(lab: Lab, cert: Path, key: Path, cleanup: Cleanup) -> Server:
    host, base = HOSTS["postfix-auth"], lab.root / "postfix-auth"
    authstack.check_tools()
    problem = authstack.unshare_problem()
    if problem is not None:
        raise BenchError(problem)
    resolv = authstack.write_resolv_conf(base / "resolv.conf", HOSTS["dns"])
    hostname = f"mx.{DOMAIN}"
    # No internal hosts: all the load (from 127.0.0.1) is verified, none signed or exempt.
    milters = (
        authstack.start_opendkim(base / "opendkim", host, hostname, [], [], resolv, cleanup),
        authstack.start_opendmarc(base / "opendmarc", host, hostname, [], resolv, cleanup),
    )
    spf = authstack.policyd_spf_conf(base / "policyd-spf.conf", hostname)
    server = postfix.start_postfix(
        base / "postfix",
        host,
        hostname,
        DOMAIN,
        users(USER_COUNT),
        cert,
        key,
        cleanup,
        auth=postfix.AuthStack(milters, authstack.policyd_spf_service(spf), resolv),
    )
    server.name = "postfix-auth"
    return server
