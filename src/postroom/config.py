"""Configuration: a TOML file (or the embedded default) turned into frozen dataclasses.

Every key is declared once, in the dataclasses below, with its type and default. An unknown key
or a value of the wrong shape raises :class:`ConfigError` naming the key, so a typo never runs
silently with a default. Durations take ``s``/``m``/``h``/``d``; sizes take ``KB``/``MB``/``GB``
(powers of 1024). Every key is documented in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postroom.address import dmarc_rua_uris
from postroom.errors import ConfigError
from postroom.storage.local import files

Endpoint = tuple[str, int]

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*$", re.IGNORECASE | re.ASCII)
_SIZE = re.compile(r"^\s*([0-9]+)\s*([KMG]?B?)\s*$", re.IGNORECASE | re.ASCII)  # not "\u212a"
_UNITS_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_UNITS_B = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1024,
    "M": 1 << 20,
    "MB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
}


class Duration(float):
    """Seconds, written in TOML as ``"90s"``, ``"5m"``, ``"1h"``, ``"5d"`` or a bare number."""


class Size(int):
    """Octets, written in TOML as ``"10MB"``, ``"512KB"`` or a bare integer."""


MAX_DURATION = 3650 * 86400.0  # ten years: longer waits only overflow date arithmetic
MAX_FILE = 16 << 20  # octets read of a config file, a certificate chain or a key, at most


def parse_duration(value: object) -> Duration:
    """Turn ``"5m"`` (or a number of seconds) into seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS_S[m.group(2).lower()]
    else:
        raise ValueError(f"expected a duration like '5m', got {value!r}")
    if not 0 <= seconds <= MAX_DURATION:  # also nan and inf, which TOML has
        raise ValueError("must be between 0 and 3650d")
    return Duration(seconds)


