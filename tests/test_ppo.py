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
    kl = ppo.kl_estimate(logprobs, ref, "k1") * mask
    rewards = ppo.kl_penalized_rewards(scores, kl, mask, kl_coef=0.1)
    # kl = [0.5, -1.0, (masked) 0];  rewards = -0.1 * kl, + score 2.0 at index 1
    assert kl.tolist()[0] == pytest.approx([0.5, -1.0, 0.0])
    assert rewards.tolist()[0] == pytest.approx([-0.05, 2.1, 0.0])
    assert rewards.tolist()[1] == [0.0, 0.0, 0.0]  # a masked row gets no score anywhere


def test_kl_penalty_is_minus_kl_coef_times_the_estimate_on_the_masked_tokens():
    kl, mask = t([0.5, -1.0, 3.0]), t([1, 1, 0])
    # -0.2 * [0.5, -1.0, (masked) 3.0]: a positive KL (drift from the reference) lowers the reward
    assert ppo.kl_penalty(kl, mask, 0.2).tolist()[0] == pytest.approx([-0.1, 0.2, 0.0])
    assert ppo.kl_penalty(kl, mask, 0.0).abs().max().item() == 0.0


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


# -- KL estimators ---------------------------------------------------------------------------------------------------
def test_kl_estimators_k1_k2_k3_by_hand():
    logprobs, ref = t([-1.0, -2.0]), t([-1.5, -1.0])  # log_ratio = log pi_ref - log pi = [-0.5, 1.0]
    assert ppo.kl_estimate(logprobs, ref, "k1").tolist()[0] == pytest.approx([0.5, -1.0])
    assert ppo.kl_estimate(logprobs, ref, "k2").tolist()[0] == pytest.approx([0.125, 0.5])  # log_ratio^2 / 2
    # k3 = e^lr - 1 - lr: e^-0.5 - 1 + 0.5 = 0.10653;  e - 1 - 1 = 0.71828
    assert ppo.kl_estimate(logprobs, ref, "k3").tolist()[0] == pytest.approx([0.1065307, 0.7182818], abs=1e-6)
    same = t([-0.7, -3.0])
    for estimator in ("k1", "k2", "k3"):  # the same policy: no divergence, whatever the estimator
        assert ppo.kl_estimate(same, same, estimator).abs().max().item() == 0.0


def test_k1_and_k3_are_unbiased_k2_is_not():
    """Sampled from p, the mean of k1 and k3 approach KL(p || q); k2's mean is its own quantity."""
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())  # 0.1838
    tokens = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[tokens][None], q.log()[tokens][None]
    assert ppo.kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(exact, abs=5e-3)
    assert ppo.kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(exact, abs=5e-3)
    assert ppo.kl_estimate(logp, logq, "k3").min().item() >= 0  # k3 is never negative, k1 is
    assert ppo.kl_estimate(logp, logq, "k1").min().item() < 0


# -- critic-free estimators ------------------------------------------------------------------------------------------
VALID4 = torch.ones(4, dtype=torch.bool)


def test_grpo_normalises_by_the_group_mean_and_std():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0])  # groups of 2: [1, 3], [0, 0], [2, 4]
    shaped = ppo.group_normalized_scores(scores, torch.ones(6, dtype=torch.bool), group_size=2)
    # [1, 3]: mean 2, unbiased std sqrt(((-1)^2 + 1^2) / 1) = 1.41421 -> -0.70711, 0.70711;  [0, 0] all equal -> 0
    assert shaped.tolist() == pytest.approx([-0.7071063, 0.7071063, 0.0, 0.0, -0.7071063, 0.7071063], abs=1e-6)


def test_dr_grpo_subtracts_the_group_mean_without_the_std():
    scores = torch.tensor([1.0, 3.0, 5.0, 10.0, 10.0, 10.0])  # groups of 3: mean 3, mean 10
    shaped = ppo.group_normalized_scores(scores, torch.ones(6, dtype=torch.bool), 3, scale_by_std=False)
    assert shaped.tolist() == pytest.approx([-2.0, 0.0, 2.0, 0.0, 0.0, 0.0])


def test_rloo_baseline_is_the_mean_of_the_others():
    scores = torch.tensor([1.0, 2.0, 6.0, 3.0])  # one group of 4
    # 1 - (2+6+3)/3 = -2.6667;  2 - 10/3 = -1.3333;  6 - 2 = 4;  3 - 3 = 0
    assert ppo.leave_one_out_scores(scores, VALID4, 4).tolist() == pytest.approx([-8 / 3, -4 / 3, 4.0, 0.0])
    # equivalently n/(n-1) * (r - mean): mean 3 -> 4/3 * [-2, -1, 3, 0]
    assert ppo.leave_one_out_scores(torch.full((4,), 5.0), VALID4, 4).tolist() == [0.0] * 4


def test_group_estimators_leave_failed_rows_out():
    scores = torch.tensor([1.0, 0.0, 3.0, 0.0, 7.0, 0.0])  # row 1 and the whole tail of group 2 failed
    valid = torch.tensor([True, False, True, False, True, False])
    # group [1, x, 3]: mean 2, std sqrt(2) over the two valid rows; group [x, 7, x]: one valid row
    grpo = ppo.group_normalized_scores(scores, valid, 3)
    assert grpo.tolist() == pytest.approx([-0.7071063, 0.0, 0.7071063, 0.0, 0.0, 0.0], abs=1e-6)
    dr = ppo.group_normalized_scores(scores, valid, 3, scale_by_std=False)
    assert dr.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    rloo = ppo.leave_one_out_scores(scores, valid, 3)
    assert rloo.tolist() == pytest.approx([-2.0, 0.0, 2.0, 0.0, 0.0, 0.0])  # the lone valid row: no baseline, 0
    nan_scores = torch.where(valid, scores, torch.tensor(float("nan")))  # what a failed row's score may hold
    assert ppo.group_normalized_scores(nan_scores, valid, 3).tolist() == pytest.approx(grpo.tolist(), abs=1e-6)
    assert ppo.leave_one_out_scores(nan_scores, valid, 3).tolist() == pytest.approx(rloo.tolist())


