"""The config's cross-key rules that turn what the file says into what the server uses."""

from __future__ import annotations

import pytest

from postroom import config
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
