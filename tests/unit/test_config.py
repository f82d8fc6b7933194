"""The config's cross-key rules that turn what the file says into what the server uses."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from postroom import address, config
from postroom.errors import ConfigError


def test_a_nameserver_named_by_a_host_name_is_looked_up_once() -> None:
    cfg = config.from_dict({"domains": ["a.test"], "dns": {"nameservers": ["localhost:5353"]}})
    assert cfg.dns.nameservers[0] == ("127.0.0.1", 5353)  # IPv4 first (/etc/hosts)


def test_nameserver_addresses_are_kept_as_given() -> None:
    given = ["127.0.0.9", "[::1]:5300", "127.0.0.8:53"]
    cfg = config.from_dict({"domains": ["a.test"], "dns": {"nameservers": given}})
    assert cfg.dns.nameservers == (("127.0.0.9", 53), ("::1", 5300), ("127.0.0.8", 53))


def test_a_nameserver_name_that_cannot_be_a_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"dns\.nameservers"):
        config.from_dict({"domains": ["a.test"], "dns": {"nameservers": ["dns..example"]}})


def test_tls_verify_domains_are_spelled_as_the_domains_are() -> None:
    """A trailing dot or a U-label matched no recipient domain: TLS was quietly not required."""
    cfg = config.from_dict(
        {"domains": ["a.test"], "delivery": {"tls_verify_domains": ["Remote.test.", "bücher.test"]}}
    )
    assert cfg.delivery.tls_verify_domains == ("remote.test", "xn--bcher-kva.test")
    with pytest.raises(ConfigError, match=r"delivery\.tls_verify_domains"):
        config.from_dict({"domains": ["a.test"], "delivery": {"tls_verify_domains": ["a b"]}})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("delivery", "max_concurrent", 0),  # accepted mail, never delivered
        ("delivery", "max_per_destination", 0),
        ("auth", "dkim_check_interval", "0"),  # a loop asking DNS 740 times a second
        ("auth", "dmarc_report_interval", "0"),
        ("delivery", "retry_intervals", ["5m", "0"]),  # a hot retry loop
        ("limits", "command_timeout", "0"),
        ("limits", "tls_handshake_timeout", "0"),
        ("dns", "timeout", "0"),
        ("limits", "header_size", 0),  # every message refused
        ("limits", "max_connections", 0),  # every connection refused
        ("limits", "max_errors", 0),  # the first refused RCPT ends the session
        ("limits", "max_commands", 0),  # 421 at the first command
        ("limits", "message_size", 10**20),  # RFC 1870: SIZE has at most 20 digits
        # The PostgreSQL keys are checked on the local backend too (a typo would wait there).
        ("storage", "pool_size", 0),
        ("storage", "max_pop3_sessions", 0),
        ("storage", "lease_time", "0.5s"),
    ],
)
def test_values_that_would_stop_the_server_quietly_are_config_errors(
    section: str, key: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        config.from_dict({"domains": ["a.test"], section: {key: value}})


@pytest.mark.parametrize(
    "listen",
    [
        {"smtp": ["127.0.0.1:25", "127.0.0.1:25"]},
        {"smtp": ["127.0.0.1:25"], "pop3": ["127.0.0.1:25"]},
        {"smtp": ["[::1]:2525"], "http": ["[0:0::1]:2525"]},
    ],
)
def test_an_address_listed_twice_is_a_config_error(listen: dict[str, list[str]]) -> None:
    """It passed the check, and serve failed at run time (exit 1, "Address already in use")
    without naming the key."""
    with pytest.raises(ConfigError, match=r"listen\.\w+: .* is listed"):
        config.from_dict({"domains": ["a.test"], "listen": listen})


def test_a_v4_mapped_listen_address_is_a_config_error() -> None:
    """``[::ffff:127.0.0.1]:25`` passed the check and failed at bind time (exit 1)."""
    with pytest.raises(ConfigError, match=r"listen\.smtp: .*127\.0\.0\.1:25"):
        config.from_dict({"domains": ["a.test"], "listen": {"smtp": ["[::ffff:127.0.0.1]:25"]}})


@pytest.mark.parametrize(
    "endpoint",
    [
        " 127.0.0.1:2525",
        "mx .a.test:25",
        "a\tb:25",
        "a\x00:25",
        "a..test:25",  # (a re-probe: a traceback at bind, exit 1)
        "x" * 64 + ".test:25",
        "*:25",
        "[127.0.0.1:25",
        "a]:25",
        "a/8:25",
        "a@b:25",
    ],
)
def test_a_listen_host_no_name_can_be_is_a_config_error(endpoint: str) -> None:
    """A probe: a stray space passed the check (``user list`` said nothing), and ``serve``
    failed at bind time (exit 1, "Name or service not known") without naming the key."""
    with pytest.raises(ConfigError, match=r"listen\.smtp: (bad host|bad endpoint|bad address)"):
        config.from_dict({"domains": ["a.test"], "listen": {"smtp": [endpoint]}})
    for fine in ("localhost:25", "mx.a.test.:25", "bücher.test:25", "my_host:25"):
        config.from_dict({"domains": ["a.test"], "listen": {"smtp": [fine]}})


def test_doubts_about_what_would_run() -> None:
    """A probe: a server with no listeners started and logged ready, binding nothing; an
    address as ``hostname`` went into the greeting and the bounces' From."""
    quiet = config.from_dict(
        {"hostname": "mx.a.test", "domains": ["a.test"], "listen": {"smtp": ["127.0.0.1:25"]}}
    )
    assert config.doubts(quiet) == []
    nothing = config.from_dict({"hostname": "mx.a.test", "domains": ["a.test"], "listen": {}})
    assert any("listen: no listeners" in d for d in config.doubts(nothing))
    for literal in ("[127.0.0.1]", "192.0.2.1"):
        cfg = config.from_dict(
            {"hostname": literal, "domains": ["a.test"], "listen": {"smtp": ["127.0.0.1:25"]}}
        )
        assert any("hostname: an address" in d for d in config.doubts(cfg)), literal


