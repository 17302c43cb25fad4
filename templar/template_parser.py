"""Text that an actor's chat template rendered, back into structured messages.

Frameworks such as OpenRLHF hand a reward server one string: the prompt rendered with the ACTOR's template plus the
sampled response. To let each reward model apply its own template, that string is parsed back into messages here.
Nothing is written per family: the parser learns the template by rendering probe conversations through it.

- A "skeleton" is a template's rendering of one role sequence ([system]? (user assistant)* user, with the generation
  prompt) whose contents are unique sentinels: the text between sentinels is the template's own wrapping, however
  it is built (Gemma-3 folds the system turn into the first user turn, Mistral puts it before the last user turn).
  Today's date and similar values a template computes itself (variables it sets from `strftime_now`) are holes too.
- A text is matched against the skeletons of every role sequence short enough to fit, left to right (each hole ends
  at the first occurrence of the wrapping that follows it), and a match counts only if rendering the recovered
  messages gives back the very same text.
- When several readings render the same text, the one with the most user/assistant turns wins (a content holding
  the template's own turn markers: the actor read them as turns too), and among those the one WITHOUT a system
  message: a system message is kept only when the text cannot be read without it. So a system message the template
  writes by itself (Qwen2.5's "You are Qwen...", the Llama-3 date preamble) is dropped, as the user never wrote it;
  and where a template has no system turn of its own (Gemma and Mistral fold it into a user turn, separated by a
  blank line), the text comes back as that user turn, exactly as the actor saw it. Send the prompt's messages
  instead (OpenRLHF's label, see templar.integrations) where the system message must reach the reward model.
- Templates that trim contents lose outer whitespace when they render; the parsed content is the trimmed one.
- The end of a response loses every end-of-turn, EOS and padding token after it, in any order and repetition
  (OpenRLHF sends `...<|end|><|endoftext|><|endoftext|>` where padding follows the end-of-turn token).
- No parsed content may hold a control token of the actor (`TemplateParser.control_tokens`: the tokenizer's special
  tokens, its end-of-turn, EOS, pad and BOS, and the added tokens the template's own turn wrapping writes). Decoded
  text cannot tell such a token from the same characters typed as content, so a row where one would remain is refused
  with an error naming it, never scored.

Text that does not parse raises TemplateParseError saying why; nothing is guessed.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.nodes

from templar.chat_format import ChatFormat
from templar.conversation import Messages
from templar.errors import TemplateParseError

# Variables the rendering itself provides; any other variable the template assigns from strftime_now() varies with
# the day it was rendered on and is matched as a hole.
_SENTINEL = "TEMPLARHOLE{}X"
_VARIABLE = "TEMPLARVAR{}X"


@dataclass(frozen=True)
class _Hole:
    kind: str  # "content" (message index) or "variable" (template variable name)
    key: int | str


@dataclass(frozen=True)
class _Skeleton:
    roles: tuple[str, ...]
    pieces: tuple[str | _Hole, ...]
    literal_length: int


@dataclass(frozen=True)
class ParsedQuery:
    prompt: Messages  # the conversation up to the response, as the user wrote it
    response: str  # the final assistant turn, end-of-turn / EOS / padding removed
    ended: bool  # the response ended with an end-of-turn or EOS token (it was not cut at a length limit)

    @property
    def messages(self) -> Messages:
        return [*self.prompt, {"role": "assistant", "content": self.response}]


class TemplateParser:
    """Parses what one actor template rendered (see the module docstring)."""

    def __init__(self, chat_format: ChatFormat, *, max_turns: int = 64) -> None:
        self.chat = chat_format
        self.tokenizer = chat_format.tokenizer
        self.max_turns = max_turns
        self.computed_variables = tuple(
            sorted(set(_strftime_variables(chat_format.chat_template)) - set(chat_format.template_kwargs)))
        tokens = self.tokenizer
        stops = {tokens.convert_ids_to_tokens(i) for i in chat_format.stop_token_ids()}
        self.end_tokens = tuple(sorted(stops | ({tokens.eos_token} - {None}), key=len, reverse=True))
        # without a padding token of its own, trainers pad with EOS (OpenRLHF's get_tokenizer, most HF code)
        self.pad_token = tokens.pad_token or tokens.eos_token or None
        # what may follow a response: its end-of-turn / EOS, then padding (longest first: one never hides another)
        self.trailing_tokens = tuple(sorted(set(self.end_tokens) | ({self.pad_token} - {None}), key=len,
                                            reverse=True))
        self.control_tokens = self._control_tokens()
        self._control_re = re.compile("|".join(map(re.escape, self.control_tokens)))

    @classmethod
    def from_source(cls, source: str | os.PathLike, template_kwargs: dict | None = None) -> TemplateParser:
        """A tokenizer folder with its chat template, or a family name fetched by `templar assets`."""
        from templar.assets import chat_format_from_source

        return cls(chat_format_from_source(source, template_kwargs=template_kwargs))

    def _control_tokens(self) -> tuple[str, ...]:
        """Strings that are structure, never content, in this actor's text: its ChatFormat's control tokens (special
        tokens, added tokens the template's wrapping writes, e.g. DeepSeek's `<｜User｜>`; not Qwen3's `<think>`,
        which contents hold) and the end / EOS / pad / BOS tokens."""
        found = set(self.chat.control_tokens) | set(self.trailing_tokens) | ({self.tokenizer.bos_token} - {None})
        return tuple(sorted((t for t in found if t and not t.isspace()), key=len, reverse=True))

    def control_tokens_in(self, text: str) -> list[str]:
        return [m.group(0) for m in self._control_re.finditer(text)] if self.control_tokens else []

    # -- rendering --------------------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], *, generation_prompt: bool, variables: dict | None = None) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt,
                                                  **{**self.chat.template_kwargs, **(variables or {})})

    @functools.lru_cache(maxsize=512)  # noqa: B019 - one parser per actor template, kept for the process
    def _skeleton(self, roles: tuple[str, ...]) -> _Skeleton | None:
        """The template's rendering of `roles` with sentinel contents, cut into literals and holes."""
        probe = [{"role": role, "content": _SENTINEL.format(i)} for i, role in enumerate(roles)]
        variables = {name: _VARIABLE.format(name) for name in self.computed_variables}
        try:
            text = self.render(probe, generation_prompt=True, variables=variables)
        except (jinja2.TemplateError, ValueError):
            return None  # the template refuses this role sequence (e.g. a system turn)
        marks = {_SENTINEL.format(i): _Hole("content", i) for i in range(len(roles))}
        marks.update({_VARIABLE.format(name): _Hole("variable", name) for name in self.computed_variables})
        pieces: list[str | _Hole] = [text]
        for mark, hole in marks.items():
            if sum(mark in piece for piece in pieces if isinstance(piece, str)) == 0 and hole.kind == "content":
                return None  # the template dropped a message's content: it cannot be parsed back
            pieces = [part for piece in pieces for part in _split(piece, mark, hole)]
        pieces = [p for p in pieces if p != ""]
        if any(isinstance(a, _Hole) and isinstance(b, _Hole) for a, b in zip(pieces, pieces[1:])):
            return None  # two holes with nothing between them: no way to tell where one ends
        literal = sum(len(p) for p in pieces if isinstance(p, str))
        return _Skeleton(roles, tuple(pieces), literal)

    def _role_sequences(self, length: int):
        """[system]? (user assistant)* user, shortest first, while their wrapping alone fits in `length` chars."""
        for turns in range(1, self.max_turns + 1):
            base = ("user", "assistant") * (turns - 1) + ("user",)
            fitting = False
            for roles in (("system", *base), base):
                skeleton = self._skeleton(roles)
                if skeleton is not None and skeleton.literal_length <= length:
                    fitting = True
                    yield skeleton
            if not fitting and turns > 1 and self._skeleton(base) is not None:
                return

    # -- parsing ----------------------------------------------------------------------------------------------
    def parse_prompt(self, text: str) -> Messages:
        """Messages whose rendering with the generation prompt is exactly `text`."""
        text = self._strip_padding(text, trailing=False)
        found = self._best_match(text, prefix=False)
        if found is None:
            raise TemplateParseError(f"the text is not a prompt this actor template renders (no conversation of "
                                     f"up to {self.max_turns} turns gives it back): {_preview(text)}")
        return found[0]

    def parse_query(self, query: str, prompt: str | None = None, *, check_prompt: bool = True) -> ParsedQuery:
        """Split prompt + response text into the prompt's messages and the response. With `prompt` (the prompt as
        rendered, as OpenRLHF sends it), the split is where the prompt ends; without, the longest conversation whose
        rendering is a prefix of the query. A response (or, with `check_prompt`, a prompt message) that would still
        hold a control token is refused (see the module docstring); pass check_prompt=False when the prompt's
        messages come from elsewhere (a label)."""
        query = self._strip_padding(query)
        if prompt is not None:
            prompt = self._strip_padding(prompt)
            messages = self.parse_prompt(prompt)
            rest = self._after_prompt(query, prompt)
        else:
            found = self._best_match(query, prefix=True)
            if found is None:
                raise TemplateParseError("the text does not start with a prompt this actor template renders: "
                                         + _preview(query))
            messages, end = found
            rest = query[end:]
        response, ended = self._strip_end(rest)
        self._refuse_control_tokens("the response", response)
        if check_prompt:
            for i, message in enumerate(messages):
                self._refuse_control_tokens(f"prompt message {i} ({message['role']})", message["content"])
        return ParsedQuery(messages, response, ended)

    def _refuse_control_tokens(self, where: str, content: str) -> None:
        hits = self.control_tokens_in(content)
        if hits:
            shown = ", ".join(repr(t) for t in dict.fromkeys(hits))
            raise TemplateParseError(
                f"{where} holds the actor's control token {shown} after parsing: decoded text cannot tell it from "
                "the real token, so the row is refused rather than scored (send the prompt's messages in the label "
                "and a response without template tokens)")

    def _best_match(self, text: str, *, prefix: bool) -> tuple[Messages, int] | None:
        """The reading of `text` (all of it, or a prefix) with the most user/assistant turns and, among those, without
        a system message if one reads the same: a skeleton matches, and the recovered messages render back to exactly
        that text. Returns (messages, end of the match)."""
        best: tuple[Messages, int] | None = None
        best_rank = (0, 0)
        for skeleton in self._role_sequences(len(text)):
            has_system = skeleton.roles[0] == "system"
            rank = (len(skeleton.roles) - has_system, -has_system)
            if rank <= best_rank:
                continue
            matched = _scan(skeleton.pieces, text, prefix=prefix)
            if matched is None:
                continue
            contents, variables, end = matched
            messages = [{"role": role, "content": contents[i]} for i, role in enumerate(skeleton.roles)]
            try:
                if self.render(messages, generation_prompt=True, variables=variables) != text[:end]:
                    continue
            except (jinja2.TemplateError, ValueError):
                continue
            best, best_rank = (messages, end), rank
        return best

    def _after_prompt(self, query: str, prompt: str) -> str:
        """The query after the rendered prompt; compared through the actor's tokenizer when the decoded text is not
        the prompt character for character (some tokenizers decode `<|user|>\\n` as `<|user|> \\n`; the space such
        a decoder puts after the prompt's last token then stays at the start of the response)."""
        if query.startswith(prompt):
            return query[len(prompt):]
        tokens = self.tokenizer
        prompt_ids = tokens(prompt, add_special_tokens=False)["input_ids"]
        query_ids = tokens(query, add_special_tokens=False)["input_ids"]
        if query_ids[: len(prompt_ids)] == prompt_ids:
            return tokens.decode(query_ids[len(prompt_ids):], skip_special_tokens=False)
        normalized = tokens.decode(prompt_ids, skip_special_tokens=False)
        if query.startswith(normalized):
            return query[len(normalized):]
        raise TemplateParseError("the query does not start with its prompt (neither as text nor as the actor's "
                                 f"tokens): prompt {_preview(prompt)}, query {_preview(query)}")

    def _strip_padding(self, text: str, *, leading: bool = True, trailing: bool = True) -> str:
        """Padding tokens left around a decoded sequence (older OpenRLHF kept them). Where the padding token is also
        the end-of-turn token, trailing ones are left for `_strip_end`."""
        pad = self.pad_token
        if pad is None:
            return text
        while leading and text.startswith(pad):
            text = text[len(pad):]
        while trailing and text.endswith(pad) and pad not in self.end_tokens:
            text = text[: -len(pad)]
        return text

    def _strip_end(self, response: str) -> tuple[str, bool]:
        """The response without the end-of-turn / EOS / padding tokens after it, in any order and repetition; ended
        when one of them was an end-of-turn or EOS token."""
        ended = False
        stripped = True
        while stripped:
            stripped = False
            for token in self.trailing_tokens:
                if response.endswith(token):
                    response = response[: -len(token)]
                    ended |= token in self.end_tokens
                    stripped = True
                    break
        return response, ended


