"""The ``postroom`` command line: argument parsing and exit codes only.

Exit status: 0 success, 1 failure at run time, 2 bad usage or bad config (one line on stderr
naming the key or argument). ``-c/--config`` may stand before or after the subcommand. Commands
other than ``serve`` work on the on-disk state directly, so they work whether or not a server
runs; ``queue flush`` and ``queue delete`` go through the server's control socket when it is up,
so that a running server acts at once and never delivers half of a deleted message.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import socket
import sys
from collections.abc import Sequence

from postroom import config as config_mod
from postroom.config import Config
from postroom.errors import AccountError, ConfigError, PostroomError, QueueError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"postroom: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        dest="config_sub",
        # Not None: each nested parser would then reset what an outer one read
        # ("postroom user -c FILE list" lost its -c).
        default=argparse.SUPPRESS,
        help="config file (default: $POSTROOM_CONFIG, ./postroom.toml, built-in)",
    )
    p = _Parser(prog="postroom", description="A small mail server: SMTP, POP3, queue, Maildir.")
    p.add_argument("-c", "--config", default=None, help="config file")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("serve", parents=[common], help="run the server in the foreground")

    user = sub.add_parser("user", parents=[common], help="manage users").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    for name in ("add", "passwd"):
        cmd = user.add_parser(name, parents=[common])
        cmd.add_argument("address")
        cmd.add_argument(
            "--password-stdin",
            action="store_true",
            help="read one line from stdin instead of prompting",
        )
    user.add_parser("del", parents=[common]).add_argument("address")
    user.add_parser("list", parents=[common])

    alias = sub.add_parser("alias", parents=[common], help="manage aliases").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    add = alias.add_parser("add", parents=[common])
    add.add_argument("alias")
    add.add_argument("targets", nargs="+")
    alias.add_parser("del", parents=[common]).add_argument("alias")
    alias.add_parser("list", parents=[common])

    queue = sub.add_parser("queue", parents=[common], help="inspect the queue").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    qlist = queue.add_parser("list", parents=[common])
    qlist.add_argument("--json", action="store_true")
    queue.add_parser("show", parents=[common]).add_argument("id")
    queue.add_parser("flush", parents=[common])
    queue.add_parser("delete", parents=[common]).add_argument("id")

    dbc = sub.add_parser(
        "db", parents=[common], help="the PostgreSQL schema ([storage] backend = postgresql)"
    ).add_subparsers(dest="action", required=True, parser_class=_Parser)
    dbc.add_parser("migrate", parents=[common], help="apply pending schema migrations")
    dbc.add_parser("check", parents=[common], help="connectivity, schema version, pending")
    imp = dbc.add_parser(
        "import", parents=[common], help="copy a local node's accounts and Maildirs in"
    )
    imp.add_argument(
        "data_dir", nargs="?", default=None, help="the local node's data_dir (default: data_dir)"
    )
    return p


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
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
    return password


def _iso(ts: float | None) -> str | None:
    if ts is None or ts == 0:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _control(cfg: Config, command: str) -> str | None:
    """Send a command to a running server; None when no server is listening. A server that
    listens but does not answer is an error: acting on the files behind its back is not safe."""
    path = cfg.data_dir / "control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(path))
            s.sendall(command.encode() + b"\n")
            return s.makefile().readline().strip()
    except (FileNotFoundError, ConnectionRefusedError):
        return None  # no socket, or a stale one left by a server that is gone
    except OSError as exc:
        raise QueueError(f"the running server did not answer: {exc}") from None


def _cmd_user(cfg: Config, args: argparse.Namespace) -> int:
    from postroom.storage import factory
    from postroom.storage.local.accounts import account_address

    stores = factory.open_admin(cfg)
    try:
        accounts = stores.accounts
        if args.action == "list":
            for name in accounts.list_users():
                print(name)
            return 0
        addr = account_address(args.address, cfg.domains)
        if args.action == "add":
            if accounts.user_exists(addr.key):
                raise AccountError(f"user {addr.key} already exists")
            accounts.add_user(addr, _read_password(args))
            stores.create_mailbox(addr.key)
        elif args.action == "passwd":
            if not accounts.user_exists(addr.key):
                raise AccountError(f"no such user {addr.key}")
            accounts.set_password(addr, _read_password(args))
        elif args.action == "del":
            for alias in accounts.delete_user(addr) or ():
                print(f"removed {addr.key} from alias {alias}")
    finally:
        stores.close()
    return 0


def _alias_target(text: str) -> str:
    from postroom.address import parse_user_address
    from postroom.errors import AddressError

    try:
        return str(parse_user_address(text))
    except AddressError as exc:
        raise AccountError(f"malformed target {text!r}: {exc}") from None


def _cmd_alias(cfg: Config, args: argparse.Namespace) -> int:
    from postroom.storage import factory
    from postroom.storage.local.accounts import account_address

    stores = factory.open_admin(cfg)
    try:
        accounts = stores.accounts
        if args.action == "list":
            for alias, targets in accounts.list_aliases().items():
                print(f"{alias}\t{' '.join(targets)}")
            return 0
        addr = account_address(args.alias, cfg.domains)
        if args.action == "add":
            targets = []
            for t in args.targets:
                target = _alias_target(t)
                local, _, domain = target.rpartition("@")
                # Local targets are stored in their key form, remote ones as typed.
                targets.append(f"{local.lower()}@{domain}" if domain in cfg.domains else target)
            accounts.add_alias(addr, targets)
        else:
            accounts.delete_alias(addr)
    finally:
        stores.close()
    return 0


def _cmd_queue(cfg: Config, args: argparse.Namespace) -> int:
    from postroom.queue.store import Envelope, QueueStore

    store = QueueStore(cfg.data_dir / "queue")
    if args.action == "flush":
        answer = _control(cfg, "flush")
        if answer is None:
            # No server running: make every message due; the next serve tries at once.
            for env in store.iter_envelopes():
                if isinstance(env, Envelope) and env.attempts:
                    env.next_attempt = 0
                    store.save_state(env)
        return 0
    if args.action == "delete":
        answer = _control(cfg, f"delete {args.id}")
        if answer is None:
            store.remove(args.id)
        elif answer != "ok":
            raise QueueError(f"no such message {args.id}")
        return 0
    if args.action == "show":
        env = store.load(args.id)
        print(
            f"id: {env.id}\nsender: <{env.sender}>\ncreated: {_iso(env.created)}\n"
            f"size: {env.size}\nattempts: {env.attempts}\n"
            f"next_attempt: {_iso(env.next_attempt) or '-'}"
        )
        for r in env.recipients:
            print(
                f"recipient: <{r.address}> {r.status}"
                + (f" ({r.last_error})" if r.last_error else "")
            )
        print()
        head = store.message_head(env)
        end = head.find(b"\r\n\r\n")
        sys.stdout.write(
            head[: end + 2 if end >= 0 else len(head)]
            .decode("utf-8", "replace")
            .replace("\r\n", "\n")
        )
        return 0
    envelopes = [e for e in store.iter_envelopes() if isinstance(e, Envelope)]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": e.id,
                        "sender": e.sender,
                        "created": _iso(e.created),
                        "attempts": e.attempts,
                        "next_attempt": _iso(e.next_attempt),
                        "recipients": [
                            {"address": r.address, "status": r.status, "last_error": r.last_error}
                            for r in e.recipients
                        ],
                    }
                    for e in envelopes
                ],
                indent=2,
            )
        )
        return 0
    for e in envelopes:
        errors = "; ".join(r.last_error for r in e.recipients if r.last_error)
        print(
            "\t".join(
                [
                    e.id,
                    _iso(e.created) or "-",
                    str(e.size),
                    f"<{e.sender}>",
                    ",".join(r.address for r in e.recipients),
                    _iso(e.next_attempt) or "-",
                    errors or "-",
                ]
            )
        )
    return 0


def _cmd_db(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.storage.backend != "postgresql" or cfg.storage.url is None:
        where = cfg.path or "<embedded default>"
        raise ConfigError(f'{where}: storage.backend: the db commands need "postgresql"')
    from pathlib import Path

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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_mod.load_effective(getattr(args, "config_sub", None) or args.config)
    except ConfigError as exc:
        print(f"postroom: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            from postroom import app

            return app.run(cfg)
        # Import what the commands use before dropping root: the new user may not be able to
        # read the Python installation's files (a pyenv under /root, say).
        import postroom.queue.store
        import postroom.storage.local.accounts
        import postroom.storage.local.maildir  # noqa: F401
        from postroom import privileges

        privileges.drop_for_cli(cfg)
        if args.command == "user":
            return _cmd_user(cfg, args)
        if args.command == "alias":
            return _cmd_alias(cfg, args)
        if args.command == "db":
            return _cmd_db(cfg, args)
        return _cmd_queue(cfg, args)
    except ConfigError as exc:
        print(f"postroom: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # "postroom queue list | head": the reader is gone; say nothing more (as cat does),
        # and keep Python's exit-time flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (PostroomError, OSError) as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
