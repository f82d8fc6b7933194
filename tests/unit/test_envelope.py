"""The queue's data: the JSON form every backend stores round-trips, history included."""

from __future__ import annotations

import dataclasses

import pytest

from postroom.errors import QueueError
from postroom.queue.envelope import Attempt, Envelope, Recipient, check_id


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
    assert env.to_dict() == dataclasses.asdict(env)
    assert Envelope.from_json(env.to_json()) == env
    assert (
        Envelope.from_json(b'{"id": "A", "sender": "", "recipients": [], "created": 0}').history
        == []
    )


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"id": "A"}', b'{"id": "A", "bogus": 1}'])
def test_an_unreadable_envelope_is_a_queue_error(raw: bytes) -> None:
    with pytest.raises(QueueError):
        Envelope.from_json(raw)


@pytest.mark.parametrize("qid", ["", "../accounts.sqlite", "a/b", "x" * 65, "é"])
def test_a_queue_id_is_letters_and_digits(qid: str) -> None:
    with pytest.raises(QueueError):
        check_id(qid)
