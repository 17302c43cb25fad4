"""The wire schema: every malformed row gets an error that says what is wrong."""

from __future__ import annotations

import json

import pytest

from templar.conversation import (RESERVED_TEMPLATE_KWARGS, Conversation, ConversationError, RowLimits,
                                  conversation_rows, parse_conversation)

GOOD = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                     {"role": "assistant", "content": "a"}]}


def test_round_trip_keeps_optional_fields():
    row = {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}],
           "template_kwargs": {"date_string": "1 Jan 2025"}, "future_field": 1}
    conv = parse_conversation(json.dumps(row).encode())
    assert conv.messages == GOOD["messages"]
    assert conv.tools == row["tools"] and conv.template_kwargs == {"date_string": "1 Jan 2025"}
    assert parse_conversation(conv.to_json()) == conv


@pytest.mark.parametrize("row, message", [
    (b"\xff\xfe{", "not valid UTF-8"),
    (b"{not json", "row is not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"msgs": []}', "has no 'messages'"),
    (b'{"messages": []}', "non-empty list"),
    (b'{"messages": "hi"}', "non-empty list, got a string"),
    (b'{"messages": ["hi"]}', r"messages\[0\] must be an object"),
    (b'{"messages": [{"content": "x"}]}', r"messages\[0\] has no 'role'"),
    (b'{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content'"),
    (b'{"messages": [{"role": "tool", "content": "x"}]}', r"messages\[0\].role 'tool' is not one of"),
    (b'{"messages": [{"role": 3, "content": "x"}]}', r"messages\[0\].role must be a string, got int"),
    (b'{"messages": [{"role": "assistant", "content": 5}]}', r"messages\[0\].content must be a string, got int"),
    (b'{"messages": [{"role": "assistant", "content": null}]}', "must be a string, got null"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "last message must be the assistant turn"),
    (b'{"messages": [{"role": "assistant", "content": "x"}], "tools": {}}', "'tools' must be a list"),
    (b'{"messages": [{"role": "assistant", "content": "x"}], "template_kwargs": []}', "must be an object"),
    (b'{"messages": [{"role": "assistant", "content": "x"}], "template_kwargs": {"add_generation_prompt": true}}',
     "may not set add_generation_prompt"),
])
def test_malformed_rows_say_what_is_wrong(row, message):
    with pytest.raises(ConversationError, match=message):
        parse_conversation(row)


def test_conversation_rows_accepts_objects_dicts_and_message_lists():
    rows = conversation_rows([Conversation(GOOD["messages"]), GOOD, GOOD["messages"]])
    assert [parse_conversation(r) for r in rows] == [Conversation(GOOD["messages"])] * 3


def _row(*messages: tuple[str, str], **extra) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages], **extra}).encode()


def test_limits_bound_size_messages_and_nesting_each_named():
    limits = RowLimits(max_row_bytes=200, max_messages=3, max_json_depth=6)
    assert parse_conversation(_row(("user", "x" * 100), ("assistant", "y")), limits)
    with pytest.raises(ConversationError, match=r"row is \d+ bytes, over the limit of 200 \(max_row_bytes\)"):
        parse_conversation(_row(("user", "x" * 200), ("assistant", "y")), limits)
    with pytest.raises(ConversationError, match=r"row has 4 messages, over the limit of 3 \(max_messages\)"):
        parse_conversation(_row(*[("user", "a"), ("assistant", "b")] * 2), limits)
    nested = {"v": {"v": {"v": {"v": {"v": {"v": 1}}}}}}  # the row, template_kwargs and 5 more objects: 7 deep
    with pytest.raises(ConversationError, match=r"nested more than 6 levels deep \(max_json_depth\)"):
        parse_conversation(_row(("assistant", "y"), template_kwargs=nested), limits)
    assert parse_conversation(_row(("assistant", "y"), template_kwargs=nested["v"]), limits)
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past the parser's own recursion limit
    with pytest.raises(ConversationError, match="nested too deep"):
        parse_conversation(deep)


def test_lone_surrogates_and_long_client_strings_in_errors():
    with pytest.raises(ConversationError, match="lone surrogate"):
        parse_conversation(b'{"messages": [{"role": "assistant", "content": "a\\udc00b"}]}')
    with pytest.raises(ConversationError) as error:
        parse_conversation(_row(("x" * 100_000, "hi")))
    assert len(str(error.value)) < 200 and "(100000 characters)" in str(error.value)


@pytest.mark.parametrize("key", sorted(RESERVED_TEMPLATE_KWARGS))
def test_template_kwargs_may_not_override_what_the_serving_side_sets(key):
    with pytest.raises(ConversationError, match=f"may not set {key}"):
        parse_conversation(_row(("assistant", "y"), template_kwargs={key: "<|eot_id|>"}))
