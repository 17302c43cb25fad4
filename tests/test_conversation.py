"""The wire schema: every malformed row gets an error that says what is wrong."""

from __future__ import annotations

import json

import pytest

from templar.conversation import Conversation, ConversationError, conversation_rows, parse_conversation

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
