"""The ``postroom`` command line: argument parsing and exit codes only.

Exit status: 0 success, 1 failure at run time, 2 bad usage or bad config (one line on stderr
naming the key or argument). ``-c/--config`` may stand before or after the subcommand. Commands
other than ``serve`` work on the stores directly (``storage/factory.py``), so they work whether
or not a server runs. Locally ``queue flush`` and ``queue delete`` go through the server's control
socket when it is up, so that a running server acts at once and never delivers half of a deleted
message; on PostgreSQL they change the shared queue, and a NOTIFY tells every running node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import getpass
import json
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from postroom import __version__, early_signals, logs
from postroom import config as config_mod
from postroom.config import Config
from postroom.errors import AccountError, ConfigError, PostroomError, QueueError
from postroom.queue.envelope import Attempt, Envelope, check_id
from postroom.storage.local import files

if TYPE_CHECKING:
    from postroom.auth.service import SenderAuth
    from postroom.storage.factory import AdminStores
    from postroom.storage.interfaces import MessageQueue


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        _stderr(f"postroom: error: {message}")
        sys.exit(2)


def _stderr(line: str) -> None:
    """One line to the admin's terminal: what it quotes (a key, a file name, an ID, from a
    file or an argument) may hold a line end or a terminal's escape, shown as "?"."""
    print(logs.printable(line), file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        dest="config_sub",
        metavar="FILE",
        # Not None: each nested parser would then reset what an outer one read
        # ("postroom user -c FILE list" lost its -c).
        default=argparse.SUPPRESS,
        help="config file (default: $POSTROOM_CONFIG, ./postroom.toml, built-in)",
    )
    p = _Parser(prog="postroom", description="A small mail server: SMTP, POP3, queue, Maildir.")
    p.add_argument("-c", "--config", metavar="FILE", default=None, help="config file")
    p.add_argument("--version", action="version", version=f"postroom {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(
        group: argparse._SubParsersAction[_Parser], name: str, text: str
    ) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=[common], help=text, description=text)

    command(sub, "serve", "run the server in the foreground")

    user = command(sub, "user", "manage users").add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    for name, text in (("add", "add a user"), ("passwd", "set a user's password")):
        cmd = command(user, name, text)
        cmd.add_argument("address", help="the user's address (their login)")
        cmd.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password as one line from stdin instead of prompting (without a "
            "terminal stdin is read anyway)",
        )
        cmd.add_argument(
            "--allow-short",
            action="store_true",
            help="accept a password shorter than 6 characters",
        )
    cmd = command(user, "del", "delete a user (and take it out of every alias)")
    cmd.add_argument("address")
    command(user, "list", "list the users")

    alias = command(sub, "alias", "manage aliases").add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    add = command(alias, "add", "make ALIAS deliver to every TARGET")
    add.add_argument("alias")
    add.add_argument(
        "targets", nargs="+", metavar="TARGET", help="a user, an alias or a remote address"
    )
    command(alias, "del", "delete an alias").add_argument("alias")
    command(alias, "list", "list the aliases and their targets")

    queue = command(sub, "queue", "inspect the queue").add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    qlist = command(queue, "list", "list the queued messages, one line each")
    qlist.add_argument("--json", action="store_true", help="print a JSON array instead")
    qshow = command(queue, "show", "show a message's envelope, state, attempts, advice and headers")
    qshow.add_argument("id")
    qshow.add_argument(
        "--json", action="store_true", help="print a JSON object with the attempts instead"
    )
    command(queue, "flush", "retry every deferred message now")
    command(queue, "delete", "remove a message without a bounce").add_argument("id")

    dns_cmd = command(sub, "dns", "DNS records to publish for a domain")
    dns_cmd.add_argument("domain")
    dns_cmd.add_argument("--json", action="store_true", help="print a JSON array instead")
    dns_cmd.add_argument("--check", action="store_true", help="compare with what DNS answers")

    dkim = command(sub, "dkim", "DKIM keys").add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    command(dkim, "rotate", "make new DKIM keys for a domain").add_argument("domain")

    dbc = command(sub, "db", 'the PostgreSQL schema ([storage] backend = "postgresql")')
    dbc_actions = dbc.add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    command(dbc_actions, "migrate", "apply pending schema migrations")
    command(dbc_actions, "check", "connectivity, schema version, pending migrations")
    command(
        dbc_actions, "import", "copy a local node's accounts and Maildirs into the database"
    ).add_argument(
        "data_dir", nargs="?", default=None, help="the local node's data_dir (default: data_dir)"
    )

    dmarc = command(sub, "dmarc", "DMARC reports").add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    command(dmarc, "report", "send the DMARC aggregate reports").add_argument(
        "--now", action="store_true", required=True, help="send the aggregate reports now"
    )

    imp = command(
        sub,
        "import-maildir",
        "copy a Dovecot Maildir into a user's mailbox, keeping the POP3 UIDLs",
    )
    imp.add_argument("address", help="the (existing) user the mail is for")
    imp.add_argument("maildir", help="the Dovecot Maildir (with cur/, new/, dovecot-uidlist)")
    imp.add_argument(
        "--uidl-format",
        default="%08Xu%08Xv",
        help="Dovecot's pop3_uidl_format for that mailbox (default: Dovecot's, %%08Xu%%08Xv)",
    )
    return p


