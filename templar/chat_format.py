"""One model's own chat template and tokenizer, with the guards Templar puts around them.

The same code serves both sides: the preprocessing model inside Triton (each RM formats conversations its own way)
and the trainer (the actor formats prompts its own way). Rendering and tokenization are exactly
`tokenizer.apply_chat_template(messages, tokenize=True)` for ordinary content; on top of that:

- control-token strings inside content (`<|eot_id|>`, `<|im_end|>`, `</s>` ...) never become control tokens:
  policy "escape" (default) tokenizes them as plain text, "reject" refuses the row;
- conversations over `max_length` tokens are cut from the START, so the scored response end survives;
- a row the template rejects (e.g. a system turn for Gemma-2) is a per-row error, not a failed batch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from templar.conversation import RESERVED_TEMPLATE_KWARGS, Conversation, ConversationError
from templar.errors import ConfigError, MissingChatTemplateError
from templar.fingerprints import sha256_text

SPECIAL_TOKEN_POLICIES = ("escape", "reject")
TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    num_tokens_before_truncation: int
    escaped_control_tokens: int = 0
    text: str | None = None  # the rendered text, where it was rendered apart from tokenizing (tokenize_steps)

    @property
    def truncated(self) -> bool:
        return self.num_tokens_before_truncation > len(self.input_ids)


# Role sequences rendered with sentinel contents to find what a template writes around contents itself
WRAPPING_PROBES = (("system", "user", "assistant", "user"), ("user", "assistant", "user"))
_PROBE = "TEMPLARCONTENTPROBE{}X"


def template_wrapping_text(tokenizer: Any, template_kwargs: dict | None = None) -> str:
    """What a chat template writes around message contents by itself (its turn markers, headers, default system
    prompt), NUL-joined: probe conversations rendered with sentinel contents and a generation prompt, the sentinels
    cut out. Markers a template only parses inside contents (Qwen3's `<think>`) are not wrapping."""
    pieces = []
    for roles in WRAPPING_PROBES:
        probe = [{"role": role, "content": _PROBE.format(i)} for i, role in enumerate(roles)]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True,
                                                 **(template_kwargs or {}))
        except Exception:  # noqa: BLE001 - a template that refuses this role sequence (a system turn)
            continue
        pieces.append(re.sub(_PROBE.format(r"\d+"), "\0", text))
    return "\0".join(pieces)


