"""Process reward models (PRMs): an RM that scores every step of a response, each in its OWN step format.

A PRM expects its steps in a format of its own: its chat template and system prompt, each step followed by its step
tag, and a score read at every tag. That format is data (`StepFormat`), recorded at export and applied by the
preprocessing model (templar.serving.batching); the presets are the three conventions in use:

- `qwen-prm` (Qwen2.5-Math-PRM): steps inside its chat template with its system prompt, each followed by `<extra_0>`
  (an added special token); a 2-class head at each tag, the step score is P(class 1) (its model card's
  `make_step_rewards`).
- `math-shepherd` (Math-Shepherd, and the PRMs OpenRLHF trains with `--placeholder_token` / `--reward_tokens`): a
  causal LM; the question and the steps as plain text ("question step1 ки\\nstep2 ки"), the step score is the softmax
  over the logits of "+" and "-" at each tag, P("+").
- `value-head`: an OpenRLHF-style value head over a base model, its raw value read at each tag.

A response is split into steps on `step_separator` (empty pieces dropped), or the client sends them explicitly:
`{"role": "assistant", "content": "...", "steps": ["...", ...]}`, each step found in order in the content. Where each
step ends in the content the client sent (`STEP_ENDS`, character offsets) goes back with the scores, so a trainer can
put each step's score on the token of its own tokenizer that ends that step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from templar.chat_format import ChatFormat, TokenizedConversation
from templar.conversation import Conversation
from templar.errors import ConfigError, ConversationError, ExportError

READINGS = ("class-probability", "token-logits", "value-head")
# SCORE of a PRM row: the weakest step (a chain is as good as its worst step: the usual choice, as in Math-Shepherd),
# the last step's, or the mean
AGGREGATES = ("min", "last", "mean")


@dataclass(frozen=True)
class StepFormat:
    """How one PRM reads a response's steps (recorded in the export's parameters as JSON)."""

    preset: str  # the preset it started from ("custom" when none)
    reading: str  # one of READINGS: how the score at a tag is computed
    step_tag: str  # the PRM's tag: ONE token of its tokenizer, written after every step
    tag_prefix: str = ""  # text between a step and its tag (Math-Shepherd: a space)
    step_joiner: str = ""  # text between one step's tag and the next step (Math-Shepherd: a newline)
    positive_class: int = 1  # class-probability: the class whose probability is the step score
    reward_tokens: tuple[str, str] = ("+", "-")  # token-logits: (good, bad); step score = P(good) over the two
    system_prompt: str | None = None  # the PRM's own system prompt: replaces the conversation's system message
    step_separator: str = "\n\n"  # how a response is cut into steps when the client sends none
    aggregate: str = "min"  # SCORE: one of AGGREGATES over the step scores
    max_steps: int = 64  # a row with more steps is refused with an error naming the limit
    chat_template: str | None = None  # the PRM's own template, where its tokenizer ships none (Math-Shepherd)

    def __post_init__(self) -> None:
        if self.reading not in READINGS:
            raise ConfigError(f"step reading must be one of {', '.join(READINGS)}, got {self.reading!r}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        if not self.step_tag:
            raise ConfigError("a PRM needs a step tag (--step-tag)")
        if not self.step_separator:
            raise ConfigError("the step separator must not be empty (--step-separator)")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps}")

    @property
    def step_suffix(self) -> str:
        """What follows every step in the PRM's rendering: the tag, after its prefix."""
        return self.tag_prefix + self.step_tag

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StepFormat:
        values = json.loads(text)
        values["reward_tokens"] = tuple(values.get("reward_tokens") or ("+", "-"))
        return cls(**values)


# Math-Shepherd has no chat template: the question, a space, the steps (its model card's `f"{question} {output}"`)
MATH_SHEPHERD_TEMPLATE = (
    "{{ bos_token }}{% for message in messages if message['role'] != 'system' %}"
    "{% if not loop.first %} {% endif %}{{ message['content'] }}{% endfor %}")

