"""The conversation schema that travels on the wire: structured messages, never text templated for another model.

A row is UTF-8 JSON: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} with optional
"tools" (a list of JSON-schema tool descriptions) and "template_kwargs" (extra variables for the RM's template, e.g.
Llama-3.2's "date_string"). Unknown top-level fields are ignored so that newer clients can talk to older servers.

For comparisons only, a row may instead be {"text": "..."}: text some other model's template already rendered, which
the RM's tokenizer then reads as it is, special-token strings included, without the RM's own template: what a
framework that templates once with the actor's template hands its RM (`templar eval-rm --as-template` measures what
that costs). Such a row skips the control-token guards, and an RM exported with `--special-tokens reject` refuses it.

What one row may hold is bounded (`RowLimits`: bytes, messages, JSON nesting), so no row can cost the server more than
a known amount of time or memory: tokenizing the largest row allowed by default (1 MiB) takes about 0.5-0.75 s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from templar.errors import ConversationError

Messages = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]
ROLES = ("system", "user", "assistant")
# Variables the serving side sets itself (the conversation, the generation switches, the tokenizer's special tokens,
# the helpers transformers gives templates); a client may not override them through template_kwargs. Tokenizers with
# further special-token names are covered by templar.chat_format.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
    "additional_special_tokens", "raise_exception", "strftime_now"})


@dataclass(frozen=True)
class RowLimits:
    """What one wire row may hold; the defaults of templar.serving.settings.EntrySettings, which `templar export
    --max-row-bytes/--max-messages/--max-json-depth` records in the preprocessing model's config."""

    max_row_bytes: int = 1 << 20  # UTF-8 bytes of the row's JSON
    max_messages: int = 1024
    max_json_depth: int = 64  # JSON nesting (a row with tools is about 10 deep)


DEFAULT_LIMITS = RowLimits()


@dataclass(frozen=True)
class Conversation:
    messages: Messages
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    text: str | None = None  # a {"text": ...} row: already rendered by another template, scored as it is
    # the response's steps, as a client may send them for a process RM: {"role": "assistant", "content": ...,
    # "steps": [...]} (templar.steps, which checks them: an outcome RM ignores them); None: a PRM cuts the content
    steps: Any = None

    def to_json(self) -> str:
        if self.text is not None:
            return json.dumps({"text": self.text}, ensure_ascii=False)
        messages = self.messages
        if self.steps is not None:
            messages = [*messages[:-1], {**messages[-1], "steps": self.steps}]
        row: dict[str, Any] = {"messages": messages}
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
            raise ConversationError(f"messages[{i}].role {_short(role)} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConversationError(f"messages[{i}].content must be a string, got {_kind(content)}")
        clean.append({"role": role, "content": content})
    if final_role is not None and clean[-1]["role"] != final_role:
        raise ConversationError(
            f"the last message must be the {final_role} turn being scored, got role {_short(clean[-1]['role'])}")
    return clean


def decode_row(row: bytes | str, limits: RowLimits = DEFAULT_LIMITS) -> Any:
    """A wire row's JSON value, within `limits` (size, nesting, valid Unicode); ConversationError otherwise."""
    if isinstance(row, (bytes, bytearray, memoryview)):
        size = len(row)
        _check_size(size, limits)
        try:
            row = bytes(row).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConversationError(f"row is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    else:
        _check_size(len(row.encode("utf-8", "surrogatepass")), limits)
    try:
        value = json.loads(row)
    except json.JSONDecodeError as exc:
        raise ConversationError(f"row is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ConversationError(f"row is nested too deep (limit: {limits.max_json_depth} levels, "
                                "max_json_depth)") from None
    _check_json(value, limits)
    return value


def _check_size(size: int, limits: RowLimits) -> None:
    if size > limits.max_row_bytes:
        raise ConversationError(f"row is {size} bytes, over the limit of {limits.max_row_bytes} (max_row_bytes)")


def _check_json(value: Any, limits: RowLimits) -> None:
    """Nesting within limits.max_json_depth and every string valid Unicode (JSON escapes can smuggle in lone
    surrogates, which no tokenizer can encode). Iterative: a hostile row cannot exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ConversationError(f"row holds a lone surrogate ({item[exc.start]!r}), which is not valid "
                                            "Unicode") from None
            continue
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        if isinstance(item, dict):
            children = [*item.keys(), *children]
        if children and depth > limits.max_json_depth:
            raise ConversationError(f"row is nested more than {limits.max_json_depth} levels deep (max_json_depth)")
        stack.extend((child, depth + 1) for child in children)


def parse_conversation(row: bytes | str | Mapping[str, Any], limits: RowLimits = DEFAULT_LIMITS) -> Conversation:
    """Parse one wire row (bytes, str or an already-decoded mapping) into a validated Conversation."""
    if isinstance(row, (bytes, bytearray, memoryview, str)):
        row = decode_row(row, limits)
    if not isinstance(row, Mapping):
        raise ConversationError(f'row must be a JSON object {{"messages": [...]}}, got {_kind(row)}')
    if "messages" not in row:
        if "text" in row:
            if not isinstance(row["text"], str) or not row["text"]:
                raise ConversationError(f"'text' must be a non-empty string, got {_kind(row['text'])}")
            return Conversation(messages=[], text=row["text"])
        raise ConversationError("row has no 'messages' field")
    if isinstance(row["messages"], list) and len(row["messages"]) > limits.max_messages:
        raise ConversationError(f"row has {len(row['messages'])} messages, over the limit of {limits.max_messages} "
                                "(max_messages)")
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
    # the final message's optional "steps", as sent: a process RM's step texts, which templar.steps checks
    return Conversation(messages=messages, tools=tools, template_kwargs=dict(kwargs),
                        steps=row["messages"][-1].get("steps"))


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


def _short(text: str, limit: int = 40) -> str:
    """A client's string quoted in an error, cut so that a hostile row cannot make its status huge."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__)
