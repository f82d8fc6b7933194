"""DMARC aggregate reports (RFC 7489 §7.2): results recorded per message, sent once a day.

Each DMARC evaluation of a domain that asks for reports (``rua=``) appends one JSON line to
``{data_dir}/dmarc/records.jsonl`` (:func:`record`; opened and closed per line, so that the
file can be renamed away under the writers). :func:`take` renames that file aside and reads
it; :func:`build` groups the rows per policy domain and per identical outcome into the
RFC 7489 Appendix C XML; :func:`compose` wraps one gzip'ed report in a MIME message
(§7.2.1.1: the file name ``receiver!policy-domain!begin!end.xml.gz`` and the subject). The
caller signs and queues it. :func:`destinations` applies §7.1: a ``rua`` outside the policy
domain's organization must be authorized by a ``<domain>._report._dmarc.<rua domain>`` record.

Security notes: everything in a row came from the network; XML text is escaped by
ElementTree, the report size is bounded by ``MAX_ROWS``, and rua URIs are parsed strictly
(``mailto:`` with one address, RFC 7489 §6.2's ``!size`` suffix dropped).
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import json
import os
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from postroom.auth.dkim_verify import DkimResult
from postroom.auth.dmarc import DmarcResult, organizational_domain
from postroom.auth.lookup import DnsCache
from postroom.auth.spf import SpfResult

MAX_ROWS = 100_000
RECORDS = "records.jsonl"


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
        "adkim": rec.adkim,
        "aspf": rec.aspf,
        "rua": list(rec.rua),
        "disp": dmarc.disposition,
        "dkim_ok": dmarc.dkim_aligned,
        "spf_ok": dmarc.spf_aligned,
        "sampled": dmarc.sampled_out,
        "dkim": [[r.domain, r.selector, r.result] for r in dkim_results if r.domain],
        "spf": [spf.domain, spf.identity, spf.result] if spf else None,
    }
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = json.dumps(row, separators=(",", ":")).encode() + b"\n"
    fd = os.open(folder / RECORDS, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)  # one write of a short line: appended whole (O_APPEND)
    finally:
        os.close(fd)


def take(folder: Path, now: float) -> list[dict[str, Any]]:
    """Move the recorded rows aside and return them (also those of an interrupted run)."""
    with contextlib.suppress(FileNotFoundError):
        os.rename(folder / RECORDS, folder / f"sending-{int(now * 1000)}.jsonl")
    rows: list[dict[str, Any]] = []
    if not folder.exists():
        return rows
    for path in sorted(folder.glob("sending-*.jsonl")):
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                if len(rows) < MAX_ROWS:
                    rows.append(json.loads(line))
    return rows


def done(folder: Path) -> None:
    """The rows taken are reported (queued): forget them."""
    for path in folder.glob("sending-*.jsonl"):
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Report:
    policy_domain: str
    rua: tuple[str, ...]
    begin: int
    end: int
    report_id: str
    xml: bytes


def _text(parent: ET.Element, tag: str, value: object) -> ET.Element:
    el = ET.SubElement(parent, tag)
    el.text = str(value)
    return el


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
            counts[json.dumps(key, sort_keys=True)] += 1
        report_id = f"{prefix}.{n}"
        root = ET.Element("feedback", xmlns="http://dmarc.org/dmarc-xml/0.1")
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
        _text(pub, "fo", "0")
        for key_json, count in counts.items():
            k = json.loads(key_json)
            rec = ET.SubElement(root, "record")
            row_el = ET.SubElement(rec, "row")
            _text(row_el, "source_ip", k["ip"])
            _text(row_el, "count", count)
            ev = ET.SubElement(row_el, "policy_evaluated")
            _text(ev, "disposition", k["disp"])
            _text(ev, "dkim", "pass" if k["dkim_ok"] else "fail")
            _text(ev, "spf", "pass" if k["spf_ok"] else "fail")
            if k["sampled"]:
                reason = ET.SubElement(ev, "reason")
                _text(reason, "type", "sampled_out")
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
    addr = urllib.parse.unquote(uri[7:].split("!", 1)[0].split("?", 1)[0]).strip()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or any(c in addr for c in " ,<>\r\n"):
        return None
    return addr


async def destinations(cache: DnsCache, report: Report) -> list[str]:
    """The rua addresses that may get this report (RFC 7489 §7.1 external destinations)."""
    out = []
    for uri in report.rua:
        addr = rua_address(uri)
        if addr is None:
            continue
        rua_domain = addr.rpartition("@")[2].lower()
        if organizational_domain(rua_domain) != organizational_domain(report.policy_domain):
            answer = await cache.query(f"{report.policy_domain}._report._dmarc.{rua_domain}", "TXT")
            if not any(t.replace(b" ", b"").startswith(b"v=DMARC1") for t in answer.txt()):
                continue
        out.append(addr)
    return out


def compose(report: Report, receiver: str, sender: str, to: list[str], now: float) -> bytes:
    """The report message (RFC 7489 §7.2.1.1): a short text and the gzip'ed XML."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = (
        f"Report Domain: {report.policy_domain} Submitter: {receiver} "
        f"Report-ID: <{report.report_id}>"
    )
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = f"<{report.report_id}@{receiver}>"
    msg.set_content(
        f"DMARC aggregate report for {report.policy_domain} from {receiver}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(report.begin))} to "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(report.end))} UTC.\n"
    )
    name = f"{receiver}!{report.policy_domain}!{report.begin}!{report.end}.xml.gz"
    msg.add_attachment(
        gzip.compress(report.xml, mtime=0),
        maintype="application",
        subtype="gzip",
        filename=name,
    )
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
