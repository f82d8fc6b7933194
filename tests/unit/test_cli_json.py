"""``queue list --json`` prints its array item by item: the text must be what
``json.dumps(list, indent=2)`` makes, whatever the items hold."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.cli import print_json_list

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(st.lists(_values, max_size=4))
def test_same_text_as_one_dump(items: list[object]) -> None:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_json_list(iter(items))
    assert buffer.getvalue() == json.dumps(items, indent=2) + "\n"


@pytest.mark.parametrize("items", [[], [{}], [{"a": "x\ny", "b": [1, {"c": []}]}, "z"]])
def test_examples(items: list[object], capsys: pytest.CaptureFixture[str]) -> None:
    print_json_list(items)
    assert capsys.readouterr().out == json.dumps(items, indent=2) + "\n"