def test_group_statistics_std_and_all_equal_groups():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 0.0])
    valid = torch.tensor([True, True, True, True, True, False])
    std, equal = ppo.group_statistics(scores, valid, 2)
    assert std.tolist() == pytest.approx([math.sqrt(2), 0.0, 0.0])
    assert equal.tolist() == [False, True, True]  # [2, 2] equal; [5, x] has one valid row


def test_shaped_scores_become_token_advantages():
    mask = t([1, 1, 1, 0], [1, 1, 0, 0])
    shaped = torch.tensor([0.5, -0.5])
    # no KL penalty in the reward (kl_in: loss): every response token gets its row's shaped score
    adv = ppo.shaped_score_advantages(shaped, torch.zeros(2, 4), mask, gamma=1.0)
    assert adv.tolist() == [[0.5, 0.5, 0.5, 0.0], [-0.5, -0.5, 0.0, 0.0]]
    # with a per-token penalty: the return-to-go of penalty + score at the last token
    kl_rewards = t([-0.1, -0.2, -0.3, 0.0], [-0.1, -0.1, 0.0, 0.0])
    adv = ppo.shaped_score_advantages(shaped, kl_rewards, mask, gamma=1.0)
    # row 0: t2 = -0.3 + 0.5 = 0.2, t1 = -0.2 + 0.2 = 0.0, t0 = -0.1 + 0.0 = -0.1
    assert adv.tolist()[0] == pytest.approx([-0.1, 0.0, 0.2, 0.0], abs=1e-6)
    assert adv.tolist()[1] == pytest.approx([-0.7, -0.6, 0.0, 0.0], abs=1e-6)  # t1 = -0.1 - 0.5, t0 = -0.1 - 0.6


def test_returns_to_go_with_discount():
    # G2 = 2, G1 = 1 + 0.5 * 2 = 2, G0 = 0 + 0.5 * 2 = 1; the padding stays 0
    assert ppo.returns_to_go(t([0.0, 1.0, 2.0, 9.0]), t([1, 1, 1, 0]), 0.5).tolist() == [[1.0, 2.0, 2.0, 0.0]]


def test_reinforce_pp_whitens_returns_over_the_global_batch():
    scores = torch.tensor([1.0, -1.0])
    mask = t([1, 1], [1, 0])
    adv = ppo.reinforce_pp_advantages(scores, torch.zeros(2, 2), mask, gamma=1.0)
    # returns: [[1, 1], [-1, 0]] over 3 tokens: mean 1/3, unbiased var ((2/3)^2 * 2 + (4/3)^2) / 2 = 4/3
    expected = [[(1 - 1 / 3) / math.sqrt(4 / 3)] * 2, [(-1 - 1 / 3) / math.sqrt(4 / 3), 0.0]]
    assert adv.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    # "global": the statistics come from `reduce` (all ranks); a second rank holding the same rows counts twice
    doubled = ppo.reinforce_pp_advantages(scores, torch.zeros(2, 2), mask, gamma=1.0, reduce=lambda x: 2 * x)
    # 6 tokens: mean 1/3, var (8/3 * 2) / 5 = 16/15
    assert doubled[0, 0].item() == pytest.approx((2 / 3) / math.sqrt(16 / 15), abs=1e-6)
    equal = ppo.reinforce_pp_advantages(torch.tensor([2.0, 2.0]), torch.zeros(2, 1), t([1], [1]), gamma=1.0)
    assert equal.abs().max().item() < 1e-3  # every reward equal: nothing to learn, not 1/eps


def test_dr_grpo_loss_sums_tokens_over_a_constant():
    logprobs = old = t([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    advantages, mask = t([1.0, 1.0, 1.0], [2.0, 0.0, 0.0]), t([1, 1, 1], [1, 0, 0])
    mean_loss, stats = ppo.policy_loss(logprobs, old, advantages, mask, 0.2)
    assert mean_loss.item() == pytest.approx(-5.0 / 4)  # token mean: -(1 + 1 + 1 + 2) / 4
    sum_loss, _ = ppo.policy_loss(logprobs, old, advantages, mask, 0.2, token_normalizer=6.0)
    assert sum_loss.item() == pytest.approx(-5.0 / 6)  # 2 rows x 3 max tokens
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0


def test_token_entropy_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert ppo.token_entropy(logits).item() == pytest.approx(1.5 * math.log(2))  # -(0.5 ln .5 + 2 * .25 ln .25)
    assert ppo.token_entropy(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))


def test_rollout_and_update_log_probs_agree_bit_for_bit():
    """The rollout's log-probs (with the entropy) and the update's come from different functions; they must agree
    exactly, or the first PPO ratio is not 1 and a step-1 KL to an identical reference is not 0."""
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 5, 1000) * 3, torch.randint(0, 1000, (3, 5))
    for temperature in (1.0, 0.7):
        with_entropy, _ = ppo.token_logprobs_and_entropy(logits, tokens, temperature)
        assert torch.equal(ppo.token_logprobs(logits, tokens, temperature), with_entropy)
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None])[..., 0]
        assert torch.allclose(with_entropy, expected, atol=1e-5)
