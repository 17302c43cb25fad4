"""The PPO maths against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from templar.trainer import ppo


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_masked_mean_and_whiten_ignore_padding():
    values, mask = t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])
    assert ppo.masked_mean(values, mask).item() == pytest.approx(2.0)
    # mean 2, unbiased var = (1 + 0 + 1) / (3 - 1) = 1  ->  (x - 2) / 1
    assert ppo.masked_whiten(values, mask).tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert ppo.masked_whiten(values, mask, shift_mean=False).tolist()[0] == pytest.approx([1.0, 2.0, 3.0, 0.0],
                                                                                          abs=1e-6)
    assert ppo.masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_token_logprobs_divides_logits_by_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1]])
    assert ppo.token_logprobs(logits, tokens).item() == pytest.approx(math.log(0.75))  # softmax = [1/4, 3/4]
    # T = 2: logits [0, ln3 / 2] -> probabilities proportional to [1, sqrt 3]
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert ppo.token_logprobs(logits, tokens, temperature=2.0).item() == pytest.approx(expected)


def test_last_token_index_uses_the_mask():
    mask = t([1, 1, 0], [1, 1, 1], [0, 0, 0])
    assert ppo.last_token_index(mask).tolist() == [1, 2, 0]


def test_kl_penalty_per_token_and_score_at_the_last_response_token():
    scores = torch.tensor([2.0, 5.0])
    logprobs = t([-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0])
    ref = t([-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0])
    mask = t([1, 1, 0], [0, 0, 0])  # second row: its reward failed, fully masked
    rewards, kl = ppo.kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # kl = [0.5, -1.0, (masked) 0];  rewards = -0.1 * kl, + score 2.0 at index 1
    assert kl.tolist()[0] == pytest.approx([0.5, -1.0, 0.0])
    assert rewards.tolist()[0] == pytest.approx([-0.05, 2.1, 0.0])
    assert rewards.tolist()[1] == [0.0, 0.0, 0.0]  # a masked row gets no score anywhere


def test_gae_by_hand():
    # gamma 1, lam 0.5, values [0.5, 0.2, 0.1], reward 1 at the end:
    # t2: delta = 1 - 0.1 = 0.9, A = 0.9;  t1: delta = 0.1 - 0.2 = -0.1, A = -0.1 + 0.5 * 0.9 = 0.35
    # t0: delta = 0.2 - 0.5 = -0.3, A = -0.3 + 0.5 * 0.35 = -0.125;  returns = A + V
    adv, ret = ppo.gae_advantages(t([0.0, 0.0, 1.0]), t([0.5, 0.2, 0.1]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([-0.125, 0.35, 0.9])
    assert ret.tolist()[0] == pytest.approx([0.375, 0.55, 1.0])


def test_gae_masks_padding_after_the_response():
    # padding (mask 0) carries junk rewards/values that must not leak: V after the last real token is 0
    # t1: delta = 2 + 0.9 * 0 - 0.4 = 1.6;  t0: delta = 0 + 0.9 * 0.4 - 0.3 = 0.06, A = 0.06 + 0.9 * 1.6 = 1.5
    adv, ret = ppo.gae_advantages(t([0.0, 2.0, 5.0]), t([0.3, 0.4, 9.0]), t([1, 1, 0]), gamma=0.9, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([1.5, 1.6, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.8, 2.0, 0.0])


def test_policy_loss_clips_the_ratio():
    # ratio [1, 2], A = 1, eps 0.2: unclipped [-1, -2], clipped [-1, -1.2] -> max [-1, -1.2] -> mean -1.1
    loss, stats = ppo.policy_loss(t([0.0, math.log(2.0)]), t([0.0, 0.0]), t([1.0, 1.0]), t([1, 1]), 0.2)
    assert loss.item() == pytest.approx(-1.1)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # ratio 0.5, A = -1: unclipped 0.5, clipped 0.8 -> 0.8
    loss, stats = ppo.policy_loss(t([math.log(0.5)]), t([0.0]), t([-1.0]), t([1]), 0.2)
    assert loss.item() == pytest.approx(0.8) and stats["clipfrac"].item() == 1.0
    # padding is ignored entirely
    loss, _ = ppo.policy_loss(t([0.0, 50.0]), t([0.0, 0.0]), t([1.0, 1e6]), t([1, 0]), 0.2)
    assert loss.item() == pytest.approx(-1.0)


def test_value_loss_clips_around_old_values():
    # clipped values [0.5 + 0.2, 2.0]; losses unclipped [0.04, 1], clipped [0.25, 1] -> 0.5 * mean(0.25, 1)
    loss, stats = ppo.value_loss(t([1.0, 2.0]), t([0.5, 2.0]), t([1.2, 1.0]), t([1, 1]), 0.2)
    assert loss.item() == pytest.approx(0.3125)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    controller = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=1000)  # error clipped to +0.2 -> x(1 + 0.2 * 0.1)
    assert controller.value == pytest.approx(0.102)
    controller.update(current_kl=3.0, n_steps=1000)  # error -0.5 clipped to -0.2 -> x(1 - 0.02)
    assert controller.value == pytest.approx(0.102 * 0.98)
    fixed = ppo.FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    restored = ppo.AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
