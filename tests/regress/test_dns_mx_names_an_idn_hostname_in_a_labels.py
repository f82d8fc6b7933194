"""With ``hostname = "mx.bücher.example"`` ``postroom dns`` printed the MX target in Unicode
(``10 mx.bücher.example.``): a zone file holds A-labels, and the name as printed is not the
host's. It is now ``10 mx.xn--bcher-kva.example.``."""

from __future__ import annotations

import json

from tests.conftest import ServerFactory


def test_the_mx_target_is_written_in_a_labels(server_factory: ServerFactory) -> None:
    srv = server_factory(hostname="mx.Bücher.example", start=False)
    records = json.loads(srv.cli("dns", "a.test", "--json").stdout)
    assert [r["value"] for r in records if r["type"] == "MX"] == ["10 mx.xn--bcher-kva.example."]
    assert srv.cli("dns", "a.test").stdout.isascii()