PRESETS = {
    "qwen-prm": StepFormat(
        preset="qwen-prm", reading="class-probability", step_tag="<extra_0>", positive_class=1,
        system_prompt="Please reason step by step, and put your final answer within \\boxed{}."),
    "math-shepherd": StepFormat(
        preset="math-shepherd", reading="token-logits", step_tag="ки", tag_prefix=" ", step_joiner="\n",
        reward_tokens=("+", "-"), step_separator="\n", chat_template=MATH_SHEPHERD_TEMPLATE),
    "value-head": StepFormat(preset="value-head", reading="value-head", step_tag="<step>", step_separator="\n\n"),
}


def step_format(preset: str, **overrides) -> StepFormat:
    """A preset with some fields changed (`templar export --kind prm --prm-preset NAME --step-tag ...`)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown PRM preset {preset!r}; choose from {', '.join(PRESETS)}")
    changed = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[preset], **changed) if changed else PRESETS[preset]


# -- steps of one response ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Steps:
    texts: list[str]  # each step's text, as the PRM sees it
    ends: list[int]  # character offset in the client's content just past each step


def split_steps(content: str, fmt: StepFormat, given: Sequence[str] | None = None) -> Steps:
    """The steps of an assistant content: cut on the separator (empty or blank pieces dropped), or the client's own
    `given` steps, each found in order in the content. Raises ConversationError for a response without steps, with
    more than the PRM's limit, or with a given step that is not in the content."""
    texts, ends = [], []
    if given is None:
        start = 0
        for piece in content.split(fmt.step_separator):
            if piece.strip():
                texts.append(piece)
                ends.append(start + len(piece))
            start += len(piece) + len(fmt.step_separator)
    else:
        if not isinstance(given, list) or not all(isinstance(step, str) for step in given):
            raise ConversationError("messages[-1].steps must be a list of strings")
        at = 0
        for i, step in enumerate(given):
            found = content.find(step, at)
            if not step.strip() or found < 0:
                why = "is blank" if not step.strip() else "does not occur in the content (after the steps before it)"
                raise ConversationError(f"steps[{i}] {why}")
            texts.append(step)
            at = found + len(step)
            ends.append(at)
    if not texts:
        raise ConversationError("the response has no steps: its content is empty or only separators "
                                f"({fmt.step_separator!r})")
    if len(texts) > fmt.max_steps:
        raise ConversationError(f"the response has {len(texts)} steps, over this PRM's limit of {fmt.max_steps} "
                                "(max_steps)")
    return Steps(texts, ends)


def check_aggregate(how: str | None, where: str = "aggregate") -> str | None:
    """An integration's aggregate choice: None (the RM's own, chosen at export) or one of AGGREGATES."""
    if how is not None and how not in AGGREGATES:
        raise ConfigError(f"{where} must be one of {', '.join(AGGREGATES)} (or unset: the RM's own), got {how!r}")
    return how


def aggregate(step_scores: Sequence[float], how: str) -> float:
    """SCORE of a PRM row from its step scores (see AGGREGATES)."""
    if len(step_scores) == 0:
        return math.nan
    if how == "min":
        return float(min(step_scores))
    if how == "last":
        return float(step_scores[-1])
    if how == "mean":
        return float(sum(step_scores) / len(step_scores))
    raise ConfigError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")


# -- a PRM's reading of one conversation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StepReading:
    tokenized: TokenizedConversation
    positions: list[int]  # token index of each step's tag, in order
    ends: list[int]  # character offset just past each step in the client's content