class ChatFormat:
    """A model's chat template + tokenizer with Templar's guards (see the module docstring)."""

    def __init__(self, tokenizer: Any, *, chat_template: str | None = None, template_kwargs: dict | None = None,
                 max_length: int | None = None, special_tokens: str = "escape",
                 extra_control_tokens: Iterable[str] = ()) -> None:
        if special_tokens not in SPECIAL_TOKEN_POLICIES:
            raise ConfigError(f"special_tokens must be one of {SPECIAL_TOKEN_POLICIES}, got {special_tokens!r}")
        template = chat_template if chat_template is not None else tokenizer.chat_template
        if isinstance(template, dict):  # a folder with several named templates: the default one scores
            template = template.get("default")
        if not template:
            raise MissingChatTemplateError(
                "the tokenizer has no chat template; pass one with --chat-template FILE (a Jinja file)")
        if max_length is not None and max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.chat_template: str = template
        tokenizer.chat_template = template
        self.template_kwargs = dict(template_kwargs or {})
        self.max_length = max_length
        self.special_tokens = special_tokens
        # a process RM's step tag, where it is an added token, is escaped in client text like the template's tokens
        added = set(tokenizer.added_tokens_encoder)
        self.control_tokens = tuple(sorted(set(self._find_control_tokens()) | (set(extra_control_tokens) & added)))
        # what a client's template_kwargs may not set: besides the usual names, this tokenizer's own special tokens
        self.reserved_kwargs = RESERVED_TEMPLATE_KWARGS | set(tokenizer.special_tokens_map)
        # Pinning the list makes transformers' sanitizer escape exactly the tokens we detect.
        tokenizer.chat_control_tokens = list(self.control_tokens)
        longest_first = sorted(self.control_tokens, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, chat_template_file: str | os.PathLike | None = None,
                 **kwargs: Any) -> ChatFormat:
        """Load a tokenizer folder offline; `chat_template_file` overrides the folder's own template."""
        from transformers import AutoTokenizer  # heavy import, only where a tokenizer is really loaded

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        template = Path(chat_template_file).read_text(encoding="utf-8") if chat_template_file else None
        return cls(tokenizer, chat_template=template, **kwargs)

    # -- identity -------------------------------------------------------------------------------------------------
    @property
    def template_sha256(self) -> str:
        return sha256_text(self.chat_template)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def _find_control_tokens(self) -> tuple[str, ...]:
        """Special tokens, plus added tokens the template writes around contents itself (DeepSeek's `<｜User｜>`);
        not added tokens the template only reads inside contents (Qwen3's `<think>`, `<tool_call>`): the model's own
        template turns those into its tokens, and so must the served path, or scores leave the model's own."""
        wrapping = template_wrapping_text(self.tokenizer, self.template_kwargs)
        tokens = []
        for token in self.tokenizer.added_tokens_decoder.values():
            if token.special or (token.content in wrapping and not token.content.isspace()):
                tokens.append(token.content)
        return tuple(sorted(set(tokens)))

    def control_tokens_in(self, conversation: Conversation) -> list[str]:
        """The control-token strings that occur in a conversation's client-supplied text."""
        texts: list[str] = [m["content"] for m in conversation.messages]
        texts += [v for v in _strings(conversation.tools)] + [v for v in _strings(conversation.template_kwargs)]
        return [m.group(0) for text in texts for m in self._control_re.finditer(text)]

    # -- rendering ------------------------------------------------------------------------------------------------
    def _kwargs(self, conversation: Conversation) -> dict[str, Any]:
        reserved = sorted(self.reserved_kwargs & set(conversation.template_kwargs))
        if reserved:
            raise ConversationError(f"'template_kwargs' may not set {', '.join(reserved)}")
        return {**self.template_kwargs, **conversation.template_kwargs}

    def render(self, conversation: Conversation, *, add_generation_prompt: bool = False) -> str:
        """The exact text the model sees (before tokenization)."""
        if conversation.text is not None:  # rendered elsewhere (a {"text": ...} row)
            return conversation.text
        try:
            return self.tokenizer.apply_chat_template(
                conversation.messages, tools=conversation.tools, tokenize=False,
                add_generation_prompt=add_generation_prompt, **self._kwargs(conversation))
        except jinja2.TemplateError as exc:
            raise ConversationError(f"the chat template rejected the conversation: {exc}") from None

    def tokenize(self, conversation: Conversation, *, add_generation_prompt: bool = False) -> TokenizedConversation:
        """Token ids of a conversation, guarded and truncated; raises ConversationError for a bad row."""
        if conversation.text is not None:
            return self._tokenize_text(conversation.text)
        hits = self.control_tokens_in(conversation)
        if hits and self.special_tokens == "reject":
            shown = ", ".join(sorted(set(hits)))
            raise ConversationError(
                f"content contains control-token strings ({shown}); this model's policy is special_tokens=reject")
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation.messages, tools=conversation.tools, tokenize=True, return_dict=False,
                add_generation_prompt=add_generation_prompt,
                # The sanitizer is exact but slower; without control tokens in content both paths agree.
                sanitize_control_tokens=bool(hits), **self._kwargs(conversation))
        except jinja2.TemplateError as exc:
            raise ConversationError(f"the chat template rejected the conversation: {exc}") from None
        except ValueError as exc:  # e.g. a control token the tokenizer also produces from plain text
            raise ConversationError(f"could not tokenize the conversation: {exc}") from None
        ids = list(ids)
        if not ids:
            raise ConversationError("the chat template rendered the conversation to no tokens")
        return TokenizedConversation(self._truncate(ids), len(ids), len(hits))

    def tokenize_steps(self, conversation: Conversation, steps: list[str], suffix: str, joiner: str = "", *,
                       system_prompt: str | None = None) -> TokenizedConversation:
        """A process RM's reading of a conversation (templar.steps): the last (assistant) content replaced by
        `steps`, each followed by `suffix` (which holds the RM's step tag) and joined by `joiner`, and the system
        message by `system_prompt` when given. The suffixes are the only tags the RM sees: control-token strings in the
        client's text (the step tag among them, where it is an added token) are escaped, or refused, as in `tokenize`.
        """
        if conversation.text is not None:
            raise ConversationError("a process reward model scores messages, not a 'text' row")
        messages = [m for m in conversation.messages[:-1] if system_prompt is None or m["role"] != "system"]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        client = Conversation([*messages, {"role": "assistant", "content": "\0".join(steps)}], conversation.tools,
                              conversation.template_kwargs)
        hits = self.control_tokens_in(client)
        if hits and self.special_tokens == "reject":
            raise ConversationError(f"content contains control-token strings ({', '.join(sorted(set(hits)))}); this "
                                    "model's policy is special_tokens=reject")
        kwargs = self._kwargs(conversation)
        tools = conversation.tools
        if hits:  # transformers' own marking (as apply_chat_template does it), before the tags go in unmarked
            (messages,), tools, _, kwargs = self.tokenizer._mark_chat_inputs(
                self.chat_template, [messages], tools, None, kwargs, True, False)
            (steps,), _, _, _ = self.tokenizer._mark_chat_inputs(self.chat_template, [steps], None, None, {}, True,
                                                                 False)
        content = joiner.join(step + suffix for step in steps)
        try:
            text = self.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": content}],
                                                      tools=tools, tokenize=False, **kwargs)
        except jinja2.TemplateError as exc:
            raise ConversationError(f"the chat template rejected the conversation: {exc}") from None
        ids = list(self.tokenizer(text, add_special_tokens=False, sanitize_control_tokens=bool(hits))["input_ids"])
        if hits:  # the text as rendered, without transformers' private marks around the escaped tokens
            from transformers.utils.chat_template_utils import _CONTROL_TOKEN_END, _CONTROL_TOKEN_START

            text = text.replace(_CONTROL_TOKEN_START, "").replace(_CONTROL_TOKEN_END, "")
        return TokenizedConversation(self._truncate(ids), len(ids), len(hits), text)

    def _tokenize_text(self, text: str) -> TokenizedConversation:
        """A {"text": ...} row: the tokenizer's own reading of the text (its special-token strings become special
        tokens, a BOS is added where the tokenizer adds one), as a single-template framework's RM reads it."""
        if self.special_tokens == "reject":
            raise ConversationError("'text' rows are read without this model's template and guards; this model's "
                                    "policy is special_tokens=reject")
        ids = list(self.tokenizer(text)["input_ids"])
        return TokenizedConversation(self._truncate(ids), len(ids), 0)

    def stop_token_ids(self) -> list[int]:
        """Tokens that end an assistant turn: EOS, plus the token the template writes right after assistant
        content (e.g. Qwen's <|im_end|>, Llama-3's <|eot_id|>, Gemma's <end_of_turn>)."""
        ids = {self.tokenizer.eos_token_id} - {None}
        sentinel = "TEMPLARENDOFTURNPROBE"
        text = self.render(Conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}]))
        after = text.split(sentinel, 1)[1] if sentinel in text else ""
        if after:
            first = self.tokenizer(after, add_special_tokens=False)["input_ids"][:1]
            if first and self.tokenizer.convert_ids_to_tokens(first[0]) in self.control_tokens:
                ids.add(first[0])
        return sorted(ids)

    def _truncate(self, ids: list[int]) -> list[int]:
        """Cut from the start so the response end (where the score is read) survives; keep a leading BOS."""
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if self.bos_token_id is not None and ids[0] == self.bos_token_id:
            return [ids[0]] + ids[len(ids) - self.max_length + 1:]
        return ids[len(ids) - self.max_length:]


def _strings(value: Any) -> Iterable[str]:
    """Every string inside a JSON-like value (dict values, list items), recursively."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
