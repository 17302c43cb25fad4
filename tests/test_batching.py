"""Length-aware micro-batching and batch preprocessing (the logic inside the served models)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from templar import contract
from templar.chat_format import ChatFormat
from templar.conversation import parse_conversation
from templar.serving.batching import (PreprocessedBatch, padding_fraction, plan_micro_batches, preprocess_rows,
                                      score_in_micro_batches)


def test_micro_batches_cover_every_row_once_and_respect_limits():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 900, size=200)
    batches = plan_micro_batches(lengths, max_rows=16, max_tokens=4096)
    seen = np.sort(np.concatenate(batches))
    assert np.array_equal(seen, np.arange(200))
    for b in batches:
        assert len(b) <= 16
        assert len(b) == 1 or len(b) * lengths[b].max() <= 4096
    # sorting by length keeps padding small on a mixed workload; one padded batch would waste far more
    assert padding_fraction(lengths, batches) < 0.15 < padding_fraction(lengths, [np.arange(200)])


def test_a_row_longer_than_the_token_budget_gets_its_own_batch():
    batches = plan_micro_batches([5, 5000, 7], max_rows=8, max_tokens=100)
    assert [sorted(b.tolist()) for b in batches] == [[0, 2], [1]]


def test_hand_computed_plan():
    # sorted: 10, 20, 30, 40 -> [10, 20, 30] costs 3*30=90 <= 100; adding 40 would cost 160
    batches = plan_micro_batches([40, 10, 30, 20], max_rows=8, max_tokens=100)
    assert [b.tolist() for b in batches] == [[1, 3, 2], [0]]
    with pytest.raises(ValueError):
        plan_micro_batches([1], max_rows=0, max_tokens=1)


def test_bad_rows_do_not_cost_the_good_ones(assets):
    chat = ChatFormat.from_dir(assets["qwen2_5"], max_length=512)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [json.dumps(good).encode(), b"{oops", b"\xc3\x28", json.dumps(good).encode(),
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode()]
    batch = preprocess_rows(chat, rows, pad_id=7, want_text=True)
    assert [s == contract.STATUS_OK for s in batch.status] == [True, False, False, True, False]
    assert "not JSON" in batch.status[1] and "UTF-8" in batch.status[2] and "assistant" in batch.status[4]
    conversation = parse_conversation(rows[0])
    expected = chat.tokenize(conversation).input_ids
    n = len(expected)
    assert batch.num_tokens.tolist() == [n, 0, 0, n, 0]
    assert batch.input_ids.shape == (5, n) and batch.input_ids[0].tolist() == expected
    assert batch.attention_mask[1].sum() == 0 and (batch.input_ids[1] == 7).all()
    assert batch.text[0] == chat.render(conversation) and batch.text[1] == ""


def test_padding_budget_cuts_micro_batches():
    # sorted 10, 11, 20, 21: [10, 11, 20] would pad 10 + 9 = 19 of 60 slots (32%) > 15%: cut before 20
    assert [b.tolist() for b in plan_micro_batches([20, 10, 21, 11], max_rows=8, max_tokens=1000,
                                                   max_padding=0.15)] == [[1, 3], [0, 2]]
    assert len(plan_micro_batches([20, 10, 21, 11], max_rows=8, max_tokens=1000)) == 1
    with pytest.raises(ValueError, match="max_padding"):
        plan_micro_batches([1], max_rows=1, max_tokens=1, max_padding=1.0)


def test_a_failing_micro_batch_costs_only_its_rows():
    lengths = np.array([3, 9, 4, 8])
    ids = np.zeros((4, 9), np.int64)
    mask = (np.arange(9) < lengths[:, None]).astype(np.int64)
    batch = PreprocessedBatch(ids, mask, ["ok", "ok", "error: not JSON", "ok"], lengths.astype(np.int32),
                              np.zeros(4, bool))

    def score(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if ids.shape[1] > 5:  # the scoring model fails on the long micro-batch
            raise RuntimeError("rm_model failed: out of memory")
        return mask.sum(1).astype(np.float32)

    scored = score_in_micro_batches(batch, score, max_rows=8, max_tokens=12)
    assert scored.scores[0] == 3 and np.isnan(scored.scores[1:]).all()
    assert batch.status == ["ok", "error: rm_model failed: out of memory", "error: not JSON",
                            "error: rm_model failed: out of memory"]
    assert (scored.tokens, scored.slots, scored.calls) == (3, 3, 1)
    assert contract.is_ok(batch.status[0])


def test_a_row_the_scorer_refuses_is_found_alone_and_its_neighbours_are_scored():
    """A model's own code may refuse one row (ArmoRM's gating pattern missing from it): its micro-batch is scored
    again row by row, so only that row fails."""
    lengths = np.array([3, 4, 4, 3])
    ids = np.zeros((4, 4), np.int64)
    ids[2, 0] = 7  # the row the scorer refuses
    mask = (np.arange(4) < lengths[:, None]).astype(np.int64)
    batch = PreprocessedBatch(ids, mask, ["ok"] * 4, lengths.astype(np.int32), np.zeros(4, bool))

    def score(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if (ids[:, 0] == 7).any():
            raise ValueError("Token pattern not found in the list.")
        return mask.sum(1).astype(np.float32)

    scored = score_in_micro_batches(batch, score, max_rows=8, max_tokens=100)
    assert scored.scores.tolist()[:2] == [3, 4] and np.isnan(scored.scores[2]) and scored.scores[3] == 3
    assert batch.status == ["ok", "ok", "error: Token pattern not found in the list.", "ok"]
    assert scored.calls == 3  # the whole micro-batch failed; then rows 0, 1, 3 alone (row 2 failed alone)