@dataclass(frozen=True)
class StepReader:
    """A PRM's step format bound to its tokenizer: where the tags land in the token ids."""

    fmt: StepFormat
    tag_id: int

    @classmethod
    def for_chat_format(cls, chat_format: ChatFormat, fmt: StepFormat) -> StepReader:
        """Resolve the step tag to its token id, checking that it is ONE token where it follows a step (an
        ExportError naming what it tokenizes to otherwise)."""
        tokenizer = chat_format.tokenizer
        ids = tokenizer.encode(fmt.step_suffix, add_special_tokens=False)
        if not ids:
            raise ExportError(f"the step tag {fmt.step_tag!r} tokenizes to nothing")
        reader = cls(fmt, int(ids[-1]))
        probe = Conversation([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "a"}])
        tokenized = chat_format.tokenize_steps(probe, ["one", "two"], fmt.step_suffix, fmt.step_joiner,
                                               system_prompt=fmt.system_prompt)
        found = sum(1 for i in tokenized.input_ids if i == reader.tag_id)
        shown = tokenizer.convert_ids_to_tokens(ids)
        if found != 2 or tokenizer.decode([reader.tag_id]).strip() != fmt.step_tag.strip():
            raise ExportError(f"the step tag {fmt.step_tag!r} is not one token of this tokenizer after a step "
                              f"({fmt.step_suffix!r} tokenizes as {shown}, and a probe of two steps holds {found} of "
                              f"id {reader.tag_id}); pass a tag that is (--step-tag), or add it to the tokenizer")
        return reader

    def read(self, chat_format: ChatFormat, conversation: Conversation) -> StepReading:
        """The PRM's token ids for a conversation and where its step tags are; ConversationError for a row whose
        steps cannot all be read (no steps, too many, a tag typed in plain-vocabulary text, steps cut by
        truncation)."""
        if conversation.text is not None:
            raise ConversationError("a process reward model scores messages, not a 'text' row")
        steps = split_steps(conversation.messages[-1]["content"], self.fmt, conversation.steps)
        tokenized = chat_format.tokenize_steps(conversation, steps.texts, self.fmt.step_suffix, self.fmt.step_joiner,
                                               system_prompt=self.fmt.system_prompt)
        positions = [i for i, token in enumerate(tokenized.input_ids) if token == self.tag_id]
        if len(positions) != len(steps.texts):
            if tokenized.truncated and len(positions) < len(steps.texts):
                raise ConversationError(
                    f"the conversation is {tokenized.num_tokens_before_truncation} tokens, over max_length "
                    f"{chat_format.max_length}, and cutting it from the start drops steps: {len(positions)} of "
                    f"{len(steps.texts)} step tags left")
            raise ConversationError(
                f"the conversation holds {len(positions)} step tags for {len(steps.texts)} steps: the PRM's step tag "
                f"{self.fmt.step_tag!r} is ordinary text for its tokenizer, and the content (or the rest of the "
                "conversation) writes it; remove it from the text")
        return StepReading(tokenized, positions, steps.ends)


# -- step scores on the actor's tokens -----------------------------------------------------------------------------
def step_end_tokens(tokenizer, response_ids: Sequence[int], ends: Sequence[int]) -> list[int]:
    """For each step end (a character offset in the response's text, as a PRM's STEP_ENDS gives it), the index of
    the response token whose text ends that step: the first token after which the decoded text reaches the offset.

    The text is the trainer's: `tokenizer.decode(response_ids, skip_special_tokens=True)` (templar.trainer.actor);
    decoding prefixes of the ids is exact for byte-level and SentencePiece tokenizers alike (a token's own text may
    start with a space, or be part of a character, which the prefix decodes account for). A character split over
    several tokens (bytes of an emoji) ends at the token that completes it; bytes no later token completes (a
    response cut mid-character, or token soup) stay in the text as U+FFFD, as the text sent to the PRM has them."""
    ids = list(response_ids)

    def length(n: int) -> int:  # characters the first n tokens write (a prefix's unfinished character does not count)
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        return len(text) if n == len(ids) else len(text.rstrip("\ufffd"))

    found, low = [], 1
    for end in ends:
        high = len(ids)
        if end <= 0 or length(high) < end:
            raise ValueError(f"step end {end} is outside the response's {length(high)} characters")
        while low < high:  # the smallest n with length(n) >= end; the ends ascend, so the search only moves on
            middle = (low + high) // 2
            if length(middle) >= end:
                high = middle
            else:
                low = middle + 1
        found.append(low - 1)
    return found