@pytest.mark.parametrize(
    "rua",
    ['a"b@x.test', "a b@x.test", "nobody", "@x.test", "a@x.test!9q", "ok@x.test, a@"],
    ids=["a quote", "a space", "no at sign", "no local part", "a bad size", "one bad in a list"],
)
def test_a_dmarc_rua_that_is_no_address_is_a_config_error(rua: str) -> None:
    """Each went into the printed DMARC record as it was (an unencoded quote, a space); the
    error names the part that is wrong."""
    part = rua.split(",")[-1].strip()
    with pytest.raises(ConfigError, match=rf"auth\.dmarc_rua: {re.escape(repr(part))}"):
        config.from_dict({"domains": ["a.test"], "auth": {"dmarc_rua": rua}})


def test_dmarc_rua_takes_several_addresses_sizes_and_idn_domains() -> None:
    # RFC 7489 §6.4: a comma-separated list of URIs, each with an optional size limit; in a
    # local part "!" (a size in DMARC) and "?" (a mailto: query) are %-encoded (RFC 6068 §2).
    given = "dmarc@a.test, mailto:Agg+x@Vendor.test!10M,r@bücher.test, o'brien!?@x.test, é@x"
    config.from_dict({"domains": ["a.test"], "auth": {"dmarc_rua": given}})
    assert address.dmarc_rua_uris(given) == (
        "mailto:dmarc@a.test",
        "mailto:Agg+x@vendor.test!10m",
        "mailto:r@xn--bcher-kva.test",
        "mailto:o'brien%21%3F@x.test",
        "mailto:%C3%A9@x",  # a UTF-8 local part, cut nowhere in a TXT string
    )


def test_durations_and_sizes_take_ascii_digits_only() -> None:
    """``\\d`` took any Unicode digit: an Arabic-Indic one and "MB" were a megabyte (cfgedge)."""
    from postroom.config import parse_duration, parse_size

    assert parse_duration("1.5m") == 90 and parse_size("10MB") == 10 << 20
    for value in ("\u0661MB", "1\u0660KB", "10\u212aB"):  # the Kelvin sign is no K
        with pytest.raises(ValueError, match="expected a size"):
            parse_size(value)
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration("\u0661s")


def test_duration_units_take_either_case_as_size_units_do() -> None:
    """ "10mb" was a size and "5D" no duration (exit 2; contract probe)."""
    from postroom.config import parse_duration

    assert [parse_duration(v) for v in ("5D", "2H", "3M", "4S", "1.5h")] == [
        432000,
        7200,
        180,
        4,
        5400,
    ]
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration("5\u017f")  # the long s is no "s" (IGNORECASE without ASCII: it was)


def test_a_config_cert_or_key_that_is_no_regular_file_is_an_error_not_a_hang(
    tmp_path: Path,
) -> None:
    """A FIFO as tls.cert hung a reload (deaf to SIGTERM until written to), /dev/zero ran it
    out of memory: each is refused with one line, as a missing file is."""
    from postroom import tls

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ConfigError, match=r"not a regular file|Is a directory"):
            config.load(bad)
    good = tmp_path / "p.toml"
    good.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{tmp_path / "d"}"\n'
        f'[tls]\ncert = "{fifo}"\nkey = "/dev/zero"\n'
    )
    cfg = config.load(good)
    with pytest.raises(ConfigError, match=r"tls\.cert: .*not a regular file"):
        tls.read_pair(cfg)
    big = tmp_path / "big.toml"
    with big.open("wb") as f:
        f.truncate(config.MAX_FILE + 1)
    with pytest.raises(ConfigError, match="larger than"):
        config.load(big)