def _split(piece: str | _Hole, mark: str, hole: _Hole) -> list[str | _Hole]:
    if not isinstance(piece, str) or mark not in piece:
        return [piece]
    parts = piece.split(mark)
    out: list[str | _Hole] = [parts[0]]
    for part in parts[1:]:
        out += [hole, part]
    return out


def _scan(pieces: tuple[str | _Hole, ...], text: str, *, prefix: bool):
    """Match literals and holes left to right; a hole ends at the first occurrence of the literal after it. Returns
    (contents by index, variables, end) or None. With `prefix`, the text may go on after the last piece."""
    contents: dict[int | str, str] = {}
    variables: dict[int | str, str] = {}
    pos = 0
    for index, piece in enumerate(pieces):
        if isinstance(piece, str):
            if not text.startswith(piece, pos):
                return None
            pos += len(piece)
            continue
        following = pieces[index + 1] if index + 1 < len(pieces) else None
        if following is None:  # a hole at the very end: the rest of the text (or nothing to bound it)
            if prefix:
                return None
            value, pos = text[pos:], len(text)
        else:
            end = text.find(following, pos)
            if end < 0:
                return None
            value, pos = text[pos:end], end
        found = contents if piece.kind == "content" else variables
        if found.setdefault(piece.key, value) != value:
            return None  # one content or variable rendered twice, with two different values
    if not prefix and pos != len(text):
        return None
    return contents, variables, pos


def _strftime_variables(chat_template: str) -> list[str]:
    """Variables the template sets from strftime_now(...) (e.g. Llama-3's date_string): they vary by day."""
    ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    names = []
    for node in ast.find_all(jinja2.nodes.Assign):
        call = node.node
        if isinstance(call, jinja2.nodes.Call) and isinstance(call.node, jinja2.nodes.Name) \
                and call.node.name == "strftime_now" and isinstance(node.target, jinja2.nodes.Name):
            names.append(node.target.name)
    return names


def _preview(text: str, limit: int = 160) -> str:
    return repr(text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2:])


def parse_label_messages(label: Any) -> Messages | None:
    """The exact path: a label that carries the prompt's messages (a JSON string or an object with "messages", or
    a message list) instead of text to parse. None when the label is something else."""
    import json

    value = label
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, dict):
        value = value.get("messages")
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m.get("content")} for m in value]
    return None
