"""Moving a mailbox over from Dovecot: copy a Maildir and keep each message's POP3 UIDL.

POP3 clients (fetchmail, Outlook, phones) remember which messages they have downloaded by
UIDL (RFC 1939 §7). Dovecot derives a message's UIDL from ``pop3_uidl_format`` (default
``%08Xu%08Xv``: its IMAP UID and the mailbox's UIDVALIDITY, both from ``dovecot-uidlist``) or
serves a value stored as the ``P`` extension of the message's ``dovecot-uidlist`` line (after a
migration, or with ``pop3_save_uidl``). :func:`import_maildir` computes the UIDL Dovecot
reports for every message it has listed, copies the message into a postroom Maildir the way
postroom stores its own (LF line ends, ``,S=`` file size and ``,W=`` size as POP3 sends it),
and records the UIDL in the mailbox's UIDL map (:data:`UIDL_MAP`, one ``unique-name TAB uidl``
line per message), which the POP3 maildrop reads: so a client downloads nothing twice. A
message Dovecot never listed was never seen by a POP3 client and keeps postroom's own UIDL.

Copies are named from UIDVALIDITY and UID, so that they sort (and POP3 numbers them) in
Dovecot's order; a message Dovecot has not listed yet, from a digest of its source name (never
from a guessed UID, which Dovecot may later give another message). Every copy is remembered by
its source name (:data:`IMPORTED_MAP`): a second run (at the switch) skips what the first
copied, whatever Dovecot numbered meanwhile, and gives a copy that was unlisted then the UIDL
Dovecot has given it since (a client may have fetched it from Dovecot in between). The source
is only read. :func:`parse_uidlist` and :func:`format_uidl` are pure; the rest is file work.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from postroom.errors import ImportSourceError
from postroom.storage.local import files, maildir
from postroom.wire.framing import to_crlf

UIDL_MAP = ".postroom-uidl"
IMPORTED_MAP = ".postroom-imported"  # source base name TAB the copy's unique name
DEFAULT_UIDL_FORMAT = "%08Xu%08Xv"  # Dovecot's pop3_uidl_format default


@dataclass(frozen=True, slots=True)
class UidlistEntry:
    uid: int
    filename: str  # the base name Dovecot recorded (without ``:2,`` flags)
    ext: dict[str, str] = field(default_factory=dict)  # P (POP3 UIDL), G (GUID), W, S, ...


@dataclass(frozen=True, slots=True)
class Uidlist:
    version: int
    uidvalidity: int
    next_uid: int
    entries: tuple[UidlistEntry, ...]


def parse_uidlist(text: str) -> Uidlist:
    """Dovecot's ``dovecot-uidlist`` (versions 1 and 3)."""
    lines = text.splitlines()
    if not lines:
        raise ImportSourceError("dovecot-uidlist is empty")
    head = lines[0].split()
    try:
        version = int(head[0])
        if version == 1:
            uidvalidity, next_uid = int(head[1]), int(head[2])
        elif version == 3:
            fields = {h[0]: h[1:] for h in head[1:] if h}
            uidvalidity, next_uid = int(fields["V"]), int(fields.get("N", "0"))
        else:
            raise ImportSourceError(f"dovecot-uidlist version {version} is not supported")
    except (IndexError, KeyError, ValueError) as exc:
        if isinstance(exc, ImportSourceError):
            raise
        raise ImportSourceError(f"bad dovecot-uidlist header: {lines[0]!r}") from None
    entries = []
    for line in lines[1:]:
        if not line.strip():
            continue
        uid_text, _, rest = line.partition(" ")
        if not (uid_text.isascii() and uid_text.isdigit()):
            continue
        ext: dict[str, str] = {}
        if version == 3:
            # "<uid> [<ext> ...] :<filename>": each extension is a key letter and its value
            # (a P value may hold ":"), the file name the first word that starts with ":".
            words = rest.split(" ")
            at = next((i for i, w in enumerate(words) if w.startswith(":")), None)
            if at is None:
                name = rest
            else:
                name = " ".join(words[at:])[1:]
                for token in words[:at]:
                    if token:
                        ext[token[0]] = token[1:]
        else:
            name = rest
        entries.append(UidlistEntry(int(uid_text), name.strip(), ext))
    return Uidlist(version, uidvalidity, next_uid, tuple(entries))


_VAR = re.compile(r"%(%|\{([a-z]+)\}|(-?)(0?)(\d*)([LUX]*)([uvfgm]))")
_LONG = {"uid": "u", "uidvalidity": "v", "filename": "f", "guid": "g", "md5": "m"}


def format_uidl(fmt: str, uid: int, uidvalidity: int, filename: str, guid: str | None) -> str:
    """Expand a Dovecot ``pop3_uidl_format`` (``%u`` UID, ``%v`` UIDVALIDITY, ``%f`` file name,
    ``%g`` GUID; modifiers ``X`` hex, ``L``/``U`` case, a width with ``0`` padding)."""

    def one(m: re.Match[str]) -> str:
        if m.group(1) == "%":
            return "%"
        var = _LONG.get(m.group(2) or "", m.group(7) or "")
        mods = m.group(6) or ""
        if var == "u":
            value: str | int = uid
        elif var == "v":
            value = uidvalidity
        elif var == "f":
            value = filename
        elif var == "g":
            value = guid or filename  # Dovecot: the uidlist's G, else the Maildir base name
        else:
            raise ImportSourceError(f"pop3_uidl_format: %{m.group(0)[1:]} cannot be reproduced")
        text = f"{value:x}" if "X" in mods and isinstance(value, int) else str(value)
        if "L" in mods:
            text = text.lower()
        if "U" in mods:
            text = text.upper()
        width = int(m.group(5) or 0)
        if m.group(3) == "-":
            return text.ljust(width)
        return text.rjust(width, "0" if m.group(4) else " ")

    if "%" in _VAR.sub("", fmt):
        raise ImportSourceError(f"pop3_uidl_format: cannot read {fmt!r}")
    return _VAR.sub(one, fmt)


