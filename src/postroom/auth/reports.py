"""DMARC aggregate reports (RFC 7489 §7.2): results recorded per message, sent once a day.

Each DMARC evaluation of a domain that asks for reports (``rua=``) appends one JSON line to
``{data_dir}/dmarc/records.jsonl`` (:func:`record`; the file stays open between lines, and is
opened again as soon as it has been renamed away under the writer). :func:`take` renames that
file aside and reads it; :func:`build` groups the rows per policy domain and per identical
outcome into the RFC 7489 Appendix C XML (elements in no namespace: the Appendix's schema does
not load with its target namespace, and the large receivers' reports use none; IPv6 source
addresses written out in full, as its ``IPAddress`` pattern wants); :func:`compose` wraps one
gzip'ed report in a MIME message (§7.2.1.1: the file name
``receiver!policy-domain!begin!end.xml.gz`` and the subject). The caller signs and queues it.
:func:`destinations` applies §7.1: a ``rua`` outside the policy domain's organization must be
authorized by a ``<domain>._report._dmarc.<rua domain>`` record (whose own ``rua=`` on that
host, if it has one, replaces the policy's URI, §7.1 step 8); one whose lookup failed for
the moment keeps its rows for the next run (§7.1 allows the check to be repeated later), and
one whose ``!size`` (§6.2) is below the report's gzip'ed size gets none. One run at a time per
``data_dir`` (:func:`exclusive`: the server's daily run and ``dmarc report --now`` could
otherwise both send the same rows), and every report ID is unique.

Security notes: everything in a row came from the network; XML text is escaped by
ElementTree, and the characters XML 1.0 does not allow at all (which ElementTree writes as they
are, making the whole report unreadable) are replaced by "?"; the report size is bounded by
``MAX_ROWS``; rua URIs are parsed strictly (``mailto:`` with one address and an optional
``!size``), and what their %-escapes make must be an address an RCPT TO can carry.
"""

from __future__ import annotations

import contextlib
import datetime
import email.policy
import email.utils
import fcntl
import gzip
import ipaddress
import json
import os
import re
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from postroom.address import parse_mailbox
from postroom.auth.dkim_verify import DkimResult
from postroom.auth.dmarc import DmarcResult, is_record, organizational_domain, record_tags
from postroom.auth.lookup import DnsCache
from postroom.auth.spf import SpfResult
from postroom.errors import AddressError
from postroom.storage.local.files import fsync_dir, replace_durably

MAX_ROWS = 100_000
RECORDS = "records.jsonl"
PROGRESS = "sending.progress"  # the policy domains reported, per file taken (Taken.mark)
SUPERSEDES = "supersedes"  # first line of a file of rows left: the files it takes the place of


def record(
    folder: Path,
    client_ip: str,
    envelope_domain: str,
    spf: SpfResult | None,
    dkim_results: Iterable[DkimResult],
    dmarc: DmarcResult,
    now: float,
) -> None:
    """Append one evaluated message (only for a policy that has a ``rua``)."""
    rec = dmarc.record
    if rec is None or not rec.rua:
        return
    row = {
        "t": int(now),
        "ip": client_ip,
        "from": dmarc.from_domain,
        "mfrom": envelope_domain,
        "pdomain": dmarc.policy_domain,
        "p": rec.p,
        "sp": rec.sp,
        "pct": rec.pct,
        "fo": rec.fo,
        "adkim": rec.adkim,
        "aspf": rec.aspf,
        "rua": list(rec.rua),
        "disp": dmarc.disposition,
        "dkim_ok": dmarc.dkim_aligned,
        "spf_ok": dmarc.spf_aligned,
        "sampled": dmarc.sampled_out,
        "local": dmarc.local_override,
        "dkim": [[r.domain, r.selector, r.result] for r in dkim_results if r.domain],
        "spf": [spf.domain, spf.identity, spf.result] if spf else None,
    }
    line = json.dumps(row, separators=(",", ":")).encode() + b"\n"
    _appender(folder).write(line)