def _cmd_import(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.storage.backend != "local":
        # The mailboxes are rows then: import into a local data_dir, then `db import` it.
        raise ConfigError(
            "import-maildir writes local Maildirs: with PostgreSQL, import into a local "
            "data_dir first and load it with `postroom db import DIR`"
        )
    from postroom.storage.local import maildir
    from postroom.storage.local.accounts import Accounts, account_address
    from postroom.storage.local.dovecot_import import import_maildir

    addr = account_address(args.address, cfg.domains)
    if not Accounts(cfg.data_dir).user_exists(addr.key):
        raise AccountError(f"no such user {addr.key}")
    box = maildir.mailbox_path(cfg.data_dir, addr.key)
    report = import_maildir(Path(args.maildir), box, cfg.hostname, args.uidl_format)
    print(
        f"{addr.key}: {report.imported} messages imported, {report.skipped} already there"
        + (f", {report.unlisted} not listed in dovecot-uidlist" if report.unlisted else "")
    )
    return 0


def _read_password(args: argparse.Namespace) -> str:
    from postroom import passwords

    if sys.stdin is None:
        raise AccountError("no password: stdin is closed")
    if args.password_stdin or not sys.stdin.isatty():
        # Without a terminal there is nothing to prompt on (getpass would warn and read stdin
        # anyway): the first line is the password; a second one, answering "Again", must match.
        line = sys.stdin.readline(passwords.MAX_LENGTH + 3)  # (+ CR LF, + one too many)
        if not line:
            raise AccountError("no password typed: stdin is empty")
        password = line.rstrip("\r\n")
        if not args.password_stdin:
            again = sys.stdin.readline(passwords.MAX_LENGTH + 3)
            if again and again.rstrip("\r\n") != password:
                raise AccountError("passwords do not match")
    else:
        try:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                raise AccountError("passwords do not match")
        except EOFError:
            raise AccountError("no password typed (without a terminal: --password-stdin)") from None
    if not password:
        raise AccountError("empty password")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 came in as surrogates
        raise AccountError("the password is not valid UTF-8") from None
    try:
        passwords.check_new(password, args.allow_short)
    except passwords.PasswordError as exc:
        raise AccountError(str(exc)) from None
    return password  # as typed: the store prepares it, and keeps SCRAM keys of that form too


def _iso(ts: float | None) -> str | None:
    if ts is None or ts == 0:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _next_iso(ts: float) -> str:
    """When the next attempt is due; a message due at once (``queue flush``, or waiting for a
    server to run) is due now."""
    return _iso(ts or time.time()) or ""


def _control_sockets(cfg: Config) -> list[Path]:
    """The control sockets of the running server's workers, the primary's first."""
    others = sorted(cfg.data_dir.glob("control-*.sock"))
    return [cfg.data_dir / "control.sock", *others]


def _control(cfg: Config, command: str, path: Path | None = None) -> str | None:
    """Send a command to a running server; None when no server is listening. A server that
    listens but does not answer is an error: acting on the files behind its back is not safe."""
    path = path or cfg.data_dir / "control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            with files.unix_address(path) as address:
                s.connect(address)
            s.sendall(command.encode() + b"\n")
            return s.makefile().readline().strip()
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # no socket, or a stale one left by a server that is gone
    except OSError as exc:
        raise QueueError(f"the running server did not answer: {exc}") from None


def _cmd_user(stores: AdminStores, args: argparse.Namespace) -> int:
    from postroom.storage.aliases import account_address

    cfg = stores.cfg
    accounts = stores.accounts
    if args.action == "list":
        for name in accounts.list_users():
            print(logs.printable(name))  # (one made before a name was checked, or by hand)
        return 0
    if args.action == "add":
        addr = account_address(args.address, cfg.domains)
    else:
        addr = account_address(args.address, _with_its_domain(args.address, cfg.domains))
    if args.action == "add":
        if accounts.user_exists(addr.key):
            raise AccountError(f"user {addr.key} already exists")
        password = _read_password(args)
        # The Maildir first: made after the account, a failure (a full disk, `mail` not a
        # directory) said "error" and exit 1 for a user that then existed.
        stores.create_mailbox(addr.key)
        accounts.add_user(addr, password)
        targets = accounts.alias_targets(addr.key)
        if targets and addr.key not in targets:  # the alias wins: this mailbox gets nothing
            print(
                f"postroom: warning: {addr.key} is also an alias (to {', '.join(targets)}): its"
                f" mail goes there, not to this mailbox, until `alias add {addr.key} {addr.key}`"
                f" or `alias del {addr.key}`",
                file=sys.stderr,
            )
    elif args.action == "passwd":
        if not accounts.user_exists(addr.key):
            raise AccountError(f"no such user {addr.key}")
        accounts.set_password(addr, _read_password(args))
    elif args.action == "del":
        _print_removed(accounts.delete_user(addr))
    return 0


def _alias_target(text: str) -> str:
    from postroom.address import parse_user_address
    from postroom.errors import AddressError

    try:
        return str(parse_user_address(text))
    except AddressError as exc:
        raise AccountError(f"malformed target {text!r}: {exc}") from None


def _cmd_alias(stores: AdminStores, args: argparse.Namespace) -> int:
    from postroom.storage.aliases import alias_key

    accounts = stores.accounts
    if args.action == "list":
        for alias, targets in accounts.list_aliases().items():
            # A remote target may hold what a terminal acts on (a right-to-left override).
            print(logs.printable(f"{alias}\t{' '.join(targets)}", keep="\t"))
        return 0
    if args.action == "add":
        key = alias_key(args.alias, stores.cfg.domains)  # "@domain": the domain's catch-all
        accounts.add_alias(key, [_alias_target(t) for t in args.targets])
        goes_to = accounts.alias_targets(key)
        if accounts.user_exists(key) and key not in goes_to:  # as `user add` says of it
            print(
                f"postroom: warning: {key} is also a user: its mail now goes to"
                f" {', '.join(goes_to)}, not to its mailbox, until `alias add {key} {key}`"
                f" or `alias del {key}`",
                file=sys.stderr,
            )
    else:
        key = alias_key(args.alias, _with_its_domain(args.alias, stores.cfg.domains))
        _print_removed(accounts.delete_alias(key))
    return 0


def _with_its_domain(text: str, domains: Sequence[str]) -> list[str]:
    """``domains`` and the one ``text`` names: an account or alias of a domain taken out of
    `domains` stays in the store until deleted, and `user del`, `user passwd`, `alias del`
    must reach it (they said "not one of the local domains" for ever). One that does not
    exist is "no such user" / "no such alias" then, exit 1 as before."""
    from postroom.address import normalise_domain

    try:
        return [*domains, normalise_domain(text.rpartition("@")[2])]
    except ValueError:  # (malformed: the parse says so)
        return list(domains)


def _print_removed(removed: list[tuple[str, str]]) -> None:
    for target, alias in removed:
        print(f"removed {target} from alias {alias}")


def print_json_list(items: Iterable[object]) -> None:
    """Print what ``json.dumps(list(items), indent=2)`` makes, one item at a time: the whole
    text of a queue of 100,000 messages, and the encoder's pieces of it, took some 300 MB."""
    out = sys.stdout
    opening = "[\n  "
    for item in items:
        # A string's own line breaks are escaped: every "\n" here is the layout's.
        out.write(opening + json.dumps(item, indent=2).replace("\n", "\n  "))
        opening = ",\n  "
    out.write("[]\n" if opening.startswith("[") else "\n]\n")


def _queue_json(e: Envelope) -> dict[str, object]:
    """The object of ``queue list --json``; ``queue show --json`` is it plus the attempts."""
    recipients = [
        {"address": r.address, "status": r.status, "last_error": r.last_error} for r in e.recipients
    ]
    return {
        "id": e.id,
        "sender": e.sender,
        "created": _iso(e.created),
        "attempts": e.attempts,
        "next_attempt": _next_iso(e.next_attempt),
        "recipients": recipients,
    }


def _attempt_json(a: Attempt) -> dict[str, object]:
    return {
        "time": _iso(a.time),
        "recipients": a.recipients,
        "host": a.host,
        "ip": a.ip,
        "reply": a.reply,
        "tls": a.tls,
    }


def _running(cfg: Config) -> bool:
    return _control(cfg, "ping") is not None


def _advice_json(reply: str | None, domain: str) -> dict[str, str | None] | None:
    from postroom.delivery.advice import advise

    hint = advise(reply, domain)
    return (
        None if hint is None else {"cause": hint.cause, "text": hint.text, "command": hint.command}
    )


def _cmd_queue(stores: AdminStores, args: argparse.Namespace) -> int:
    cfg = stores.cfg
    if stores.postgresql:
        # Shared: the database is the truth, and NOTIFY tells every running node.
        return _show_queue(cfg, stores.queue(running=True), args)
    if args.action == "flush":
        answer = _control(cfg, "flush")
        if answer is not None and answer != "ok":  # (a server killed as it read the command)
            raise QueueError(f"the running server did not flush the queue: {answer or 'no answer'}")
        for sock in _control_sockets(cfg)[1:]:  # each worker dials its timed-out hosts again
            with contextlib.suppress(QueueError):
                _control(cfg, "unsuspend", sock)
        if answer is None:
            # No server running: make every message due; the next serve tries at once.
            due = stores.queue(running=False).flush()
            print(
                f"postroom: no server is running: the {due} deferred message(s) will be tried "
                "as soon as `postroom serve` starts"
                if due
                else "postroom: no server is running, and no message is deferred",
                file=sys.stderr,
            )
        return 0
    if args.action == "delete":
        check_id(args.id)
        answers = [_control(cfg, f"delete {args.id}", sock) for sock in _control_sockets(cfg)]
        if not any(a is not None for a in answers):
            asyncio.run(stores.queue(running=False).delete(args.id))
        elif "ok" not in answers:
            # "unknown" from each worker that answered; anything else (no answer: a server
            # killed as it read the command; an error) says nothing of the message.
            other = [a for a in answers if a is not None and a != "unknown"]
            if other:
                raise QueueError(
                    f"the running server did not delete {args.id}: {other[0] or 'no answer'}"
                )
            raise QueueError(f"no such message {args.id}")
        return 0
    return _show_queue(cfg, stores.queue(_running(cfg)), args)


def _show_queue(cfg: Config, queue: MessageQueue, args: argparse.Namespace) -> int:
    """``queue flush``/``delete`` on a shared queue, and ``list``/``show`` on any."""
    if args.action == "flush":
        due = queue.flush()
        print(
            f"postroom: {due} deferred message(s) due now, on every running node", file=sys.stderr
        )
        return 0
    if args.action == "delete":
        asyncio.run(queue.delete(args.id))
        return 0
    if args.action == "show":
        from postroom.delivery.advice import advise, sender_domain

        env = queue.load(args.id)
        domain = sender_domain(env.sender, cfg.hostname)
        if args.json:
            attempts = [
                {**_attempt_json(a), "advice": _advice_json(a.reply, domain)} for a in env.history
            ]
            shown = {**_queue_json(env), "attempts": attempts}
            print(json.dumps(shown, indent=2))
            return 0
        # Each line cleaned (logs.printable): replies, addresses and headers come from the
        # network, and the admin's terminal must not act on what they hold.
        lines = [
            f"id: {env.id}",
            f"sender: <{env.sender}>",
            f"created: {_iso(env.created)}",
            f"size: {env.size}",
            f"attempts: {env.attempts}",
            f"next_attempt: {_next_iso(env.next_attempt)}",
        ]
        for r in env.recipients:
            error = f" ({r.last_error})" if r.last_error else ""
            lines.append(f"recipient: <{r.address}> {r.status}{error}")
            hint = advise(r.last_error, domain)
            if hint is not None:
                lines.append(f"  advice: {hint.text}")
                if hint.command:
                    lines.append(f"  run: {hint.command}")
        for a in env.history:
            where = a.host or "-"
            if a.ip:
                where += f"[{a.ip}]"
            tls = " TLS" if a.tls else ""
            to = ", ".join(a.recipients)
            lines.append(f"attempt: {_iso(a.time)} {where}{tls} to {to}: {a.reply}")
        lines.append("")
        head = queue.head(env)
        if head.startswith(b"Return-Path:"):
            head = head[head.find(b"\n") + 1 :]
        end = head.find(b"\n\n")
        lines += head[: end if end >= 0 else len(head)].decode("utf-8", "replace").split("\n")
        print("\n".join(logs.printable(line, keep="\t") for line in lines))
        return 0
    envelopes = queue.entries()
    for problem in queue.problems():
        _stderr(f"postroom: {problem}")
    if args.json:
        print_json_list(_queue_json(e) for e in envelopes)
        return 0
    for e in envelopes:
        # As mailq does: the recipients still waiting (all, once none is), each error once.
        waiting = [r for r in e.recipients if not r.done] or e.recipients
        errors = "; ".join(dict.fromkeys(r.last_error for r in waiting if r.last_error))
        print(
            "\t".join(
                _cell(field)
                for field in [
                    e.id,
                    _iso(e.created) or "-",
                    str(e.size),
                    f"<{e.sender}>",
                    ",".join(r.address for r in waiting),
                    _next_iso(e.next_attempt),
                    errors or "-",
                ]
            )
        )
    return 0


def _cell(text: str) -> str:
    """A field of a ``queue list`` line: a remote reply may hold a tab (RFC 5321 §4.2
    textstring), which would add a column, or another character that is not printable (a
    terminal escape, a line separator, a bidi override); each is a space."""
    return logs.printable(text, mark=" ")


def _sender_auth(stores: AdminStores) -> SenderAuth:
    from postroom.auth.lookup import DnsCache
    from postroom.auth.service import SenderAuth

    return SenderAuth(stores.cfg, DnsCache(stores.cfg.dns), stores.keys)


def _local_domain(cfg: Config, text: str) -> str:
    from postroom.address import normalise_domain

    try:
        domain = normalise_domain(text)
    except ValueError as exc:
        raise AccountError(str(exc)) from None  # (it names the domain and why)
    if not cfg.is_local_domain(domain):
        raise AccountError(f"{domain} is not a local domain")
    if domain.startswith("["):
        raise AccountError(f"{domain} is an address literal: it has no DNS records or DKIM keys")
    return domain


def _cmd_dns(stores: AdminStores, args: argparse.Namespace) -> int:
    from postroom.auth import records

    cfg = stores.cfg
    auth = _sender_auth(stores)
    wanted = auth.records(_local_domain(cfg, args.domain))
    if args.check:
        findings = asyncio.run(records.check(auth.cache, wanted))
        if args.json:
            print(
                json.dumps(
                    [f.record.to_json() | {"status": f.status, "found": f.found} for f in findings],
                    indent=2,
                )
            )
        else:
            for finding in findings:
                print(finding.line())
        return 0 if all(f.status == "ok" for f in findings) else 1
    if args.json:
        print(json.dumps([r.to_json() for r in wanted], indent=2))
    else:
        for record in wanted:
            print(records.master_line(record))
    return 0


def _cmd_dkim(stores: AdminStores, args: argparse.Namespace) -> int:
    import time

    cfg = stores.cfg
    auth = _sender_auth(stores)
    domain = _local_domain(cfg, args.domain)
    auth.ring.ensure(domain, time.time())
    new = [k for k in auth.ring.rotate(domain, time.time()) if k.state == "pending"]
    for key in new:
        print(f"new {key.algorithm} selector {key.selector}: publish it (postroom dns {domain})")
    print("the new keys sign once the server sees them in DNS; the old ones sign until then")
    return 0


def _cmd_dmarc(stores: AdminStores) -> int:
    if not stores.cfg.auth.dmarc_reports:
        raise PostroomError("DMARC aggregate reports are off ([auth] dmarc_reports = false)")
    auth = _sender_auth(stores)
    store = stores.queue(running=True)

    async def queue(sender: str, recipients: list[str], message: bytes) -> str:
        queue_id = store.add_waiting(sender, recipients, message)
        if not stores.postgresql:
            _control(stores.cfg, f"submit {queue_id}")  # a running server sends it now
        return queue_id

    sent = asyncio.run(auth.send_reports(queue))
    print(f"{sent} DMARC aggregate report(s) queued")
    return 0


_serving = False  # ``serve``: these lines go through the server's logs (JSON lines too)


def _say(text: str, warning: bool = False) -> None:
    if _serving:
        from postroom import events

        events.startup(text, logs.WARNING if warning else logs.INFO)
    else:
        _stderr(f"postroom: {'warning: ' if warning else ''}{text}")


def _cmd_db(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.storage.backend != "postgresql" or cfg.storage.url is None:
        where = cfg.path or "<embedded default>"
        raise ConfigError(f'{where}: storage.backend: the db commands need "postgresql"')
    from postroom.storage.postgresql import maintenance

    url = cfg.storage.url
    if args.action == "migrate":
        for line in maintenance.migrate(url):
            print(line)
        return 0
    if args.action == "check":
        ok, lines = maintenance.check(url)
        for line in lines:
            print(line)
        return 0 if ok else 1
    source = Path(args.data_dir) if args.data_dir else cfg.data_dir
    for line in maintenance.import_local(url, source, cfg.domains):
        print(line)
    return 0


def _warn(text: str) -> None:
    _say(text, warning=True)


def _warnings(cfg: Config, command: str) -> None:
    """What is allowed but probably not what the admin meant."""
    source = cfg.path or "<default>"
    if os.geteuid() == 0 and cfg.user is None:
        if command == "serve":
            _warn(
                f"{source}: user: running as root without `user`: the server keeps root and "
                'what it makes belongs to root; set user = "postroom" (an account of its own)'
            )
        else:
            try:
                owner = cfg.data_dir.stat().st_uid
            except OSError:
                owner = 0
            if owner != 0:
                _warn(
                    f"{source}: user: {cfg.data_dir} belongs to uid {owner}, but this runs as "
                    "root without `user`: what it makes will belong to root; run it as the "
                    "server's user or set `user`"
                )
    if command == "serve":
        for doubt in config_mod.doubts(cfg):
            _warn(doubt)


def _where_data_is(cfg: Config) -> None:
    """Say loudly that a new, empty data directory was made, and where."""
    _say(f"created a new data directory {cfg.data_dir}")
    if cfg.path is None:
        _say(
            "(without a config file data lives in ./postroom-data of the directory a "
            f"command runs in: run every command from {cfg.data_dir.parent}, or use -c FILE)"
        )


def _run(stores: AdminStores, args: argparse.Namespace) -> int:
    if args.command == "user":
        return _cmd_user(stores, args)
    if args.command == "alias":
        return _cmd_alias(stores, args)
    if args.command == "dns":
        return _cmd_dns(stores, args)
    if args.command == "dkim":
        return _cmd_dkim(stores, args)
    if args.command == "dmarc":
        return _cmd_dmarc(stores)
    return _cmd_queue(stores, args)


def main(argv: Sequence[str] | None = None) -> int:
    files.private_umask()  # whatever the admin's umask: data_dir is the server user's only
    args = _parser().parse_args(argv)
    if args.command == "serve":
        early_signals.hold()
    try:
        after = getattr(args, "config_sub", None)  # -c after the subcommand wins
        cfg = config_mod.load_effective(after if after is not None else args.config)
        from postroom import datadir

        datadir.check(cfg)  # before anything is made: nothing is left behind
        made = datadir.create(cfg)
    except ConfigError as exc:
        _stderr(f"postroom: error: {exc}")
        return 2
    if args.command == "serve":
        global _serving
        logs.setup(cfg)
        _serving = True
    else:
        logs.setup_command()
    _warnings(cfg, args.command)
    try:
        if made:
            _where_data_is(cfg)
        if args.command == "serve":
            from postroom import app

            return app.run(cfg)
        from postroom import privileges

        if cfg.storage.backend == "postgresql":
            from postroom.storage.postgresql import db

            assert cfg.storage.url is not None
            db.remember_password(cfg.storage.url)  # the starting user's ~/.pgpass

        privileges.preload(cfg)
        privileges.drop_for_cli(cfg)
        if args.command == "db":
            return _cmd_db(cfg, args)
        if args.command == "import-maildir":
            return _cmd_import(cfg, args)
        from postroom.storage.factory import AdminStores

        stores = AdminStores(cfg)
        try:
            return _run(stores, args)
        finally:
            stores.close()
    except ConfigError as exc:
        _stderr(f"postroom: error: {exc}")
        return 2
    except BrokenPipeError:
        # "postroom queue list | head": the reader is gone; say nothing more (as cat does),
        # and keep Python's exit-time flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (PostroomError, OSError) as exc:
        _stderr(f"postroom: {exc}")
        return 1
    except sqlite3.Error as exc:  # the account store busy past its time-out, or damaged
        _stderr(f"postroom: the account store: {exc}")
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