def parse_size(value: object) -> Size:
    """Turn ``"50MB"`` (or a number of octets) into octets."""
    if isinstance(value, bool):
        raise ValueError("expected a size like '10MB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return Size(value)
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return Size(int(m.group(1)) * _UNITS_B[m.group(2).upper()])
    raise ValueError(f"expected a size like '10MB', got {value!r}")


def parse_endpoint(value: str, default_port: int | None = None) -> Endpoint:
    """``"host:port"``, ``"[::1]:25"`` or (with a default port) ``"host"`` -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if value.startswith("[") and "]" in value:
        close = value.index("]")
        host = value[1:close]
        rest = value[close + 1 :]
        if ":" not in host:  # RFC 3986 §3.2.2: brackets hold an IPv6 address (IP-literal)
            raise ValueError(f"bad endpoint {value!r}: brackets are for an IPv6 address")
        _check_host(host, value)
        if rest.startswith(":"):
            port_text, sep = rest[1:], ":"
        elif rest == "" and default_port is not None:
            return host, default_port
        else:
            raise ValueError(f"bad endpoint {value!r}")
    elif not sep or ":" in host:
        # No colon, or a bare IPv6 address: there is no port part.
        if default_port is None:
            raise ValueError(f"expected 'host:port', got {value!r}")
        _check_host(value, value)
        return value, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {value!r}")
    if not host:
        raise ValueError(f"missing host in {value!r}")
    _check_host(host, value)
    return host, int(port_text)


_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _check_host(host: str, value: str) -> None:
    """An IP address must be a valid one (``300.1.1.1`` failed only at bind time); a name is
    taken as it is (resolved when the socket is made), unless it holds what no name can (a
    stray space failed only at bind time)."""
    if not host.isprintable() or any(c.isspace() for c in host):
        raise ValueError(f"bad host in {value!r}: a space or control character")
    if ":" in host or all(c.isdigit() or c == "." for c in host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"bad address in {value!r}") from None
        return
    try:  # (an empty or 64-octet label: the resolver's UnicodeError, a traceback at bind)
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"bad host name in {value!r}") from None
    if not _HOST_NAME.fullmatch(name):  # ("*", "[", "@", "/": no name a resolver takes)
        raise ValueError(f"bad host name in {value!r}")


def format_endpoint(host: str, port: int) -> str:
    """An endpoint as ``[listen]`` writes it: ``host:port``, ``[ipv6]:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ListenConfig:
    """Addresses each service listens on; an empty list means the service is not started."""

    smtp: tuple[Endpoint, ...] = ()
    submission: tuple[Endpoint, ...] = ()
    submissions: tuple[Endpoint, ...] = ()
    pop3: tuple[Endpoint, ...] = ()
    pop3s: tuple[Endpoint, ...] = ()
    http: tuple[Endpoint, ...] = ()  # GET /metrics (Prometheus) and GET /healthz


@dataclass(frozen=True)
class TLSConfig:
    """Certificate chain and key (PEM). Unset: a self-signed pair is made in ``data_dir/tls``."""

    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class DNSConfig:
    """Resolvers for MX/A/AAAA lookups; empty means the system's resolver."""

    nameservers: tuple[Endpoint, ...] = ()
    timeout: Duration = Duration(10)
    # Answers kept by MX routing and by the sender-authentication checks (each for its TTL).
    cache_size: int = 10000


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on everything a network peer controls; each has a safe default."""

    message_size: Size = Size(50 << 20)
    max_recipients: int = 1000
    header_size: Size = Size(1 << 20)
    max_connections: int = 20000
    max_connections_per_ip: int = 50
    # Clients in these networks are exempt from the per-IP connection limit (Postfix does the same
    # for $mynetworks): a local relay or a monitoring probe should not be counted as an attacker.
    per_ip_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_errors: int = 20
    max_commands: int = 100_000
    # RFC 5321 §4.5.3.2.7: the server timeout for a command is at least 5 minutes.
    command_timeout: Duration = Duration(300)
    # RFC 5321 §4.5.3.2.6: 10 minutes for the end of DATA.
    data_timeout: Duration = Duration(600)
    session_timeout: Duration = Duration(3600)
    # RFC 1939 §3: an idle POP3 session's timer is at least 10 minutes.
    pop3_idle_timeout: Duration = Duration(600)
    tls_handshake_timeout: Duration = Duration(30)


@dataclass(frozen=True)
class DeliveryConfig:
    """Outbound delivery: how remote MX hosts are reached and how long we keep trying."""

    port: int = 25
    retry_intervals: tuple[Duration, ...] = tuple(
        Duration(s) for s in (300, 900, 1800, 3600, 7200, 14400)
    )
    max_queue_time: Duration = Duration(5 * 86400)
    connect_timeout: Duration = Duration(30)
    # Opportunistic STARTTLS encrypts whenever the peer offers it; these domains additionally
    # need a certificate that verifies (RFC 7435 opportunistic security otherwise).
    tls_verify_domains: tuple[str, ...] = ()
    max_per_destination: int = 10
    max_concurrent: int = 100
    # The local address outbound connections come from (IPv4, IPv6; "" = the system's
    # choice), as Postfix's smtp_bind_address: on a host with several, the one that SPF
    # and the reverse DNS name.
    bind_address: str = ""
    bind_address6: str = ""


@dataclass(frozen=True)
class AuthConfig:
    """Login policy shared by SMTP AUTH and POP3."""

    # When true, POP3 USER/PASS and SMTP AUTH work without TLS. Never do this on the internet.
    allow_plaintext: bool = False
    # Brute-force throttling (per client IP and per account): after ``free_failures`` failures
    # each further one waits longer; at ``lockout_failures`` logins get a temporary refusal for
    # ``lockout_time``.
    free_failures: int = 3
    lockout_failures: int = 15
    lockout_time: Duration = Duration(300)
    failure_delay: Duration = Duration(0.5)
    # Sender authentication (docs/sender-authentication.md). DKIM-sign mail from authenticated
    # users whose From: domain is local:
    dkim_sign: bool = True
    # SPF, DKIM and DMARC checks on the smtp service (mail not from an authenticated user):
    checks: bool = True
    # A DMARC fail under p=reject gets 550 5.7.1; false: the result is only recorded.
    dmarc_enforce: bool = True
    # Daily DMARC aggregate reports (RFC 7489 §7.2) to the rua= of the domains we checked.
    dmarc_reports: bool = True
    dmarc_report_interval: Duration = Duration(86400)
    # The DMARC record `postroom dns` prints: its p= and its rua= (an address, "mailto:" optional;
    # empty: postmaster@DOMAIN).
    dmarc_policy: str = "none"
    dmarc_rua: str = ""
    # All DNS for the checks of one message takes at most this long (then: temperror).
    check_timeout: Duration = Duration(20)
    # Messages above this size are not signed, and get only SPF checked (never a DMARC 550).
    check_max_size: Size = Size(25 << 20)
    # How often keys not yet seen in DNS are looked for; retired keys stay listed this long.
    dkim_check_interval: Duration = Duration(60)
    dkim_retire_after: Duration = Duration(7 * 86400)


@dataclass(frozen=True)
class StorageConfig:
    """Where the shared state lives: ``local`` (SQLite, Maildir, the on-disk queue under
    ``data_dir``) or ``postgresql`` (one database that several nodes share, named by ``url``)."""

    backend: str = "local"
    url: str | None = None
    # Connections each worker process keeps for deliveries, account changes and the queue.
    pool_size: int = 10
    # POP3 sessions each worker serves at once: each holds a connection of its own while it
    # is logged in (its mailbox lock is an advisory lock on that connection).
    max_pop3_sessions: int = 100
    # How long a node's claim on a queued message (its lease) lasts without renewal: another
    # node takes the message over this long after the node holding it died.
    lease_time: Duration = Duration(60)


BACKENDS = ("local", "postgresql")


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``path`` is None for the embedded default."""

    hostname: str = "localhost"
    domains: tuple[str, ...] = ("localhost",)
    data_dir: Path = Path("postroom-data")
    user: str | None = None
    log_level: str = "info"
    log_format: str = "text"  # "text" (one line per event, Postfix-style) or "json"
    # Processes sharing the listening sockets; more than one uses more cores (each has its own
    # event loop; only the first runs the queue). Login throttling is counted per process.
    workers: int = 1
    # Keep each worker's event loop and its Maildir writer on two CPUs of their own (when the
    # server may use at least two per worker): a hand-off between them then never waits for
    # the other to be scheduled off a shared CPU. For hosts that run little else.
    pin_cpus: bool = False
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    path: Path | None = None

    def is_local_domain(self, domain: str) -> bool:
        """True when mail for ``domain`` (already lower-cased, IDNA) is stored here."""
        return domain in self.domains

    def per_ip_exempt_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The exempt networks; one written IPv4-mapped (``::ffff:127.0.0.0/104``) as the IPv4
        network it names: a mapped client is counted, and matched, by its IPv4 address."""
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for text in self.limits.per_ip_exempt:
            net = ipaddress.ip_network(text, strict=False)
            mapped = net.network_address.ipv4_mapped if net.version == 6 else None
            if mapped is not None and net.prefixlen >= 96:
                net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
            out.append(net)
        return tuple(out)


EMBEDDED_DEFAULT_LISTEN = ListenConfig(
    smtp=(("127.0.0.1", 2525),),
    submission=(("127.0.0.1", 2587),),
    submissions=(("127.0.0.1", 2465),),
    pop3=(("127.0.0.1", 2110),),
    pop3s=(("127.0.0.1", 2995),),
    http=(("127.0.0.1", 2080),),
)


def embedded_default() -> Config:
    """The configuration ``postroom serve`` uses when there is no config file."""
    return Config(listen=EMBEDDED_DEFAULT_LISTEN, data_dir=Path(os.path.abspath("postroom-data")))


def _normalise_domain(name: str) -> str:
    from postroom.address import normalise_domain

    return normalise_domain(name)


def _convert(key: str, hint: Any, value: Any) -> Any:
    """Convert one TOML value to the dataclass field type ``hint``; ValueError on mismatch."""
    origin = typing.get_origin(hint)
    if hint is Duration:
        return parse_duration(value)
    if hint is Size:
        return parse_size(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a path")
        return Path(value)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(key, args[0], value)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ValueError("expected a list")
        if item == Endpoint or typing.get_origin(item) is tuple:
            port = 53 if key == "nameservers" else None
            out = []
            for v in value:
                if not isinstance(v, str):
                    raise ValueError("expected a list of 'host:port' strings")
                out.append(parse_endpoint(v, port))
            return tuple(out)
        return tuple(_convert(key, item, v) for v in value)
    raise ValueError(f"unsupported type {hint!r}")  # pragma: no cover - a bug in this module


def _build(cls: type[Any], table: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls) if f.name != "path"}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: {full}: unknown key")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full}: expected a table [{full}]")
            kwargs[key] = _build(typing.cast(type[Any], hint), value, f"{full}.", source)
            continue
        try:
            kwargs[key] = _convert(key, hint, value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {full}: {exc}") from None
    return cls(**kwargs)


def load(path: Path) -> Config:
    """Read and validate a config file."""
    source = str(path)
    try:
        data = files.read_regular(path, limit=MAX_FILE)
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        # TOML v1.0.0: "A TOML file must be a valid UTF-8 encoded Unicode document". Decoded
        # here: tomllib.load raises UnicodeDecodeError for it, which no caller expected (a
        # reload then killed the server).
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{source}: invalid TOML: not UTF-8 (line {line})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{source}: invalid TOML: arrays or tables nested too deep") from None
    key = _beyond_64_bits(raw)
    if key is not None:  # TOML 1.0 §Integer: one not kept losslessly in 64 bits is an error
        raise ConfigError(f"{source}: {key}: invalid TOML: an integer beyond 64 bits")
    return from_dict(raw, source=source, path=path)


def _beyond_64_bits(value: object, key: str = "") -> str | None:
    """The key of the first integer in ``value`` that 64 bits cannot hold (tomllib takes any)."""
    if isinstance(value, dict):
        items: Iterable[tuple[str, object]] = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        big = isinstance(value, int) and not -(2**63) <= value < 2**63
        return key if big else None
    for name, inner in items:
        path = f"{key}{name}" if name.startswith("[") else f"{key}.{name}" if key else name
        found = _beyond_64_bits(inner, path)
        if found is not None:
            return found
    return None


def from_dict(raw: dict[str, Any], *, source: str = "<config>", path: Path | None = None) -> Config:
    """Build a Config from parsed TOML, checking every key and the cross-key rules."""
    cfg: Config = _build(Config, raw, "", source)
    try:
        domains = tuple(_normalise_domain(d) for d in cfg.domains)
    except ValueError as exc:
        raise ConfigError(f"{source}: domains: {exc}") from None
    if not domains:
        raise ConfigError(f"{source}: domains: at least one local domain is needed")
    try:
        # In the banner, EHLO and Received: an RFC 5321 §4.1.2 Domain, so ASCII (IDNA A-labels).
        hostname = _normalise_domain(cfg.hostname)
    except ValueError as exc:
        raise ConfigError(f"{source}: hostname: expected a host name: {exc}") from None
    if (cfg.tls.cert is None) != (cfg.tls.key is None):  # (named: the one missing)
        missing = "tls.key" if cfg.tls.key is None else "tls.cert"
        raise ConfigError(f"{source}: {missing}: missing: cert and key go together")
    if not 1 <= cfg.workers <= 64:
        raise ConfigError(f"{source}: workers: must be between 1 and 64")
    nameservers = _nameserver_addresses(cfg.dns.nameservers, source)
    _check_listeners_differ(cfg.listen, source)
    if cfg.limits.message_size < 1:
        # RFC 1870: "SIZE 0" means no limit at all, the opposite of what 0 would ask for.
        raise ConfigError(f"{source}: limits.message_size: must be at least 1 octet")
    if cfg.limits.message_size >= 10**20:
        raise ConfigError(f"{source}: limits.message_size: at most 20 digits (RFC 1870)")
    if cfg.limits.max_recipients < 1:
        raise ConfigError(f"{source}: limits.max_recipients: must be at least 1")
    if cfg.limits.header_size < 1:
        raise ConfigError(f"{source}: limits.header_size: must be at least 1 octet")
    if not cfg.delivery.retry_intervals:
        raise ConfigError(f"{source}: delivery.retry_intervals: must not be empty")
    # Values that would stop the server quietly: no delivery at all (a limit of 0), a time-out
    # that ends every session at once, a periodic check or a retry that spins.
    for section, key in _AT_LEAST_ONE:
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{source}: {section}.{key}: must be at least 1")
    for section, key in _MORE_THAN_NOTHING:
        value = getattr(getattr(cfg, section), key)
        if any(v <= 0 for v in (value if isinstance(value, tuple) else (value,))):
            raise ConfigError(f"{source}: {section}.{key}: must be more than 0s")
    try:
        verified = tuple(_normalise_domain(d) for d in cfg.delivery.tls_verify_domains)
    except ValueError as exc:
        raise ConfigError(f"{source}: delivery.tls_verify_domains: {exc}") from None
    if not 0 < cfg.delivery.port < 65536:
        raise ConfigError(f"{source}: delivery.port: must be a TCP port")
    for key, version in (("bind_address", 4), ("bind_address6", 6)):
        value = getattr(cfg.delivery, key)
        try:
            parsed = ipaddress.ip_address(value) if value else None
            if parsed is not None and parsed.version != version:
                raise ValueError(f"not an IPv{version} address")
            if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped:
                raise ValueError("an IPv4-mapped address: no IPv6 connection leaves from it")
        except ValueError as exc:
            raise ConfigError(f"{source}: delivery.{key}: {value!r}: {exc}") from None
    if cfg.auth.dmarc_policy not in ("none", "quarantine", "reject"):
        raise ConfigError(f"{source}: auth.dmarc_policy: one of none, quarantine, reject")
    if cfg.auth.dmarc_rua:
        try:
            dmarc_rua_uris(cfg.auth.dmarc_rua)
        except ValueError as exc:
            raise ConfigError(f"{source}: auth.dmarc_rua: {exc}") from None
    if cfg.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"{source}: log_level: one of debug, info, warning, error")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"{source}: log_format: one of text, json")
    _check_storage(cfg.storage, source)
    try:
        cfg.per_ip_exempt_networks()
    except ValueError as exc:
        raise ConfigError(f"{source}: limits.per_ip_exempt: {exc}") from None
    # A relative data_dir is relative to the working directory, like every other tool; it is
    # made absolute once, here, so that no later chdir or dir_fd-relative call can misread it.
    data_dir = Path(os.path.abspath(cfg.data_dir))
    return dataclasses.replace(
        cfg,
        hostname=hostname,
        domains=domains,
        data_dir=data_dir,
        path=path,
        dns=dataclasses.replace(cfg.dns, nameservers=nameservers),
        # As the domains are: IDNA A-labels, lower case, no trailing dot, so that they match.
        delivery=dataclasses.replace(cfg.delivery, tls_verify_domains=verified),
    )


def _check_listeners_differ(listen: ListenConfig, source: str) -> None:
    """ConfigError for an address listed twice (in one service or two): ``serve`` would
    fail to bind the second, at run time, without naming the key."""
    seen: dict[Endpoint, str] = {}
    for f in dataclasses.fields(listen):
        for host, port in getattr(listen, f.name):
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                key = (host.lower().rstrip("."), port)
            else:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    # An IPv6 socket cannot bind it (IPV6_V6ONLY): it failed at bind time.
                    raise ConfigError(
                        f"{source}: listen.{f.name}: {format_endpoint(host, port)}: write "
                        f"the IPv4 address ({addr.ipv4_mapped}:{port})"
                    )
                key = (str(addr), port)
            if key in seen:
                where = "twice" if seen[key] == f.name else f"in listen.{seen[key]} as well"
                raise ConfigError(
                    f"{source}: listen.{f.name}: {format_endpoint(host, port)} is listed {where}"
                )
            seen[key] = f.name


_AT_LEAST_ONE = (
    ("delivery", "max_concurrent"),
    ("delivery", "max_per_destination"),
    ("limits", "max_connections"),
    ("limits", "max_errors"),
    ("limits", "max_commands"),
)
_MORE_THAN_NOTHING = (
    ("dns", "timeout"),
    ("limits", "command_timeout"),
    ("limits", "data_timeout"),
    ("limits", "session_timeout"),
    ("limits", "pop3_idle_timeout"),
    ("limits", "tls_handshake_timeout"),
    ("delivery", "retry_intervals"),
    ("delivery", "connect_timeout"),
    ("auth", "check_timeout"),
    ("auth", "dkim_check_interval"),
    ("auth", "dmarc_report_interval"),
)


def _nameserver_addresses(nameservers: tuple[Endpoint, ...], source: str) -> tuple[Endpoint, ...]:
    """``[dns] nameservers`` as addresses: a server named by a host name (``localhost:5353``)
    is looked up once, here, with the system's resolver (``/etc/hosts`` first); its IPv4
    addresses come before its IPv6 ones."""
    out: list[Endpoint] = []
    for host, port in nameservers:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            out.append((host, port))
            continue
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            raise ConfigError(
                f"{source}: dns.nameservers: {host!r}: cannot be resolved: {exc}"
            ) from None
        addresses = sorted(dict.fromkeys(str(info[4][0]) for info in found), key=lambda a: ":" in a)
        out.extend((address, port) for address in addresses)
    return tuple(out)


def _check_storage(storage: StorageConfig, source: str) -> None:
    if storage.backend not in BACKENDS:
        raise ConfigError(f"{source}: storage.backend: one of {', '.join(BACKENDS)}")
    # Checked on every backend, so a typo does not wait for the day the backend changes.
    if storage.pool_size < 1:
        raise ConfigError(f"{source}: storage.pool_size: must be at least 1")
    if storage.max_pop3_sessions < 1:
        raise ConfigError(f"{source}: storage.max_pop3_sessions: must be at least 1")
    if storage.lease_time < 1:
        raise ConfigError(f"{source}: storage.lease_time: must be at least 1s")
    if storage.backend == "local":
        if storage.url is not None:
            raise ConfigError(f'{source}: storage.url: only with backend = "postgresql"')
        return
    if storage.url is None:
        raise ConfigError(f'{source}: storage.url: needed with backend = "postgresql"')
    problem = postgresql_url_problem(storage.url)
    if problem:
        raise ConfigError(f"{source}: storage.url: {problem}")


def postgresql_url_problem(url: str) -> str | None:
    """What is wrong with ``postgresql://USER@HOST:PORT/DB``, or None. A password may be
    given (``USER:PASSWORD@``), though a ``~/.pgpass`` file keeps it out of the config."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        return str(exc)
    if parts.scheme not in ("postgresql", "postgres"):
        return "expected postgresql://USER@HOST:PORT/DB"
    try:
        port = parts.port
    except ValueError:
        return "bad port"
    if not parts.hostname:
        return "missing host (postgresql://USER@HOST:PORT/DB)"
    if not parts.username:
        return "missing user (postgresql://USER@HOST:PORT/DB)"
    database = parts.path.lstrip("/")
    if not database or "/" in database:
        return "missing database name (postgresql://USER@HOST:PORT/DB)"
    if port == 0:
        return "bad port"
    if parts.fragment:
        return "unexpected '#' part"
    try:  # (asyncpg parses it strictly: "?x" with no "=" failed at connect)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        return f"bad query string: {exc}"
    for name, value in query:
        allowed = _VALUES.get(name)
        if allowed is not None and value not in allowed:
            return f"{name}: expected one of {', '.join(allowed)}"
        lower = name.lower()
        if lower in _LIBPQ_ONLY or (lower in _ASYNCPG and name != lower):
            # asyncpg sends a name it does not know as a server setting: refused at connect.
            return f"{name}: a libpq parameter that postroom's driver (asyncpg) does not take"
    return None


_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
_VALUES = {  # the url parameters asyncpg checks only when it connects
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": _SESSION_ATTRS,
    "ssl_min_protocol_version": _TLS_VERSIONS,
    "ssl_max_protocol_version": _TLS_VERSIONS,
    "sslnegotiation": ("postgres", "direct"),
    "gsslib": ("gssapi", "sspi"),
}
# The parameters asyncpg takes (in lower case only), and libpq's that it would send on as
# server settings.
_ASYNCPG = frozenset(
    [
        "host",
        "port",
        "user",
        "password",
        "passfile",
        "database",
        "dbname",
        "service",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
    ]
)
_LIBPQ_ONLY = frozenset(
    [
        "connect_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "hostaddr",
        "fallback_application_name",
        "gssencmode",
        "channel_binding",
        "requirepeer",
        "require_auth",
        "sslcompression",
        "sslsni",
        "load_balance_hosts",
        "replication",
        "sslcertmode",
        "sslcrldir",
        "sslkeylogfile",
        "gssdelegation",
        "requiressl",
    ]
)


def doubts(cfg: Config) -> list[str]:
    """What a server would run with that is allowed but probably not what the admin meant:
    said by ``serve`` at start and at every reload."""
    source = cfg.path or "<default>"
    said = []
    if cfg.limits.pop3_idle_timeout < 600:
        said.append(
            f"{source}: limits.pop3_idle_timeout: under 10 minutes, which RFC 1939 section 3 "
            "asks of a POP3 server: a client that reads slowly may be cut off"
        )
    if not any(getattr(cfg.listen, f.name) for f in dataclasses.fields(cfg.listen)):
        said.append(f"{source}: listen: no listeners: the server will serve nothing")
    if _is_address(cfg.hostname):
        said.append(
            f"{source}: hostname: an address ({cfg.hostname}): RFC 5321 section 4.1.1.1 asks "
            "a server to greet with its domain name, and bounces come from MAILER-DAEMON@ it"
        )
    if cfg.path is not None and cfg.hostname == "localhost":
        said.append(
            f'{source}: hostname: "localhost": other mail servers refuse mail from a host that '
            "calls itself that; set this host's public name"
        )
    return said


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]").removeprefix("IPv6:"))
    except ValueError:
        return False
    return True


def find_config_path(explicit: str | None) -> Path | None:
    """The file named by ``-c``, else ``$POSTROOM_CONFIG``, else ``./postroom.toml`` if present.
    ``-c ""`` names no file (a script's empty variable): an error, not the embedded default."""
    if explicit is not None:
        if not explicit:
            raise ConfigError("-c/--config: an empty file name")
        return Path(explicit)
    env = os.environ.get("POSTROOM_CONFIG")
    if env:
        return Path(env)
    local = Path("postroom.toml")
    return local if local.exists() else None


def load_effective(explicit: str | None) -> Config:
    """The config a command runs with: the file :func:`find_config_path` finds, or the default."""
    path = find_config_path(explicit)
    return load(path) if path is not None else embedded_default()