class _Appender:
    """An O_APPEND descriptor for ``records.jsonl``, opened again when the name no longer
    leads to it (:func:`take` renamed it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        self.ident = (0, 0)

    def write(self, line: bytes) -> None:
        try:
            st = os.stat(self.path)
            current = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = (0, 0)
        if self.fd < 0 or current != self.ident:
            self._open()
        os.write(self.fd, line)  # one write of a short line: appended whole (O_APPEND)

    def _open(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o600)
        st = os.fstat(self.fd)
        self.ident = (st.st_dev, st.st_ino)


_appenders: dict[Path, _Appender] = {}


def _appender(folder: Path) -> _Appender:
    appender = _appenders.get(folder)
    if appender is None:
        appender = _appenders[folder] = _Appender(folder / RECORDS)
    return appender


@dataclass
class Taken:
    """The rows of one run (taken at ``now``), from the files ``files``. ``reported``: per
    file, the policy domains whose rows are reported already (by a run cut short, or by this
    one so far): those rows are not taken again, while the same domain's rows in a later file
    are."""

    folder: Path
    now: float
    rows: list[dict[str, Any]]
    files: tuple[str, ...]
    reported: dict[str, list[str]]
    dropped: int = 0  # rows past MAX_ROWS, the oldest: not reported
    # Rows that are not well formed (damaged, or edited by hand), left out: one such row made
    # every run fail, for every domain.
    malformed: int = 0
    marked: set[str] = field(default_factory=set)  # by this run

    def mark(self, domain: str) -> None:
        """``domain``'s report is queued (or can go nowhere): said on disk before the next
        report is made, so that a run killed from here on does not report its rows again
        (a second report of the same rows under another Report-ID, RFC 7489 §7.2.1.1, which
        no receiver can tell from a new one). What is left is a kill between the queueing
        and this mark: one report."""
        self.marked.add(domain)
        for name in self.files:
            if domain not in self.reported[name]:
                self.reported[name].append(domain)
        path = self.folder / PROGRESS
        replace_durably(path, json.dumps(self.reported).encode(), path.with_suffix(".tmp"))
        fsync_dir(self.folder)

    def finish(self, keep: bool) -> None:
        """Forget the files and their marks: every row is reported, or (``keep``: some
        report must wait for a lookup to be repeated) the rows not marked are copied first to
        one file for the next run. That file names the files it takes the place of in its
        first line and is flushed whole before its name appears: a crash leaves either the
        files and their marks, or it (and :func:`take` then removes what it replaced). Left
        in place, the files and their marks grew with every run while a lookup kept failing.
        """
        if keep:
            left = [r for r in self.rows if str(r["pdomain"]) not in self.marked]
            lines = [{SUPERSEDES: list(self.files)}, *left]
            name = f"sending-{int(self.now * 1000)}-left.jsonl"
            data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
            replace_durably(self.folder / name, data, self.folder / f"{name}.tmp")
            fsync_dir(self.folder)
        for name in self.files:
            (self.folder / name).unlink(missing_ok=True)
        (self.folder / PROGRESS).unlink(missing_ok=True)


def take(folder: Path, now: float) -> Taken:
    """Move the recorded rows aside and return them (also those of an interrupted run, but
    the rows it reported)."""
    with contextlib.suppress(FileNotFoundError):
        os.rename(folder / RECORDS, folder / f"sending-{int(now * 1000)}.jsonl")
    reported: dict[str, list[str]] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        saved = json.loads((folder / PROGRESS).read_bytes())
        reported = {str(name): [str(d) for d in domains] for name, domains in saved.items()}
    for spare in folder.glob("sending*.tmp"):  # of a write a crash cut short
        spare.unlink(missing_ok=True)
    names = sorted(p.name for p in folder.glob("sending-*.jsonl"))
    for name in _replaced(folder, names):  # (a crash came before their removal)
        (folder / name).unlink(missing_ok=True)
        names.remove(name)
    rows: list[dict[str, Any]] = []
    dropped = bad = 0
    for name in reversed(names):  # the newest first: past MAX_ROWS, the oldest rows go
        done = set(reported.get(name, ()))
        for line in reversed((folder / name).read_bytes().splitlines()):
            # (a torn last line: no row)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                if isinstance(row, dict) and SUPERSEDES in row:
                    continue
                if not _well_formed(row):
                    bad += 1
                    continue
                if str(row["pdomain"]) in done:
                    continue
                if len(rows) < MAX_ROWS:
                    rows.append(row)
                else:
                    dropped += 1
    rows.reverse()
    files = tuple(names)
    reported = {name: reported.get(name, []) for name in files}
    return Taken(folder, now, rows, files, reported, dropped, malformed=bad)


# The fields :func:`build` reads from a row (as :func:`record` writes them), and their types.
_ROW_FIELDS: dict[str, type | tuple[type, ...]] = {
    "t": int,
    "ip": str,
    "from": str,
    "mfrom": str,
    "pdomain": str,
    "p": str,
    "sp": str,
    "pct": int,
    "adkim": str,
    "aspf": str,
    "rua": list,
    "disp": str,
    "dkim_ok": bool,
    "spf_ok": bool,
    "sampled": bool,
    "dkim": list,
    "spf": (list, type(None)),
}


def _well_formed(row: object) -> bool:
    """Can :func:`build` report ``row``?"""
    if not isinstance(row, dict):
        return False
    if not all(isinstance(row.get(name), kind) for name, kind in _ROW_FIELDS.items()):
        return False
    if not (0 <= row["t"] < 1 << 40 and 0 <= row["pct"] <= 100):  # (a time, a percentage)
        return False
    triples = [*row["dkim"], *([row["spf"]] if row["spf"] is not None else [])]
    strings = [*row["rua"], *(v for t in triples if isinstance(t, list) for v in t)]
    return all(isinstance(t, list) and len(t) == 3 for t in triples) and all(
        isinstance(v, str) for v in strings
    )


def _replaced(folder: Path, names: list[str]) -> set[str]:
    """The files among ``names`` whose rows a file of rows left (Taken.finish) holds."""
    out: set[str] = set()
    for name in names:
        if name.endswith("-left.jsonl"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
                with (folder / name).open("rb") as f:
                    head = json.loads(f.readline())
                out.update(str(n) for n in head[SUPERSEDES] if n != name)
    return out & set(names)


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[bool]:
    """Hold the reports of ``folder`` for one run: True, or False while another process (or
    task) runs (then this one sends nothing: the other sends every row)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder / ".sending.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Report:
    policy_domain: str
    rua: tuple[str, ...]
    begin: int
    end: int
    report_id: str
    xml: bytes


