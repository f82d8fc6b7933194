"""postroom under test: a config TOML, users via the CLI, ``serve`` as a child.

The command defaults to ``<this python> -m postroom`` with the repository's ``src/`` first on
PYTHONPATH (so an uninstalled checkout works); ``--postroom-cmd`` overrides it, e.g. with an
installed ``postroom`` script.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from benchlib import maildir
from benchlib.proc import BenchError, Cleanup, run, start_daemon, stop_process, wait_port
from benchlib.servers import PASSWORD, Addr, Server

REPO = Path(__file__).resolve().parents[2]
PORT_SMTP = 2525
PORT_SUBMISSION = 2587
PORT_POP3 = 2110
PORTS = {"smtp": PORT_SMTP, "submission": PORT_SUBMISSION, "pop3": PORT_POP3}
# If serve fails with every service (one may not be implemented yet), try again with fewer.
FALLBACKS = (("smtp", "submission", "pop3"), ("smtp", "submission"), ("smtp",))


@dataclass(frozen=True)
class PostroomSpec:
    """Where one postroom instance lives and what it serves."""

    root: Path
    host: str
    hostname: str
    domain: str
    cert: Path
    key: Path
    nameserver: str | None = None
    delivery_port: int | None = None
    services: tuple[str, ...] = ("smtp", "submission", "pop3")
    workers: int | None = None  # None: postroom's default
    pin_cpus: bool = False
    checks: bool = True  # [auth] checks: SPF, DKIM, DMARC on the smtp port
    dkim_sign: bool = True  # [auth] dkim_sign
    name: str = "postroom"  # how the results name this instance
    extra_toml: str = ""  # more tables, e.g. [storage] for a node on PostgreSQL


def command(override: str | None) -> list[str]:
    return shlex.split(override) if override else [sys.executable, "-m", "postroom"]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def config_toml(spec: PostroomSpec) -> str:
    """The config: the basic keys, plus ``[auth] allow_plaintext`` (for plaintext POP3),
    ``workers``/``pin_cpus`` only where ``bench/run.py`` was told (else postroom's defaults,
    which are what a user gets), and the sender-authentication switches ``[auth] checks`` and
    ``dkim_sign``."""
    host = spec.host
    lines = [
        f'hostname = "{spec.hostname}"',
        f'domains = ["{spec.domain}"]',
        f'data_dir = "{spec.root / "data"}"',
        *([f"workers = {spec.workers}"] if spec.workers is not None else []),
        *(["pin_cpus = true"] if spec.pin_cpus else []),
        "",
        "[listen]",
        *(f'{name} = ["{host}:{PORTS[name]}"]' for name in spec.services),
        "",
        "[tls]",
        f'cert = "{spec.cert}"',
        f'key = "{spec.key}"',
        "",
        "[limits]",
        'message_size = "50MB"',
        "max_recipients = 1000",
        "",
        "[auth]",
        "allow_plaintext = true",
        f"checks = {'true' if spec.checks else 'false'}",
        f"dkim_sign = {'true' if spec.dkim_sign else 'false'}",
    ]
    if spec.nameserver:
        lines += ["", "[dns]", f'nameservers = ["{spec.nameserver}"]']
    if spec.delivery_port:
        lines += [
            "",
            "[delivery]",
            f"port = {spec.delivery_port}",
            'retry_intervals = ["1s", "2s", "5s"]',
        ]
    if spec.extra_toml:
        lines += ["", spec.extra_toml]
    return "\n".join(lines) + "\n"


def start_postroom(
    spec: PostroomSpec, mail_users: list[str], cleanup: Cleanup, cmd_override: str | None = None
) -> Server:
    """Write the config, add users with ``user add --password-stdin``, run ``serve``.

    When ``serve`` dies at start-up, retry with fewer services (see FALLBACKS) and say so.
    """
    spec.root.mkdir(parents=True, exist_ok=True)
    base, env = command(cmd_override), environment()
    config = spec.root / "postroom.toml"
    config.write_text(config_toml(spec))
    for user in mail_users:
        run(
            [*base, "user", "add", user, "--password-stdin", "-c", str(config)],
            stdin=PASSWORD + "\n",
            env=env,
        )
    error: BenchError | None = None
    for services in FALLBACKS:
        attempt = replace(spec, services=services)
        config.write_text(config_toml(attempt))
        try:
            server = _serve(attempt, config, base, env, cleanup)
        except BenchError as exc:
            error = exc
            print(
                f"bench: postroom {spec.host} with {'+'.join(services)} failed: "
                f"{str(exc).splitlines()[-1][:300]}",
                flush=True,
            )
            continue
        for user in mail_users:
            maildir.ensure(server.mailbox(user))
        if services != FALLBACKS[0]:
            server.notes.append(
                f"postroom {spec.host} ran with {'+'.join(services)} only: "
                f"{str(error).splitlines()[-1][:200]}"
            )
        return server
    assert error is not None
    raise error


def _serve(
    spec: PostroomSpec, config: Path, base: list[str], env: dict[str, str], cleanup: Cleanup
) -> Server:
    log = spec.root / "postroom.log"
    proc = start_daemon(
        [*base, "serve", "-c", str(config)], log, cleanup, f"postroom {spec.host}", env=env
    )
    server = Server(
        name=spec.name,
        mail_root=spec.root / "data" / "mail",
        smtp=Addr(spec.host, PORT_SMTP),
        proc=proc,
        log=log,
    )
    try:
        wait_port(spec.host, PORT_SMTP, proc=proc, log=log)
        if "submission" in spec.services:
            wait_port(spec.host, PORT_SUBMISSION, timeout=10, proc=proc, log=log)
            server.submission = Addr(spec.host, PORT_SUBMISSION)
        if "pop3" in spec.services:
            wait_port(spec.host, PORT_POP3, timeout=10, proc=proc, log=log)
            server.pop3 = Addr(spec.host, PORT_POP3)
    except BenchError:
        stop_process(proc)
        raise
    return server
