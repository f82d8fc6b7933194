"""Sender authentication end to end: DKIM signing checked by dkimpy with the records that
``postroom dns`` prints, a second postroom checking what the first relays, DMARC refusals,
forged Authentication-Results, key rotation, ``dns --check``, and DMARC aggregate reports."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import smtplib
import time
from email import message_from_bytes
from pathlib import Path

import dkim
import pytest
import xmlschema

from tests.conftest import Server, ServerFactory, insecure, wait_until
from tests.dnszone import LoopbackDNS
from tests.smtpsink import smtp_sink

SCHEMA = Path(__file__).resolve().parents[1] / "data" / "rfc7489-rua.xsd"


@pytest.fixture
def dns() -> object:
    server = LoopbackDNS()
    yield server
    server.stop()


def _toml(dns: LoopbackDNS, extra: str = "") -> str:
    return f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "2s"\n{extra}'


def _server(
    server_factory: ServerFactory, dns: LoopbackDNS, *users: str, extra: str = ""
) -> Server:
    """A server that asks the loopback DNS, with ``users`` (password ``pw``)."""
    srv = server_factory(extra_toml=_toml(dns, extra))
    for user in users:
        srv.add_user(user, "pw")
    return srv


def publish(srv: Server, dns: LoopbackDNS, domain: str) -> str:
    text = srv.cli("dns", domain).stdout
    dns.load_master(text)
    return text


def submit(srv: Server, user: str, rcpt: str, body: bytes, password: str = "pw") -> None:
    with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
        c.starttls(context=insecure())
        c.login(user, password)
        c.sendmail(user, [rcpt], body)


def wait_signed(srv: Server, user: str, rcpt: str, dns: LoopbackDNS, count: int = 2) -> bytes:
    """Submit until the server signs with ``count`` keys (it looks for them in DNS)."""
    deadline = time.monotonic() + 20
    n = 0
    while time.monotonic() < deadline:
        n += 1
        submit(srv, user, rcpt, MESSAGE)
        msgs = srv.wait_messages(rcpt, n)
        if msgs and msgs[-1].count(b"DKIM-Signature:") >= count:
            return msgs[-1]
        time.sleep(0.5)
    raise AssertionError("never signed")


MESSAGE = (
    b"From: Alice <alice@a.test>\r\nTo: bob@a.test\r\nSubject: signed\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m1@a.test>\r\n\r\nhello\r\n"
)


def dkim_results(message: bytes, dns: LoopbackDNS) -> list[tuple[str, bool]]:
    """dkimpy's own verify, each signature, keys from the loopback DNS zone."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        records = dns.zone.get(name.decode().rstrip(".").lower(), [])
        for rtype, rdata in records:
            if rtype == "TXT":
                return b"".join(rdata.data)
        return None

    d = dkim.DKIM(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    sigs = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    out = []
    for idx, value in enumerate(sigs):
        algo = b"ed25519" if b"ed25519-sha256" in value else b"rsa"
        out.append((algo.decode(), d.verify(idx=idx, dnsfunc=dnsfunc)))
    return out


def test_signing_verified_by_dkimpy_both_algorithms(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    srv = _server(server_factory, dns, "alice@a.test", "bob@a.test")
    # Not yet in DNS: nothing is signed.
    submit(srv, "alice@a.test", "bob@a.test", MESSAGE)
    first = srv.wait_messages("bob@a.test", 1)[0]
    assert b"DKIM-Signature" not in first
    publish(srv, dns, "a.test")
    signed = wait_signed(srv, "alice@a.test", "bob@a.test", dns)
    assert sorted(dkim_results(signed, dns)) == [("ed25519", True), ("rsa", True)]
    assert b"c=relaxed/relaxed" in signed
    assert b"h=from:from:" in signed.replace(b"\n\t", b"").replace(b"\r", b"")
    key_dir = srv.data_dir / "dkim" / "a.test"
    for pem in key_dir.glob("*.pem"):
        assert pem.stat().st_mode & 0o777 == 0o600
    assert (srv.data_dir / "dkim").stat().st_mode & 0o777 == 0o700
    log = srv.log.read_text()
    assert "PRIVATE KEY" not in log


def test_a_script_message_with_no_empty_line_after_its_fields_is_signed(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    """Its first line of text ended the header for the signer, which refused it: 451 4.3.0
    for ever (bytesdiff probe). It is mended at intake now, and both signatures verify, to a
    local and to a remote recipient (made 7-bit too: the MIME fields stay in the header)."""
    srv = _server(server_factory, dns, "alice@a.test", "bob@a.test")
    publish(srv, dns, "a.test")
    wait_signed(srv, "alice@a.test", "bob@a.test", dns)
    script = "From: alice@a.test\r\nSubject: disk\r\nDisk usage is 93% \u00e9\r\n".encode()
    submit(srv, "alice@a.test", "bob@a.test", script)
    got = wait_until(lambda: [m for m in srv.messages("bob@a.test") if b"Disk usage" in m])[0]
    assert sorted(dkim_results(got, dns)) == [("ed25519", True), ("rsa", True)]
    assert got.endswith(b"Subject: disk\r\n\r\nDisk usage is 93% \xc3\xa9\r\n")


def test_a_from_with_two_local_domains_is_signed_by_both(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    """Two addresses (or two From fields) in two local domains went out unsigned: a receiver
    that checks each domain's DMARC (RFC 7489 §6.6.1) refused it where either asks p=reject.
    Each local domain signs now; a domain that is not local is not claimed."""
    srv = server_factory(domains=("a.test", "a2.test"), extra_toml=_toml(dns))
    for user in ("alice@a.test", "bob@a.test"):
        srv.add_user(user, "pw")
    publish(srv, dns, "a.test")
    publish(srv, dns, "a2.test")
    heads = (
        b"From: alice@a.test, carol@a2.test, x@elsewhere.test\r\n",
        b"From: alice@a.test\r\nFrom: carol@A2.test\r\n",
    )
    deadline, seen = time.monotonic() + 20, 0
    for head in heads:
        while True:  # the first until both domains' keys are seen in DNS
            submit(srv, "alice@a.test", "bob@a.test", head + b"Subject: two\r\n\r\nhi\r\n")
            seen += 1
            got = srv.wait_messages("bob@a.test", seen)[-1]
            if got.count(b"DKIM-Signature:") == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert got.count(b"DKIM-Signature:") == 4
        flat = got.replace(b"\r\n\t", b"").replace(b"\r\n ", b"")
        assert flat.count(b"d=a.test;") == 2 and flat.count(b"d=a2.test;") == 2
        assert all(ok for _algo, ok in dkim_results(got, dns))


def test_relayed_message_passes_at_a_second_postroom(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    b = server_factory(domains=("b.test",), host="127.0.0.21", extra_toml=_toml(dns), name="b")
    b.add_user("bob@b.test", "pw")
    a = server_factory(
        domains=("a.test",),
        host="127.0.0.20",
        extra_toml=_toml(dns, f"[delivery]\nport = {b.ports['smtp']}\n"),
        name="a",
    )
    a.add_user("alice@a.test", "pw")
    a.add_user("carol@a.test", "pw")
    publish(a, dns, "a.test")
    dns.a("mx.a.test", "127.0.0.20")
    dns.a("mx.a.test", "127.0.0.1")  # a's connections leave from the loopback's first address
    dns.mx("b.test", 10, "mx.b.test")
    dns.a("mx.b.test", "127.0.0.21")
    wait_signed(a, "alice@a.test", "carol@a.test", dns)  # a signs from now on
    submit(a, "alice@a.test", "bob@b.test", MESSAGE.replace(b"bob@a.test", b"bob@b.test"))
    got = b.wait_messages("bob@b.test", 1, timeout=30)
    assert got, (a.log.read_text()[-2000:], b.log.read_text()[-2000:])
    head = got[0].replace(b"\r\n", b"\n").split(b"\n\n")[0].decode()
    ar = [
        line
        for line in head.replace("\n\t", " ").splitlines()
        if line.startswith("Authentication-Results:")
    ]
    assert len(ar) == 1, head
    assert ar[0].startswith("Authentication-Results: mx.b.test;")
    for part in ("spf=pass", "dkim=pass", "dmarc=pass"):
        assert part in ar[0], ar[0]


def _mx_send(srv: Server, sender: str, rcpt: str, body: bytes, helo: str = "client.test") -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30, local_hostname=helo) as c:
        c.sendmail(sender, [rcpt], body)


def _forged(domain: str) -> bytes:
    return (
        f"From: Bank <service@{domain}>\r\nTo: bob@a.test\r\nSubject: urgent\r\n"
        f"Authentication-Results: mx.a.test; dkim=pass header.d={domain}; dmarc=pass\r\n"
        f"Authentication-Results: (forged)\r\n mx.a.test;\r\n\tspf=pass\r\n"
        f"Authentication-Results: other.example; spf=fail\r\n\r\nsend money\r\n"
    ).encode()


def test_dmarc_reject_refused_none_delivered_forged_results_removed(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    srv = _server(server_factory, dns, "bob@a.test")
    dns.txt("bank.test", "v=spf1 ip4:192.0.2.1 -all")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns.txt("shop.test", "v=spf1 ip4:192.0.2.1 -all")
    dns.txt("_dmarc.shop.test", "v=DMARC1; p=none")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _mx_send(srv, "service@bank.test", "bob@a.test", _forged("bank.test"))
    assert refused.value.smtp_code == 550 and b"5.7.1" in refused.value.smtp_error
    _mx_send(srv, "service@shop.test", "bob@a.test", _forged("shop.test"))
    msgs = srv.wait_messages("bob@a.test", 1)
    time.sleep(0.3)
    assert len(srv.messages("bob@a.test")) == 1  # the refused one was not delivered
    text = msgs[0].decode().replace("\r\n", "\n").replace("\n\t", " ").replace("\n ", " ")
    ar = [line for line in text.splitlines() if line.startswith("Authentication-Results:")]
    ours = [line for line in ar if "mx.a.test" in line]
    assert len(ours) == 1, ar
    assert "dmarc=fail" in ours[0] and "spf=fail" in ours[0] and "dkim=none" in ours[0]
    assert any("other.example" in line for line in ar)  # someone else's is kept


def test_dmarc_enforce_false_only_records(server_factory: ServerFactory, dns: LoopbackDNS) -> None:
    srv = _server(server_factory, dns, "bob@a.test", extra="[auth]\ndmarc_enforce = false\n")
    dns.txt("bank.test", "v=spf1 -all")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    _mx_send(srv, "service@bank.test", "bob@a.test", _forged("bank.test"))
    msg = srv.wait_messages("bob@a.test", 1)[0]
    # Delivered: the disposition applied is none (it read "dis=reject").
    assert b"dmarc=fail (p=reject dis=none) header.from=bank.test" in msg
    assert b"X-Spam-Flag" not in msg
    wait_until(lambda: "reject not enforced" in srv.log.read_text(), 5)
    # pct=0 leaves the mail out of the sample: the quarantine it would get instead derives
    # from the reject, and is no more applied (it was, so a milder policy flagged more).
    dns.txt("_dmarc.bank2.test", "v=DMARC1; p=reject; pct=0")
    _mx_send(srv, "service@bank2.test", "bob@a.test", _forged("bank2.test"))
    msgs = srv.wait_messages("bob@a.test", 2)
    assert len(msgs) == 2 and not any(b"X-Spam-Flag" in m for m in msgs)
    assert any(b"dmarc=fail (p=reject dis=none) header.from=bank2.test" in m for m in msgs)


def test_quarantine_flags_the_message(server_factory: ServerFactory, dns: LoopbackDNS) -> None:
    srv = _server(server_factory, dns, "bob@a.test")
    dns.txt("_dmarc.shop.test", "v=DMARC1; p=quarantine")
    _mx_send(srv, "x@shop.test", "bob@a.test", _forged("shop.test"))
    msg = srv.wait_messages("bob@a.test", 1)[0]
    assert b"X-Spam-Flag: YES" in msg and b"dmarc=fail" in msg


def test_dead_dns_delays_but_never_refuses(server_factory: ServerFactory, dns: LoopbackDNS) -> None:
    srv = _server(server_factory, dns, "bob@a.test", extra='[auth]\ncheck_timeout = "3s"\n')
    dns.timeout("_dmarc.bank.test")
    dns.timeout("bank.test")
    start = time.monotonic()
    _mx_send(srv, "service@bank.test", "bob@a.test", _forged("bank.test"))
    assert time.monotonic() - start < 10
    msg = srv.wait_messages("bob@a.test", 1)[0]
    assert b"dmarc=temperror" in msg and b"spf=temperror" in msg


def test_rotation_never_signs_with_an_unpublished_key(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    srv = _server(server_factory, dns, "alice@a.test", "bob@a.test")
    before = publish(srv, dns, "a.test")
    wait_signed(srv, "alice@a.test", "bob@a.test", dns)
    out = srv.cli("dkim", "rotate", "a.test").stdout
    assert "new ed25519 selector" in out
    after = srv.cli("dns", "a.test").stdout
    new = [line for line in after.splitlines() if "_domainkey" in line and line not in before]
    assert len(new) == 2  # listed at once
    new_selectors = {line.split(".")[0] for line in new}
    for _ in range(4):  # not in DNS: the old keys go on signing
        submit(srv, "alice@a.test", "bob@a.test", MESSAGE)
    time.sleep(2.5)
    submit(srv, "alice@a.test", "bob@a.test", MESSAGE)
    msgs = srv.wait_messages("bob@a.test", 6)
    for msg in msgs:
        assert not any(f"s={s};".encode() in msg for s in new_selectors)
    dns.load_master("\n".join(new))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        submit(srv, "alice@a.test", "bob@a.test", MESSAGE)
        last = srv.wait_messages("bob@a.test", len(msgs) + 1)[-1]
        msgs.append(last)
        if all(f"s={s};".encode() in last for s in new_selectors):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the new keys never signed")
    assert sorted(dkim_results(last, dns)) == [("ed25519", True), ("rsa", True)]
    # The old selectors stay listed (retiring).
    assert (
        len([ln for ln in srv.cli("dns", "a.test").stdout.splitlines() if "_domainkey" in ln]) == 4
    )


def test_dns_check_names_a_missing_dkim_record(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    srv = server_factory(extra_toml=_toml(dns), start=False)
    lines = srv.cli("dns", "a.test").stdout.splitlines()
    assert all("\tIN\t" in line for line in lines)
    rsa = next(line for line in lines if "rsa" in line and "_domainkey" in line)
    assert rsa.count('"') == 4  # split into strings of at most 255 octets
    dns.load_master("\n".join(line for line in lines if line is not rsa))
    proc = srv.cli("dns", "a.test", "--check", check=False)
    assert proc.returncode == 1
    bad = [line for line in proc.stdout.splitlines() if not line.startswith("ok")]
    assert len(bad) == 1 and bad[0].startswith("missing") and rsa.split()[0] in bad[0]
    dns.load_master(rsa)
    assert srv.cli("dns", "a.test", "--check", check=False).returncode == 0
    data = json.loads(srv.cli("dns", "a.test", "--json").stdout)
    assert {d["type"] for d in data} == {"MX", "TXT"} and all(
        set(d) == {"name", "type", "ttl", "value"} for d in data
    )
    assert srv.cli("dns", "nope.test", check=False).returncode == 1


def test_dmarc_report_reaches_rua_via_the_queue(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    srv = _server(server_factory, dns, "bob@a.test", "reports@a.test")
    publish(srv, dns, "a.test")
    # shop.test asks for reports at an address of ours (external: authorized by DNS).
    dns.txt("_dmarc.shop.test", "v=DMARC1; p=none; rua=mailto:reports@a.test!10m")
    dns.txt("shop.test._report._dmarc.a.test", "v=DMARC1")
    dns.txt("shop.test", "v=spf1 ip4:127.0.0.0/8 -all")
    _mx_send(srv, "x@shop.test", "bob@a.test", _forged("shop.test"))
    _mx_send(srv, "x@shop.test", "bob@a.test", _forged("shop.test"))
    srv.wait_messages("bob@a.test", 2)
    out = srv.cli("dmarc", "report", "--now").stdout
    assert "1 DMARC" in out
    got = srv.wait_messages("reports@a.test", 1, timeout=15)
    assert got
    msg = message_from_bytes(got[0])
    assert "Report Domain: shop.test" in msg["Subject"]
    assert msg["Date"].endswith("+0000")  # made in UTC, not "-0000" (zone unknown)
    parts = [p for p in msg.walk() if p.get_content_type() == "application/gzip"]
    xml = gzip.decompress(parts[0].get_payload(decode=True))
    schema = xmlschema.XMLSchema(str(SCHEMA))
    schema.validate(xml.decode())
    assert b"<count>2</count>" in xml
    # One more message and another run at once: a report ID of its own (§7.2.1.1 dedup).
    _mx_send(srv, "x@shop.test", "bob@a.test", _forged("shop.test"))
    srv.wait_messages("bob@a.test", 3)
    assert "1 DMARC" in srv.cli("dmarc", "report", "--now").stdout
    both = [message_from_bytes(m) for m in srv.wait_messages("reports@a.test", 2, timeout=15)]
    ids = {" ".join(m["Subject"].split()).rpartition("Report-ID: ")[2] for m in both}
    assert len(ids) == 2, ids
    # RFC 7489 §7.2.1.1: the Subject's Report-ID is a msg-id (RFC 5322 §3.6.4), with its "@".
    assert all(re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", i) for i in ids), ids


def test_dmarc_report_now_is_off_when_reports_are(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    srv = server_factory(extra_toml=_toml(dns, "[auth]\ndmarc_reports = false\n"), start=False)
    p = srv.cli("dmarc", "report", "--now", check=False)
    assert p.returncode == 1 and "dmarc_reports = false" in p.stderr


def test_messages_past_check_max_size_are_checked_all_the_same(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    """Past check_max_size a message got SPF only and no DMARC verdict: a forgery padded to
    26 MB, or carrying any signature that claimed its From domain, was delivered under
    p=reject. It is checked as a small one is (one such message at a time)."""
    srv = _server(server_factory, dns, "bob@a.test", extra='[auth]\ncheck_max_size = "1KB"\n')
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=none")
    dns.txt("_dmarc.shop.test", "v=DMARC1; p=reject")
    _mx_send(srv, "service@bank.test", "bob@a.test", _forged("bank.test") + b"x" * 2000 + b"\r\n")
    msg = srv.wait_messages("bob@a.test", 1)[0].replace(b"\r\n", b"\n")
    assert msg.count(b"mx.a.test;") == 1 and b"dkim=pass" not in msg  # forged results gone
    assert b"spf=none" in msg and b"dmarc=fail" in msg and b"dkim=none" in msg
    fake = b"DKIM-Signature: v=1; a=rsa-sha256; d=shop.test; s=sel; h=from; bh=; b=\r\n"
    for extra in (b"", fake):
        data = extra + _forged("shop.test") + b"z" * 2000 + b"\r\n"
        with pytest.raises(smtplib.SMTPDataError) as refused:
            _mx_send(srv, "x@shop.test", "bob@a.test", data)
        assert refused.value.smtp_code == 550
    # The 11th From domain was never checked: such a message is refused, whatever the first
    # ten say (bank.test's p=none fail hid it).
    authors = "a@bank.test, " + ", ".join(f"a@x{i}.test" for i in range(9)) + ", ceo@shop.test"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _mx_send(srv, "x@x0.test", "bob@a.test", f"From: {authors}\r\n\r\nhi\r\n".encode())
    assert refused.value.smtp_code == 550
    # A From field too long to read in bounded time (folded spaces: a minute of the event
    # loop), whatever domain it names, and an address a mail reader shows as ceo@shop.test
    # that the legacy parser read as ceo@shop.testx.x0.test (x0.test's own, no policy).
    for value in ("ceo@x0.test" + "\r\n " * 2500 + "x", "ceo@shop.test x.x0.test"):
        with pytest.raises(smtplib.SMTPDataError) as refused:
            _mx_send(srv, "x@x0.test", "bob@a.test", f"From: {value}\r\n\r\nhi\r\n".encode())
        assert refused.value.smtp_code == 550
        assert b"5.7.1" in refused.value.smtp_error


def _helpers(root_pid: int) -> list[int]:
    """The DKIM helper processes below ``root_pid`` (the server and its workers)."""
    parents: dict[int, int] = {}
    commands: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
        parents[int(entry.name)] = int(ppid)

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root_pid:
                return True
        return False

    return [pid for pid, cmd in commands.items() if b"postroom.auth.helper" in cmd and below(pid)]


def test_signing_goes_on_when_the_dkim_helper_dies(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    srv = _server(server_factory, dns, "alice@a.test", "bob@a.test")
    publish(srv, dns, "a.test")
    wait_signed(srv, "alice@a.test", "bob@a.test", dns)
    assert srv.proc is not None
    helpers = _helpers(srv.proc.pid)
    assert helpers, "signing did not go through a helper process"
    for pid in helpers:
        os.kill(pid, signal.SIGKILL)
    before = len(srv.messages("bob@a.test"))
    for n in range(1, 4):
        submit(srv, "alice@a.test", "bob@a.test", MESSAGE)
        signed = srv.wait_messages("bob@a.test", before + n)[-1]
        assert sorted(dkim_results(signed, dns)) == [("ed25519", True), ("rsa", True)]
    assert _helpers(srv.proc.pid), "no new helper was started"


def test_a_bounce_is_signed_by_the_domain_that_holds_hostname(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    """A bounce (``From: MAILER-DAEMON@mx.a.test``, null sender) went out unsigned; with no
    SPF for the HELO name it failed DMARC wherever a.test publishes p=reject, and a refused
    bounce goes nowhere. It is signed by a.test now, as the users' mail is."""
    srv = _server(server_factory, dns, "alice@a.test", "bob@a.test")
    publish(srv, dns, "a.test")
    wait_signed(srv, "alice@a.test", "bob@a.test", dns)  # the keys are seen in DNS
    submit(srv, "alice@a.test", "nobody@nowhere.test", MESSAGE)  # NXDOMAIN: bounced at once
    bounce = srv.wait_messages("alice@a.test", 1)[0]
    assert b"MAILER-DAEMON@mx.a.test" in bounce
    assert re.search(rb"DKIM-Signature:[^\n]*\bd=a\.test", bounce.replace(b"\n\t", b" "))
    assert sorted(dkim_results(bounce, dns)) == [("ed25519", True), ("rsa", True)]


def test_a_bounce_with_8bit_parts_keeps_its_signatures_through_a_7bit_hop(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    """A bounce returning a header in UTF-8 (message/global-headers, 8bit) was signed, then
    base64-encoded for a host without 8BITMIME: both signatures failed there (body hash
    mismatch). One that leaves is made 7-bit before it is signed, as submitted mail is
    (interop probe, with a Postfix peer)."""
    with smtp_sink("127.0.0.1", ("PIPELINING",)) as sink:
        port = sink.server_address[1]
        srv = _server(
            server_factory, dns, "alice@a.test", "bob@a.test", extra=f"[delivery]\nport = {port}\n"
        )
        publish(srv, dns, "a.test")
        wait_signed(srv, "alice@a.test", "bob@a.test", dns)  # the keys are seen in DNS
        dns.mx("r.test", 10, "mx.r.test")
        dns.a("mx.r.test", "127.0.0.1")
        srv.cli("alias", "add", "fwd@a.test", "someone@nowhere.test")  # NXDOMAIN: 5.1.2
        message = "From: x@r.test\r\nSubject: café\r\n\r\nbody\r\n".encode()
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
            c.sendmail("x@r.test", ["fwd@a.test"], message, mail_options=["BODY=8BITMIME"])
        wait_until(lambda: sink.received, 20)
    bounce = sink.received[0]
    assert b"message/global-headers" in bounce and bounce.isascii()
    assert sorted(dkim_results(bounce, dns)) == [("ed25519", True), ("rsa", True)]
    assert b"\nSubject: caf=C3=A9\r\n" in bounce  # quoted-printable: the fields stay readable