# Not an XML 1.0 Char (§2.2): the C0 controls but TAB, LF and CR, surrogates, U+FFFE/U+FFFF.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(parent: ET.Element, tag: str, value: object) -> ET.Element:
    el = ET.SubElement(parent, tag)
    el.text = _NOT_XML_CHAR.sub("?", str(value))
    return el


def source_ip(text: str) -> str:
    """The address as the schema's ``IPAddress`` pattern accepts it: dotted IPv4 (also for an
    IPv4-mapped IPv6 address), IPv6 with all eight groups written out."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address):
        return str(addr.ipv4_mapped) if addr.ipv4_mapped else addr.exploded
    return str(addr)


def build(
    rows: list[dict[str, Any]], org_name: str, email_addr: str, end: int, prefix: str
) -> list[Report]:
    """One report per policy domain (RFC 7489 Appendix C), identical rows counted."""
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_domain.setdefault(str(row["pdomain"]), []).append(row)
    reports = []
    for n, (domain, group) in enumerate(sorted(by_domain.items())):
        begin = min(int(r["t"]) for r in group)
        last = group[-1]
        counts: Counter[str] = Counter()
        for r in group:
            key = {
                k: r[k]
                for k in (
                    "ip",
                    "from",
                    "mfrom",
                    "disp",
                    "dkim_ok",
                    "spf_ok",
                    "sampled",
                    "dkim",
                    "spf",
                )
            }
            key["local"] = r.get("local", False)  # not in rows written before it was
            counts[json.dumps(key, sort_keys=True)] += 1
        report_id = f"{prefix}.{n}"
        root = ET.Element("feedback")
        _text(root, "version", "1.0")
        meta = ET.SubElement(root, "report_metadata")
        _text(meta, "org_name", org_name)
        _text(meta, "email", email_addr)
        _text(meta, "report_id", report_id)
        dates = ET.SubElement(meta, "date_range")
        _text(dates, "begin", begin)
        _text(dates, "end", end)
        pub = ET.SubElement(root, "policy_published")
        _text(pub, "domain", domain)
        _text(pub, "adkim", last["adkim"])
        _text(pub, "aspf", last["aspf"])
        _text(pub, "p", last["p"])
        _text(pub, "sp", last["sp"])
        _text(pub, "pct", last["pct"])
        _text(pub, "fo", last.get("fo", "0"))
        for key_json, count in counts.items():
            k = json.loads(key_json)
            rec = ET.SubElement(root, "record")
            row_el = ET.SubElement(rec, "row")
            _text(row_el, "source_ip", source_ip(k["ip"]))
            _text(row_el, "count", count)
            ev = ET.SubElement(row_el, "policy_evaluated")
            _text(ev, "disposition", k["disp"])
            _text(ev, "dkim", "pass" if k["dkim_ok"] else "fail")
            _text(ev, "spf", "pass" if k["spf_ok"] else "fail")
            for flag, reason_type in (("sampled", "sampled_out"), ("local", "local_policy")):
                if k[flag]:
                    reason = ET.SubElement(ev, "reason")
                    _text(reason, "type", reason_type)
            ids = ET.SubElement(rec, "identifiers")
            _text(ids, "envelope_from", k["mfrom"])
            _text(ids, "header_from", k["from"])
            auth = ET.SubElement(rec, "auth_results")
            for d, s, result in k["dkim"]:
                dk = ET.SubElement(auth, "dkim")
                _text(dk, "domain", d)
                if s:
                    _text(dk, "selector", s)
                _text(dk, "result", result)
            sp = ET.SubElement(auth, "spf")
            spf = k["spf"] or [k["mfrom"], "mailfrom", "none"]
            _text(sp, "domain", spf[0])
            _text(sp, "scope", "mfrom" if spf[1] == "mailfrom" else "helo")
            _text(sp, "result", spf[2])
        xml = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        reports.append(Report(domain, tuple(last["rua"]), begin, end, report_id, xml))
    return reports


def rua_address(uri: str) -> str | None:
    """``mailto:dmarc@example.com!10m`` -> ``dmarc@example.com`` (RFC 7489 §6.2, §6.4)."""
    if not uri.lower().startswith("mailto:"):
        return None
    try:  # (%-escapes of octets that are no UTF-8: no address)
        addr = urllib.parse.unquote(uri[7:].split("!", 1)[0].split("?", 1)[0], errors="strict")
    except UnicodeDecodeError:
        return None
    addr = addr.strip()
    # What %-escapes make of it must still be an address an RCPT TO and a To: field can
    # carry (RFC 5321 §4.1.2): no NUL, TAB, lone quote or the like.
    try:
        return str(parse_mailbox(addr, utf8=True, local_limit=False))
    except AddressError:
        return None


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def rua_limit(uri: str) -> int | None:
    """The largest report ``uri`` takes, in octets (RFC 7489 §6.2: ``!`` digits and an
    optional unit k, m, g or t, powers of two); None for no limit or one that does not parse."""
    _, bang, size = uri.partition("!")
    size = size.strip().lower()
    digits = size.rstrip("kmgt")
    if not bang or not digits.isdigit() or not digits.isascii() or len(size) - len(digits) > 1:
        return None
    return int(digits) * _UNITS[size[len(digits) :]]


@dataclass(frozen=True)
class Destinations:
    addresses: list[str]  # may get the report now
    later: bool  # a §7.1 lookup failed for the moment: keep the rows for the next run
    refused: list[str]  # not authorized, or the report is over their size limit (for the log)


def _override(texts: list[str]) -> list[str] | None:
    """The ``rua=`` URIs of the first DMARC record among ``texts`` that has one (RFC 7489
    §7.1 step 8), None when no record has a rua tag."""
    for text in texts:
        tags = record_tags(text)
        if tags is not None and "rua" in tags:
            return [uri.strip() for uri in tags["rua"].split(",") if uri.strip()]
    return None


async def destinations(cache: DnsCache, report: Report, size: int) -> Destinations:
    """Where this report (``size`` octets gzip'ed) goes: RFC 7489 §7.1 external destinations
    (with the override a receiver's authorization record may carry) and §6.2 size limits."""
    out: list[str] = []
    refused: list[str] = []
    waiting: list[str] = []  # the §7.1 lookup failed for the moment
    for uri in report.rua:
        addr = rua_address(uri)
        if addr is None:
            continue
        targets = [(addr, uri)]
        rua_domain = addr.rpartition("@")[2].lower()
        if organizational_domain(rua_domain) != organizational_domain(report.policy_domain):
            name = f"{report.policy_domain}._report._dmarc.{rua_domain}"
            answer = await cache.query(name, "TXT")
            if answer.temporary:
                waiting.append(f"{addr} (authorization lookup failed: {answer.error})")
                continue
            texts = [t.decode("ascii", "replace") for t in answer.txt()]
            if not any(is_record(t) for t in texts):
                refused.append(f"{addr} (not authorized by {rua_domain}, RFC 7489 §7.1)")
                continue
            # §7.1 step 8: the authorization record's own rua replaces the policy's, but only
            # with URIs on the same destination host (an override elsewhere is not used).
            same_host = []
            for other in _override(texts) or []:
                other_addr = rua_address(other)
                if other_addr is not None and other_addr.rpartition("@")[2].lower() == rua_domain:
                    same_host.append((other_addr, other))
                else:
                    refused.append(f"{other} (override in {name} is not on {rua_domain})")
            targets = same_host or targets
        for target, target_uri in targets:
            limit = rua_limit(target_uri)
            if limit is not None and size > limit:
                refused.append(f"{target} (takes {limit} octets, the report has {size})")
            elif target not in out:
                out.append(target)
    if out:  # sent now to those it can go to; kept, the rows would reach them twice
        return Destinations(out, False, refused + waiting)
    return Destinations(out, bool(waiting), refused + waiting)


def payload(report: Report) -> bytes:
    """The report as it is attached: gzip'ed XML (what a rua's ``!size`` limits)."""
    return gzip.compress(report.xml, mtime=0)


def compose(report: Report, receiver: str, sender: str, to: list[str], now: float) -> bytes:
    """The report message (RFC 7489 §7.2.1.1): a short text and the gzip'ed XML."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = (
        f"Report Domain: {report.policy_domain} Submitter: {receiver} "
        f"Report-ID: <{report.report_id}@{receiver}>"  # a msg-id (RFC 7489 §7.2.1.1)
    )
    # "+0000": made in UTC; formatdate's "-0000" says the zone is unknown (RFC 5322 §3.3).
    msg["Date"] = email.utils.format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
    msg["Message-ID"] = f"<{report.report_id}@{receiver}>"
    msg.set_content(
        f"DMARC aggregate report for {report.policy_domain} from {receiver}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(report.begin))} to "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(report.end))} UTC.\n"
    )
    name = f"{receiver}!{report.policy_domain}!{report.begin}!{report.end}.xml.gz"
    msg.add_attachment(
        payload(report),
        maintype="application",
        subtype="gzip",
        filename=name,
    )
    # A UTF-8 address goes as it is (RFC 6532 §3.2: the report travels with SMTPUTF8); an
    # encoded-word in an addr-spec is no address (RFC 2047 §5).
    utf8 = not all(addr.isascii() for addr in to)
    return msg.as_bytes(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
