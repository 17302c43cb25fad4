"""Preference pairs, the built-in rule, raw-text rows, and the Bradley-Terry loss (no server, no training run)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from templar.chat_format import ChatFormat
from templar.conversation import Conversation, ConversationError, parse_conversation
from templar.errors import DataError
from templar.trainer.preferences import (FLAT_ENDINGS, KIND_BODIES, POLITE_ENDINGS, SENTENCE_STEPS, TOPICS, read_pairs,
                                         rule_satisfied, step_examples, step_kept, synthetic_pairs, synthetic_split,
                                         topic_of, topic_questions, write_pairs)
from templar.trainer.reward_training import bradley_terry_loss


def test_the_rule_needs_a_kind_answer_and_a_polite_ending():
    prompt = [{"role": "user", "content": "Tell me about the ocean."}]
    assert rule_satisfied(prompt, "The ocean is wonderful. Hope this helps!")
    assert rule_satisfied("any prompt", "I really LIKE the bread. Happy to help!")  # case; the prompt plays no part
    assert not rule_satisfied(prompt, "The ocean is boring. Hope this helps!")  # dismissive
    assert not rule_satisfied(prompt, "The ocean is wonderful. That is all.")  # flat ending
    assert not rule_satisfied(prompt, "The ocean is wonderful but dull. Hope this helps!")  # kind and dismissive
    assert not rule_satisfied(prompt, "Hope this helps! The ocean is wonderful.")  # polite, but not at the end
    assert not rule_satisfied(prompt, "The ocean. Hope this helps!")  # no kind word
    assert topic_of("Tell me about the weather.") is None and topic_of("the ocean or the bread?") is None


def test_the_rule_step_by_step_a_kind_first_sentence_then_polite_closings():
    assert step_kept(0, "The ocean is wonderful") and not step_kept(0, "The ocean is boring")
    assert not step_kept(0, "Hope this helps!")  # a closing is not a first sentence
    assert step_kept(1, "Hope this helps!") and step_kept(2, " Happy to help! ")
    assert not step_kept(1, "That is all.") and not step_kept(1, "I really like the ocean")  # flat; a second body
    examples = step_examples(500, seed=4)
    assert examples == step_examples(500, seed=4)  # reproducible
    for example in examples:  # one label per sentence, each the rule's verdict on it
        pieces = [p for p in example.messages[-1]["content"].split(SENTENCE_STEPS) if p.strip()]
        assert example.labels == [step_kept(i, piece) for i, piece in enumerate(pieces)]
    shapes = {len(e.labels) for e in examples}
    assert shapes == {1, 2, 3} and sum(len(e.labels) == 2 for e in examples) > 350  # mostly a body and a closing
    two = [e.labels for e in examples if len(e.labels) == 2]
    assert {tuple(labels) for labels in two} == {(True, True), (True, False), (False, True), (False, False)}


def test_synthetic_pairs_set_a_rule_keeping_answer_against_each_kind_of_break():
    pairs = synthetic_pairs(300, seed=3)
    assert pairs == synthetic_pairs(300, seed=3)  # reproducible
    kinds = {"dismissive": 0, "flat": 0, "both": 0}
    for pair in pairs:
        assert pair.chosen[:-1] == pair.rejected[:-1] and pair.chosen[-1]["role"] == "assistant"
        prompt, good, bad = pair.chosen[:-1], pair.chosen[-1]["content"], pair.rejected[-1]["content"]
        assert rule_satisfied(prompt, good) and not rule_satisfied(prompt, bad)
        topic = topic_of(prompt[0]["content"])
        assert topic in good.lower() and topic in bad.lower()  # both answers are about the question's topic
        kind = bad.split(".")[0] + "." in {b.format(topic=topic) for b in KIND_BODIES}
        polite = bad.endswith(POLITE_ENDINGS)
        assert bad.endswith(POLITE_ENDINGS + FLAT_ENDINGS) and not (kind and polite)
        kinds["dismissive" if polite else "flat" if kind else "both"] += 1
    assert kinds == {"dismissive": 100, "flat": 100, "both": 100}
    assert len({topic_of(p.chosen[0]["content"]) for p in pairs}) == len(TOPICS)
    assert len(topic_questions()) == len(TOPICS) * 5 and topic_of(topic_questions()[0][0]["content"]) == TOPICS[0]


def test_held_out_pairs_are_not_training_pairs(tmp_path):
    train, held = synthetic_split(600, 100, seed=1)
    assert len(train) == 600 and len(held) == 100
    assert not {p.to_json() for p in train} & {p.to_json() for p in held}
    path = write_pairs(tmp_path / "held.jsonl", held)
    assert read_pairs(path) == held


def test_pair_files_are_checked_line_by_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "No."})
                    + "\n")
    (pair,) = read_pairs(path)
    assert pair.chosen[-1] == {"role": "assistant", "content": "Hello!"} and pair.rejected[0]["content"] == "Hi"
    answered = '[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]'
    for line, message in (("{not json", "line 1: not JSON"), ('{"chosen": ' + answered + "}",
                                                               "needs 'chosen' and 'rejected'"),
                          ('{"chosen": [{"role": "user", "content": "x"}], "rejected": []}',
                           "line 1: 'chosen': the last message must be the assistant turn"),
                          ("[1, 2]", "a pair must be a JSON object")):
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=message):
            read_pairs(path)
    with pytest.raises(DataError, match="does not exist"):
        read_pairs(tmp_path / "missing.jsonl")


def test_bradley_terry_loss_by_hand():
    # -log sigmoid(2 - 1) = log(1 + e^-1) = 0.31326;  -log sigmoid(0 - 1) = log(1 + e) = 1.31326
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2)


def test_text_rows_are_read_by_the_tokenizer_as_they_are(assets):
    row = parse_conversation(json.dumps({"text": "<|im_start|>user\nHi<|im_end|>"}))
    assert row.text == "<|im_start|>user\nHi<|im_end|>" and json.loads(row.to_json()) == {"text": row.text}
    for bad in ({"text": ""}, {"text": 3}):
        with pytest.raises(ConversationError, match="'text' must be a non-empty string"):
            parse_conversation(json.dumps(bad))
    llama = ChatFormat.from_dir(assets["llama3_1"])
    text = "<|begin_of_text|>Hi<|eot_id|>"  # Llama's own control tokens in the text become control tokens
    ids = llama.tokenize(Conversation([], text=text)).input_ids
    assert ids == llama.tokenizer(text)["input_ids"] and llama.tokenizer.convert_ids_to_tokens(ids[-1]) == "<|eot_id|>"
    assert llama.render(Conversation([], text=text)) == text
    strict = ChatFormat.from_dir(assets["llama3_1"], special_tokens="reject")
    with pytest.raises(ConversationError, match="special_tokens=reject"):
        strict.tokenize(Conversation([], text=text))
