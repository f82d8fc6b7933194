"""``[auth] dmarc_rua = "mailto:reports@a.test"`` (the form the DMARC record itself uses) made
``postroom dns`` print ``rua=mailto:mailto:reports@a.test``, a record no receiver can send
reports to. The address may now be given with or without its ``mailto:``."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ServerFactory


@pytest.mark.parametrize("rua", ["mailto:reports@a.test", "MAILTO:reports@a.test"])
def test_a_mailto_rua_is_printed_once(server_factory: ServerFactory, rua: str) -> None:
    srv = server_factory(extra_toml=f'[auth]\ndmarc_rua = "{rua}"\n', start=False)
    records = json.loads(srv.cli("dns", "a.test", "--json").stdout)
    dmarc = [r["value"] for r in records if r["name"] == "_dmarc.a.test."]
    assert dmarc == ["v=DMARC1; p=none; rua=mailto:reports@a.test"]
