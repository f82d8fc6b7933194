"""The queue's data: the JSON form every backend stores round-trips, history included."""

from __future__ import annotations

import dataclasses

import pytest

from postroom.errors import QueueError
from postroom.queue.envelope import Attempt, Envelope, PendingReport, Recipient, check_id


def test_an_envelope_round_trips_through_json_with_its_history() -> None:
    env = Envelope(
        "ABC123",
        "s@x.test",
        [Recipient("r@y.test", original="al@x.test", notify=["SUCCESS"], status="deferred")],
        1.5,
        size=10,
        wire_size=12,
        attempts=2,
        history=[Attempt(2.0, ["r@y.test"], "mx.y.test", "192.0.2.1", "451 4.7.1 later", True)],
    )
    as_dict = dataclasses.asdict(env)
    del as_dict["reports"], as_dict["parent"]  # left out when empty
    assert env.to_dict() == as_dict
    assert Envelope.from_json(env.to_json()) == env
    assert (
        Envelope.from_json(b'{"id": "A", "sender": "", "recipients": [], "created": 0}').history
        == []
    )


WRONG_TYPES = [  # valid JSON, fields of the wrong type: set aside, not a traceback later
    b'{"id": "A", "sender": "", "recipients": [{"address": 5}], "created": 0}',
    b'{"id": "A", "sender": "", "recipients": [{"address": "a@b", "status": "x"}], "created": 0}',
    b'{"id": 1, "sender": "", "recipients": [], "created": 0}',
    b'{"id": "A", "sender": "", "recipients": [], "created": "0"}',
    b'{"id": "A", "sender": "", "recipients": [], "created": 0, "attempts": "2"}',
]


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b'{"id": "A"}', b'{"id": "A", "bogus": 1}', *WRONG_TYPES]
)
def test_an_unreadable_envelope_is_a_queue_error(raw: bytes) -> None:
    with pytest.raises(QueueError):
        Envelope.from_json(raw)


@pytest.mark.parametrize("qid", ["", "../accounts.sqlite", "a/b", "x" * 65, "é"])
def test_a_queue_id_is_letters_and_digits(qid: str) -> None:
    with pytest.raises(QueueError):
        check_id(qid)


def test_the_dsn_fields_are_left_out_when_empty_and_read_back_when_set() -> None:
    # Empty (nearly always), the JSON is what an older node reads; set, they round-trip.
    plain = Envelope("Q1", "s@x.test", [Recipient("r@y.test")], 1.0)
    assert b'"reports"' not in plain.to_json() and b'"parent"' not in plain.to_json()
    owing = Envelope("Q2", "s@x.test", [Recipient("r@y.test", status="bounced")], 1.0)
    owing.reports = [PendingReport("Q3", [0], ["failed"], 2.0)]
    assert b'"expanded"' not in owing.to_json()
    dsn = Envelope("Q3", "", [Recipient("s@x.test")], 2.0, parent="Q2")
    # An alias's "expanded" notice, owed from acceptance: the alias, with and without ORCPT.
    aliases: list[tuple[str, str | None]] = [("a@x.test", "rfc822;a@x.test"), ("b@x.test", None)]
    expanded = Envelope("Q4", "s@x.test", [Recipient("r@y.test")], 1.0)
    expanded.reports = [PendingReport("Q5", [], [], 1.0, aliases)]
    for envelope in (plain, owing, dsn, expanded):
        assert Envelope.from_json(envelope.to_json()) == envelope