def load_uidl_map(box: Path) -> dict[str, str]:
    """The UIDLs a mailbox keeps for imported messages: Maildir unique name -> UIDL."""
    return _load_map(box / UIDL_MAP)


def _load_map(path: Path) -> dict[str, str]:
    """A ``key TAB value`` file (:data:`UIDL_MAP`, :data:`IMPORTED_MAP`); empty if absent."""
    try:
        text = path.read_text("utf-8", "surrogateescape")
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        key, tab, value = line.partition("\t")
        if tab and value:
            out[key] = value
    return out


def _save_map(path: Path, entries: dict[str, str]) -> None:
    """Replace ``path`` with ``entries``, durably (written whole, synced, renamed over)."""
    body = "".join(f"{k}\t{v}\n" for k, v in sorted(entries.items()))
    data = body.encode("utf-8", "surrogateescape")
    files.replace_durably(path, data, path.with_name(path.name + ".tmp"))


@dataclass
class Report:
    imported: int = 0
    skipped: int = 0  # already imported by an earlier run
    unlisted: int = 0  # not in dovecot-uidlist: they keep postroom's own UIDL


def _messages(src: Path) -> Iterator[tuple[str, str]]:
    for sub in ("cur", "new"):
        for name in sorted(os.listdir(src / sub)):
            if not name.startswith("."):
                yield sub, name


def _base(name: str) -> str:
    return name.split(":2,", 1)[0]


def import_maildir(
    src: Path, box: Path, hostname: str, uidl_format: str = DEFAULT_UIDL_FORMAT
) -> Report:
    """Copy the Dovecot Maildir ``src`` into postroom's Maildir ``box`` (see the module doc)."""
    if not (src / "cur").is_dir() or not (src / "new").is_dir():
        raise ImportSourceError(f"{src} is not a Maildir (no cur/ and new/)")
    format_uidl(uidl_format, 1, 1, "x", None)  # a bad format fails before anything is copied
    try:
        # File names that are not UTF-8 read as the Maildir's own names are (surrogateescape).
        text = (src / "dovecot-uidlist").read_text("utf-8", "surrogateescape")
        uidlist: Uidlist | None = parse_uidlist(text)
    except FileNotFoundError:
        uidlist = None
    listed: dict[str, UidlistEntry] = {}
    if uidlist is not None:
        for entry in uidlist.entries:
            listed[_base(entry.filename)] = entry
    found = list(_messages(src))
    # Named from a time no later than the oldest message, so that later mail sorts after.
    stamps = [int(n.split(".", 1)[0]) for _s, n in found if n.split(".", 1)[0].isdigit()]
    epoch = uidlist.uidvalidity if uidlist is not None else 0
    if not 0 < epoch <= time.time():
        epoch = min(stamps, default=int(time.time()))
    tag = f"V{uidlist.uidvalidity}" if uidlist is not None else "V0"
    host = maildir._host_part(hostname)
    maildir.ensure(box)
    uidls = load_uidl_map(box)
    imported = _load_map(box / IMPORTED_MAP)
    existing = {_base(n).split(",", 1)[0] for _s, n in _messages(box)}
    report = Report()
    order = sorted(
        found,
        key=lambda sn: (
            _base(sn[1]) not in listed,
            listed[_base(sn[1])].uid if _base(sn[1]) in listed else 0,
            sn[1],
        ),
    )
    plan: list[tuple[str, str, str]] = []
    for sub, name in order:
        source = _base(name)
        found_entry = listed.get(source)
        if found_entry is None:
            report.unlisted += 1
            digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()
            unique = f"{epoch}.I{tag}X{digest[:16]}.{host}"  # after the listed ones
        else:
            unique = f"{epoch}.I{tag}U{found_entry.uid:010d}.{host}"
        unique = imported.get(source, unique)  # copied by an earlier run: under that name
        if found_entry is not None and uidlist is not None:
            uidls[unique] = found_entry.ext.get("P") or format_uidl(
                uidl_format, found_entry.uid, uidlist.uidvalidity, source, found_entry.ext.get("G")
            )
        if unique in existing or source in imported:  # a copy a user deleted since stays gone
            report.skipped += 1
            imported[source] = unique
        else:
            plan.append((sub, name, unique))
    if uidlist is not None:
        # Written before any copy is visible: a POP3 session never sees one without its UIDL.
        _save_map(box / UIDL_MAP, uidls)
    changed: set[str] = set()
    for sub, name, unique in plan:
        data = (src / sub / name).read_bytes().replace(b"\r\n", b"\n")
        wire = len(to_crlf(data)) + (2 if data and not data.endswith(b"\n") else 0)
        target = f"{unique},S={len(data)},W={wire}"
        if ":2," in name:
            target += ":2," + name.split(":2,", 1)[1]
        tmp = box / "tmp" / target.split(":", 1)[0]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            files.write_all(fd, [data])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, box / sub / target)
        changed.add(sub)
        report.imported += 1
        imported[_base(name)] = unique
    for sub in changed:
        files.fsync_dir(box / sub)
    # After the copies: one made before a crash here is found again by its name.
    _save_map(box / IMPORTED_MAP, imported)
    return report
