"""While a DKIM key waited for its record in DNS, the server compared the record with the
key's public half every two seconds, and each time parsed the private key from its PEM
again: about 50 ms of the event loop for an RSA-2048 key (OpenSSL checks the key at each
load), on every server whose admin had not yet published the records."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.auth import keys


def test_a_key_is_parsed_once_however_often_it_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = keys.LocalKeyStore(tmp_path)
    keys.KeyRing(store, 86400).ensure("a.test", 1e9)
    loads = []
    real = keys.serialization.load_pem_private_key

    def counting(data: bytes, password: bytes | None) -> object:
        loads.append(data)
        return real(data, password)

    monkeypatch.setattr(keys.serialization, "load_pem_private_key", counting)
    assert len(store.load("a.test")) == 2  # an Ed25519 and an RSA key: something to parse
    for _ in range(5):  # each look reads the store again: fresh DkimKey objects
        for key in store.load("a.test"):
            assert key.public_b64() and key.record()
            key.private_key()
    assert len(loads) <= 2, "a key's PEM parsed more than once"
