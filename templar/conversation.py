"""The conversation schema that travels on the wire: structured messages, never text templated for another model.

A row is UTF-8 JSON: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} with optional
"tools" (a list of JSON-schema tool descriptions) and "template_kwargs" (extra variables for the RM's template, e.g.
Llama-3.2's "date_string"). Unknown top-level fields are ignored so that newer clients can talk to older servers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from templar.errors import DataError

Messages = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]
ROLES = ("system", "user", "assistant")
# Variables the serving side sets itself; a client may not override them through template_kwargs.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt",
                                      "continue_final_message"})


class ConversationError(DataError):
    """A row that is not a well-formed conversation; the message says what is wrong."""


@dataclass(frozen=True)
class Conversation:
    messages: Messages
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        row: dict[str, Any] = {"messages": self.messages}
        if self.tools is not None:
            row["tools"] = self.tools
        if self.template_kwargs:
            row["template_kwargs"] = self.template_kwargs
        return json.dumps(row, ensure_ascii=False)


def validate_messages(messages: Any, *, final_role: str | None = "assistant") -> Messages:
    """Check a list of chat messages and return them as plain {"role", "content"} dicts.

    `final_role="assistant"` is the reward contract (the last message is the response being scored); prompts for
    generation pass `final_role=None`.
    """
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"'messages' must be a non-empty list, got {_kind(messages)}")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConversationError(f"messages[{i}] must be an object with 'role' and 'content', got {_kind(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise ConversationError(f"messages[{i}] has no '{key}'")
        role, content = message["role"], message["content"]
        if not isinstance(role, str):
            raise ConversationError(f"messages[{i}].role must be a string, got {_kind(role)}")
        if role not in ROLES:
            raise ConversationError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConversationError(f"messages[{i}].content must be a string, got {_kind(content)}")
        clean.append({"role": role, "content": content})
    if final_role is not None and clean[-1]["role"] != final_role:
        raise ConversationError(
            f"the last message must be the {final_role} turn being scored, got role {clean[-1]['role']!r}")
    return clean


def parse_conversation(row: bytes | str | Mapping[str, Any]) -> Conversation:
    """Parse one wire row (bytes, str or an already-decoded mapping) into a validated Conversation."""
    if isinstance(row, (bytes, bytearray, memoryview)):
        try:
            row = bytes(row).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConversationError(f"row is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except json.JSONDecodeError as exc:
            raise ConversationError(f"row is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(row, Mapping):
        raise ConversationError(f'row must be a JSON object {{"messages": [...]}}, got {_kind(row)}')
    if "messages" not in row:
        raise ConversationError("row has no 'messages' field")
    messages = validate_messages(row["messages"])
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise ConversationError(f"'tools' must be a list of objects, got {_kind(tools)}")
    kwargs = row.get("template_kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping):
        raise ConversationError(f"'template_kwargs' must be an object, got {_kind(kwargs)}")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise ConversationError(f"'template_kwargs' may not set {', '.join(reserved)}")
    return Conversation(messages=messages, tools=tools, template_kwargs=dict(kwargs))


def conversation_rows(conversations: Sequence[Conversation | Mapping[str, Any] | Sequence[Mapping]]) -> list[bytes]:
    """Encode conversations for the wire. Accepts Conversation objects, row dicts or bare message lists."""
    rows = []
    for conv in conversations:
        if isinstance(conv, Conversation):
            rows.append(conv.to_json().encode("utf-8"))
        elif isinstance(conv, Mapping):
            rows.append(json.dumps(conv, ensure_ascii=False).encode("utf-8"))
        else:
            rows.append(json.dumps({"messages": list(conv)}, ensure_ascii=False).encode("utf-8"))
    return rows


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__)
