"""The trainer's wiring: every config value and every mask reaches the PPO maths as the config says.

tests/test_ppo.py pins the maths (trainer/ppo.py) by hand. These tests run the trainer's OWN step code on tiny inputs
(`PPOTrainer.collect / evaluate / advantages / update / metrics / step`, the estimators' `compute`, `actor_loss`,
`RewardModels.collect`) and check the value each key implies, by hand or through the tested `ppo` function, and that
changing the key changes the result as the formula says; and that a masked token (a row no RM scored, the padding
after a response's stop token) changes nothing. No server and no DeepSpeed: the rewards are given, and the engines
are a stand-in with the optimizer `make_engine` hands DeepSpeed. `make mutations` (tools/mutations.py) breaks the call
sites one line at a time and checks that these tests notice.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from templar.padding import position_ids
from templar.reward_client import RewardResult
from templar.tiny_models import TinySize, tiny_config
from templar.trainer import ppo, train
from templar.trainer.actor import Rollout, cut_at_stop, response_logprobs, response_values
from templar.trainer.config import TrainConfig, load_config
from templar.trainer.distributed import World
from templar.trainer.estimators import ESTIMATORS
from templar.trainer.models import load_actor, load_critic, load_reference
from templar.trainer.rewards import RewardModels, reward_conversations
from templar.trainer.train import Evaluation, PPOTrainer, Scored, StepTimes, actor_loss, kl_controller

VOCAB, STOP, PAD = 24, 1, 0
QUERY = torch.tensor([[0, 0, 7, 8], [3, 4, 5, 6], [0, 9, 10, 11], [12, 13, 14, 15]])  # left-padded prompts
# four responses of 4 tokens: never ends (cut at max_new_tokens), stops at 1, stops at 2, stops at 0
RESPONSES = [[3, 4, 5, 6], [7, STOP, 9, 9], [2, 3, STOP, 5], [STOP, 4, 4, 4]]
SCORES = [2.0, -1.0, 0.0, 0.5]  # row 2 is the one the RM fails to score
FAILED = (2,)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
BASE = ("reward.models.0.name=rm", "reward.unfinished_penalty=0.0", "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4", "ppo.micro_batch_size=4", "ppo.ppo_epochs=1", "generation.max_new_tokens=4",
        "ppo.whiten_advantages=false")


def config(*overrides: str) -> TrainConfig:
    """Through load_config, as `templar train key=value` reads them."""
    return load_config(None, [*BASE, *overrides])


def close(a: torch.Tensor, b, atol: float = 1e-6) -> bool:
    return torch.allclose(a.float(), torch.as_tensor(b, dtype=torch.float32), atol=atol, rtol=1e-5)


# -- the pieces of a step --------------------------------------------------------------------------------------------
class Engine:
    """What the trainer uses of a DeepSpeed engine (`module`, forward, `backward`, `step`), around the optimizer
    `make_engine` gives DeepSpeed (AdamW with its default weight decay). It steps on every micro-batch, so the configs
    here keep mini_batch_size = micro_batch_size, where DeepSpeed does the same."""

    def __init__(self, module: torch.nn.Module, lr: float) -> None:
        self.module = module
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, eps=1e-5)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


class GivenRewards(RewardModels):
    """The trainer's own RewardModels (weights, normalisation, unfinished penalty, validity), with each RM's result
    given instead of asked for over gRPC."""

    def __init__(self, cfg: TrainConfig, results: dict[str, RewardResult]) -> None:
        super().__init__(cfg.reward, ["127.0.0.1:1"])  # the clients connect lazily: never here
        self.results = results

    def submit(self, conversations: list[dict]) -> dict:
        pending = {}
        for name, result in self.results.items():
            pending[name] = concurrent.futures.Future()
            pending[name].set_result(result)
        return pending


class Prompts:
    def next_batch(self, n: int) -> list:
        return [[{"role": "user", "content": f"question {i}"}] for i in range(n)]


def rm_result(scores: list[float], failed=FAILED, junk: float = float("nan")) -> RewardResult:
    n = len(scores)
    values = np.array([junk if i in failed else s for i, s in enumerate(scores)], dtype=np.float32)
    status = ["error: reward request failed" if i in failed else "ok" for i in range(n)]
    return RewardResult(values, status, np.full(n, 9, dtype=np.int32), np.zeros(n, dtype=bool), 0.01, 1)


def bare_trainer(cfg: TrainConfig, output_dir: Path, actor=None, critic=None, reference=None) -> PPOTrainer:
    """A PPOTrainer without servers or DeepSpeed: what __init__ derives from the config, through the same functions."""
    t = object.__new__(PPOTrainer)
    t.config, t.world, t.output_dir = cfg, World(rank=0, size=1, local_rank=0), Path(output_dir)
    t.estimator, t.group_size = ESTIMATORS[cfg.ppo.advantage_estimator], cfg.generation.samples_per_prompt
    t.kl_ctl = kl_controller(cfg.ppo)
    t.actor, t.critic, t.reference = actor, critic, reference
    t.actor_chat, t.stop_ids, t.pad_id = None, [STOP], PAD
    t.data, t.rewards = Prompts(), GivenRewards(cfg, {"rm": rm_result(SCORES)})
    t.shuffle = torch.Generator().manual_seed(cfg.seed)
    t.times, t.checkpoint_s = StepTimes(), 0.0
    return t


def rollout_of(responses=RESPONSES, junk: int | None = None) -> Rollout:
    """The responses cut at their first stop token by the actor's own cut_at_stop; `junk` replaces every token
    after a stop token, and every token of the failed rows but their stop token (what masking must make harmless)."""
    ids, mask, ended = cut_at_stop(torch.tensor(responses), [STOP], PAD)
    if junk is not None:
        hidden = ~mask.bool()
        for row in FAILED:
            hidden[row] |= ids[row] != STOP
        ids = torch.where(hidden, torch.full_like(ids, junk), ids)
    return Rollout(QUERY, (QUERY != PAD).long(), ids, mask, ended, [f"answer {i}" for i in range(len(responses))])


def scored_by(t: PPOTrainer, rollout: Rollout, step: int = 1) -> Scored:
    conversations = reward_conversations(t.data.next_batch(len(rollout.texts)), rollout.texts)
    return t.collect(step, conversations, rollout, t.rewards.submit(conversations))


# Synthetic evaluations for the tensor-level tests: the k1 estimate log pi - log pi_ref on the response tokens,
# and junk (9, 7) where the mask is 0, which must never show.
K1 = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.3, 0.2, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0], [0.4, 9.0, 9.0, 9.0]])
REF = torch.full((4, 4), -2.0)
VALUES = torch.tensor([[0.5, 0.2, 0.1, 0.3], [0.4, 0.6, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0], [0.2, 9.0, 9.0, 9.0]])
ENTROPY = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0], [2.5, 9.0, 9.0, 9.0]])


def evaluation(values: torch.Tensor | None = None) -> Evaluation:
    return Evaluation(REF + K1, REF.clone(), values, ENTROPY.clone())


def advantages_for(tmp_path: Path, *overrides: str, values: torch.Tensor | None = None,
                   kl_coef: float | None = None):
    cfg = config(*overrides)
    t = bare_trainer(cfg, tmp_path)
    if kl_coef is not None:
        t.kl_ctl.value = kl_coef  # what the (adaptive) controller says now, not the config's starting value
    if values is None and t.estimator.needs_critic:
        values = torch.zeros(4, 4)
    return t.advantages(scored_by(t, rollout_of()), evaluation(values))


# -- step 4: rows no RM scored, responses cut at max length ----------------------------------------------------------
def test_collect_masks_out_the_rows_an_rm_failed_to_score(tmp_path):
    t = bare_trainer(config(), tmp_path)
    s = scored_by(t, rollout_of())
    assert s.mask.tolist() == MASK.tolist()  # the failed row is out entirely; the others up to their stop token
    assert s.batch.valid.tolist() == [True, True, False, True] and s.failed == 1
    assert s.scores.tolist() == [2.0, -1.0, 0.0, 0.5]  # finite (masked anyway), never NaN in the maths
    unscored = [json.loads(line) for line in (tmp_path / "unscored.rank0.jsonl").read_text().splitlines()]
    assert len(unscored) == 1 and unscored[0]["messages"][-1]["content"] == "answer 2"


def test_the_response_mask_runs_to_the_first_stop_token_or_to_max_length():
    ids, mask, ended = cut_at_stop(torch.tensor(RESPONSES), [STOP], PAD)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]  # the stop token counts
    assert ended.tolist() == [False, True, True, True]
    assert ids.tolist()[1] == [7, STOP, PAD, PAD]


def test_rewards_combine_weights_normalisation_and_the_unfinished_penalty(tmp_path):
    cfg = config("reward.models=[{name: a, weight: 2.0}, {name: b, weight: 0.5, normalize: true}]",
                 "reward.unfinished_penalty=1.5")
    b_scores = [1.0, 3.0, 5.0, 7.0]
    rewards = GivenRewards(cfg, {"a": rm_result(SCORES, failed=()), "b": rm_result(b_scores)})
    batch = rewards.collect(rewards.submit([]), np.array([False, True, True, True]))
    good = np.array([1.0, 3.0, 7.0])  # b's running moments see only the rows every RM scored
    b_normalized = (np.array(b_scores) - good.mean()) / good.std()
    expected = 2.0 * np.array(SCORES) + 0.5 * b_normalized - 1.5 * np.array([1, 0, 0, 0])
    assert batch.valid.tolist() == [True, True, False, True]  # b failed row 2: the row is out, whatever a said
    assert np.isnan(batch.scores[2])
    np.testing.assert_allclose(batch.scores[[0, 1, 3]], expected[[0, 1, 3]], rtol=1e-6)


# -- step 5: KL in the reward, the estimators --------------------------------------------------------------------------
def test_the_kl_penalty_enters_the_reward_as_minus_kl_coef_times_the_estimate(tmp_path):
    # gamma = lam = 1 and V = 0: A_t = score - kl_coef * (sum of the KL from t to the end); suffix sums of the KL:
    # row 0 [1.5, 1.0, 2.0, 0.0], row 1 [0.5, 0.2], row 3 [0.4]
    advantages, returns, kl = advantages_for(tmp_path, "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.kl_coef=0.1")
    assert close(kl, K1 * MASK)  # the k1 estimate, masked: the failed row and the padding read 0
    expected = [[1.85, 1.9, 1.8, 2.0], [-1.05, -1.02, 0, 0], [0, 0, 0, 0], [0.46, 0, 0, 0]]
    assert close(advantages, expected) and close(returns, expected)
    # drifting from the reference (a positive KL) lowers the reward: more KL coefficient, lower advantages
    advantages, _, _ = advantages_for(tmp_path, "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.kl_coef=0.1", kl_coef=0.2)
    assert close(advantages, [[1.7, 1.8, 1.6, 2.0], [-1.1, -1.04, 0, 0], [0, 0, 0, 0], [0.42, 0, 0, 0]])
    advantages, _, _ = advantages_for(tmp_path, "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.kl_coef=0.0")
    assert close(advantages, [[2.0] * 4, [-1.0, -1.0, 0, 0], [0] * 4, [0.5, 0, 0, 0]])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_the_kl_estimator_key_picks_the_estimate(tmp_path, estimator):
    advantages, _, kl = advantages_for(tmp_path, f"ppo.kl_estimator={estimator}", "ppo.gamma=1.0", "ppo.lam=1.0",
                                       "ppo.kl_coef=0.1")
    expected_kl = ppo.kl_estimate(REF + K1, REF, estimator) * MASK
    assert close(kl, expected_kl)
    # row 0's first advantage: 2.0 - 0.1 * (its whole KL)
    assert advantages[0, 0].item() == pytest.approx(2.0 - 0.1 * expected_kl[0].sum().item(), abs=1e-6)
    others = [ppo.kl_estimate(REF + K1, REF, e) * MASK for e in ("k1", "k2", "k3") if e != estimator]
    assert all(not close(kl, other) for other in others)  # the three differ here, so the key is seen


def test_kl_in_loss_keeps_the_kl_out_of_the_reward(tmp_path):
    in_loss, _, kl = advantages_for(tmp_path, "ppo.kl_in=loss", "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.kl_coef=0.5")
    no_kl, _, _ = advantages_for(tmp_path, "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.kl_coef=0.0")
    in_reward, _, _ = advantages_for(tmp_path, "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.kl_coef=0.5")
    assert close(in_loss, no_kl) and not close(in_reward, no_kl)
    assert close(kl, K1 * MASK)  # still estimated (for the metrics)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (0.5, 0.0), (0.5, 1.0)])
def test_gamma_and_lam_reach_gae(tmp_path, gamma, lam):
    advantages, returns, _ = advantages_for(tmp_path, f"ppo.gamma={gamma}", f"ppo.lam={lam}", "ppo.kl_coef=0.1",
                                            values=VALUES)
    scores = torch.tensor([2.0, -1.0, 0.0, 0.5])
    rewards = ppo.kl_penalized_rewards(scores, K1 * MASK, MASK, 0.1)
    expected_adv, expected_ret = ppo.gae_advantages(rewards, VALUES, MASK, gamma, lam)
    assert close(advantages, expected_adv) and close(returns, expected_ret)
    # row 1 by hand (rewards [-0.03, -1.02], V [0.4, 0.6], V after the end 0):
    # delta_1 = -1.02 - 0.6 = -1.62;  delta_0 = -0.03 + gamma * 0.6 - 0.4;  A_0 = delta_0 + gamma * lam * A_1
    delta_0 = -0.03 + gamma * 0.6 - 0.4
    assert advantages[1, :2].tolist() == pytest.approx([delta_0 + gamma * lam * -1.62, -1.62], abs=1e-6)


def test_advantage_whitening_over_the_masked_tokens_only(tmp_path):
    raw, _, _ = advantages_for(tmp_path, "ppo.kl_coef=0.1", values=VALUES)
    whitened, _, _ = advantages_for(tmp_path, "ppo.kl_coef=0.1", "ppo.whiten_advantages=true", values=VALUES)
    assert close(whitened, ppo.masked_whiten(raw, MASK))
    tokens = whitened[MASK.bool()]
    assert tokens.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert tokens.std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased, over the 7 scored tokens
    assert whitened[~MASK.bool()].abs().max().item() == 0.0


def test_reward_whitening_before_gae(tmp_path):
    plain, plain_returns, _ = advantages_for(tmp_path, "ppo.kl_coef=0.1", values=VALUES)
    whitened, returns, _ = advantages_for(tmp_path, "ppo.kl_coef=0.1", "ppo.whiten_rewards=true", values=VALUES)
    rewards = ppo.kl_penalized_rewards(torch.tensor([2.0, -1.0, 0.0, 0.5]), K1 * MASK, MASK, 0.1)
    expected, expected_returns = ppo.gae_advantages(ppo.masked_whiten(rewards, MASK, shift_mean=False), VALUES,
                                                    MASK, 1.0, 0.95)
    assert close(whitened, expected) and close(returns, expected_returns)
    assert not close(whitened, plain) and not close(returns, plain_returns)


GROUPS = ("generation.samples_per_prompt=2", "ppo.rollout_batch_size=2")
# groups (rows 0, 1): scores 2, -1 -> mean 0.5, std sqrt(4.5) = 2.1213;  (rows 2, 3): row 2 failed, row 3 alone
CRITIC_FREE = {
    "grpo": [1.5 / math.sqrt(4.5), -1.5 / math.sqrt(4.5), 0.0, 0.0],
    "dr_grpo": [1.5, -1.5, 0.0, 0.0],
    "rloo": [3.0, -3.0, 0.0, 0.0],  # r_i - the mean of the group's OTHER valid rows; a row alone gets 0
}


@pytest.mark.parametrize("estimator", sorted(CRITIC_FREE))
def test_group_estimators_shape_the_score_of_each_row(tmp_path, estimator):
    advantages, returns, _ = advantages_for(tmp_path, f"ppo.advantage_estimator={estimator}", *GROUPS,
                                            "ppo.kl_in=loss", "ppo.kl_coef=0.3")
    assert returns is None
    expected = torch.tensor(CRITIC_FREE[estimator])[:, None] * MASK  # the shaped score on every scored token
    assert close(advantages, expected, atol=1e-5)


def test_group_estimators_discount_the_kl_penalty_with_gamma(tmp_path):
    advantages, _, kl = advantages_for(tmp_path, "ppo.advantage_estimator=grpo", *GROUPS, "ppo.kl_coef=0.1",
                                       "ppo.gamma=0.9")
    shaped = torch.tensor(CRITIC_FREE["grpo"])
    assert close(advantages, ppo.shaped_score_advantages(shaped, ppo.kl_penalty(kl, MASK, 0.1), MASK, 0.9),
                 atol=1e-5)
    # row 1 by hand: rewards [-0.03, -0.02 + shaped]; A_1 = -0.02 + shaped, A_0 = -0.03 + 0.9 * A_1
    a1 = -0.02 + CRITIC_FREE["grpo"][1]
    assert advantages[1, :2].tolist() == pytest.approx([-0.03 + 0.9 * a1, a1], abs=1e-5)


def test_reinforce_pp_whitens_the_returns_over_the_scored_tokens(tmp_path):
    advantages, returns, _ = advantages_for(tmp_path, "ppo.advantage_estimator=reinforce_pp", "ppo.kl_coef=0.1",
                                            "ppo.gamma=0.5")
    assert returns is None
    raw = ppo.returns_to_go(ppo.kl_penalized_rewards(torch.tensor([2.0, -1.0, 0.0, 0.5]), K1 * MASK, MASK, 0.1),
                            MASK, 0.5)
    assert close(advantages, ppo.masked_global_whiten(raw, MASK))
    tokens = advantages[MASK.bool()]
    assert tokens.mean().item() == pytest.approx(0.0, abs=1e-6) and tokens.std().item() == pytest.approx(1.0, 1e-4)


# -- the actor's loss ------------------------------------------------------------------------------------------------
def test_actor_loss_uses_clip_range_and_the_kl_loss_settings():
    logprobs, old, ref = torch.tensor([[0.0, math.log(2.0)]]), torch.zeros(1, 2), torch.tensor([[-0.5, 0.5]])
    advantages, mask = torch.ones(1, 2), torch.ones(1, 2)
    # ratio [1, 2], A = 1: clip 0.2 -> mean(-1, -1.2) = -1.1;  clip 0.5 -> mean(-1, -1.5) = -1.25
    for clip, expected in ((0.2, -1.1), (0.5, -1.25)):
        loss, stats = actor_loss(logprobs, old, ref, advantages, mask, config(f"ppo.clip_range={clip}").ppo, 0.3, None)
        assert loss.item() == pytest.approx(expected) and stats["policy_loss"].item() == pytest.approx(expected)
        assert "kl_loss" not in stats  # kl_in: reward
    for estimator in ("k1", "k3"):
        p = config("ppo.kl_in=loss", f"ppo.kl_estimator={estimator}").ppo
        loss, stats = actor_loss(logprobs, old, ref, advantages, mask, p, 0.3, None)
        kl = ppo.masked_mean(ppo.kl_estimate(logprobs, ref, estimator), mask).item()
        assert stats["kl_loss"].item() == pytest.approx(kl)
        assert loss.item() == pytest.approx(-1.1 + 0.3 * kl)  # + kl_coef x KL: drifting costs
    # Dr. GRPO: the token sum over a constant: (-1 - 1.2) / 8
    loss, _ = actor_loss(logprobs, old, ref, advantages, mask, config().ppo, 0.3, 8.0)
    assert loss.item() == pytest.approx(-2.2 / 8)


def test_kl_controller_follows_the_config():
    fixed = kl_controller(config("ppo.kl_coef=0.07").ppo)
    assert type(fixed) is ppo.FixedKLController and fixed.value == 0.07
    adaptive = kl_controller(config("ppo.adaptive_kl=true", "ppo.kl_coef=0.07", "ppo.target_kl=2.0",
                                    "ppo.kl_horizon=50").ppo)
    assert isinstance(adaptive, ppo.AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.07, 2.0, 50)


# -- metrics -----------------------------------------------------------------------------------------------------------
def metrics_of(tmp_path: Path, *overrides: str, losses: dict | None = None, junk: bool = False) -> dict:
    t = bare_trainer(config("ppo.kl_coef=0.1", *overrides), tmp_path)
    rollout = rollout_of()
    if junk:  # other numbers wherever the mask is 0 (and another score for the failed row)
        t.rewards = GivenRewards(t.config, {"rm": rm_result(SCORES, junk=123.0)})
    s = scored_by(t, rollout)
    old = evaluation(VALUES.clone())
    if junk:
        hidden = ~MASK.bool()
        for tensor in (old.logprobs, old.ref_logprobs, old.values, old.entropy):
            tensor[hidden] = torch.rand(int(hidden.sum())) * 50 - 25
    advantages, returns, kl = t.advantages(s, old)
    losses = losses or {"policy_loss": [0.4, 0.0], "scored": [1.0, 0.0], "ratio_max": [1.5, 1.0]}
    return untimed(t.metrics(rollout, s, old, kl, advantages, returns, losses, 2.0))


def untimed(metrics: dict) -> dict:
    """The metrics without the measured times (which differ run to run)."""
    return {k: v for k, v in metrics.items()
            if not k.startswith("time/") and k not in ("step_time_s", "reward_wait_s", "reward_wait_share")}


def test_metrics_average_over_scored_rows_and_tokens_only(tmp_path):
    m = metrics_of(tmp_path)
    assert m["reward_mean"] == pytest.approx((2.0 - 1.0 + 0.5) / 3) and m["score/rm"] == pytest.approx(0.5)
    assert m["kl_mean"] == pytest.approx((1.5 + 0.5 + 0.4) / 3)  # k1 summed over each scored row's tokens
    assert m["kl_per_token"] == pytest.approx(2.4 / 7) and m["kl_estimate_mean"] == pytest.approx(0.8)
    assert m["entropy"] == pytest.approx((10.0 + 2.0 + 2.5) / 7)
    assert m["failed_rows"] == 1 and m["unfinished_rows"] == 1
    assert m["policy_loss"] == pytest.approx(0.4)  # the micro-batch with no scored token is not averaged in
    assert m["ratio_max"] == 1.5
    t = bare_trainer(config("ppo.kl_coef=0.1"), tmp_path)
    advantages, returns, _ = t.advantages(scored_by(t, rollout_of()), evaluation(VALUES.clone()))
    a = advantages[MASK.bool()].double()
    assert m["advantage_mean"] == pytest.approx(a.mean().item())
    assert m["advantage_std"] == pytest.approx(a.std(unbiased=False).item(), rel=1e-5)
    r, v = returns[MASK.bool()].double(), VALUES[MASK.bool()].double()
    assert m["explained_variance"] == pytest.approx(1 - (r - v).var(unbiased=False).item() / r.var(unbiased=False)
                                                    .item(), rel=1e-5)


def test_masked_tokens_change_no_metric(tmp_path):
    assert metrics_of(tmp_path, junk=True) == metrics_of(tmp_path)


def test_the_adaptive_controller_moves_with_the_kl_of_the_scored_rows(tmp_path):
    m = metrics_of(tmp_path, "ppo.adaptive_kl=true", "ppo.target_kl=0.5", "ppo.kl_horizon=10")
    # KL 0.8 per scored row: error 0.8 / 0.5 - 1 = 0.6, clipped to 0.2; 3 scored rows over a horizon of 10
    assert m["kl_coef"] == pytest.approx(0.1 * (1 + 0.2 * 3 / 10))
    m = metrics_of(tmp_path, "ppo.adaptive_kl=true", "ppo.target_kl=8.0", "ppo.kl_horizon=10")
    assert m["kl_coef"] == pytest.approx(0.1 * (1 - 0.2 * 3 / 10))  # 0.8 / 8 - 1 = -0.9, clipped to -0.2


# -- a tiny real model through evaluate / update / step --------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 causal LM (24 tokens, one layer), saved as a Hugging Face folder the trainer's loaders read."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2_5", VOCAB, PAD, TinySize(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=1, intermediate_size=32,
                                                       max_position_embeddings=32))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("tiny") / "actor"
    model.save_pretrained(out, safe_serialization=True)
    return out


def model_trainer(cfg: TrainConfig, model_dir: Path, output_dir: Path) -> PPOTrainer:
    """Actor, critic and reference as the trainer loads them; the actor nudged away from the reference (a KL > 0)."""
    assert cfg.ppo.mini_batch_size == cfg.ppo.micro_batch_size  # Engine steps every micro-batch
    actor = load_actor(model_dir)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1)
        for param in actor.parameters():
            param.add_(0.05 * torch.randn_like(param))
    critic = Engine(load_critic("actor", model_dir), cfg.ppo.critic_lr) if ESTIMATORS[
        cfg.ppo.advantage_estimator].needs_critic else None
    return bare_trainer(cfg, output_dir, Engine(actor, cfg.ppo.actor_lr), critic, load_reference(model_dir))


def weights(t: PPOTrainer) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, engine in t.engines.items()
            for k, v in engine.module.state_dict().items()}


def test_evaluate_reads_logprobs_at_the_sampling_temperature(tmp_path, model_dir):
    rollout = rollout_of()
    sequences, attention = rollout.sequences
    seen = {}
    for temperature in (1.0, 2.0):
        t = model_trainer(config(f"generation.temperature={temperature}"), model_dir, tmp_path)
        old = t.evaluate(rollout)
        for name, model, got in (("actor", t.actor.module, old.logprobs), ("reference", t.reference,
                                                                           old.ref_logprobs)):
            with torch.no_grad():
                logits = model(input_ids=sequences, attention_mask=attention,
                               position_ids=position_ids(attention)).logits[:, QUERY.shape[1] - 1:-1]
            log_p = torch.log_softmax(logits.float() / temperature, -1)  # logits / T, by hand
            assert close(got, log_p.gather(-1, rollout.response_ids[..., None])[..., 0], atol=1e-5), name
            if name == "actor":
                assert close(old.entropy, -(log_p.exp() * log_p).sum(-1), atol=1e-5)
        seen[temperature] = old
    assert not close(seen[1.0].logprobs, seen[2.0].logprobs)
    assert not close(seen[1.0].logprobs, seen[1.0].ref_logprobs)  # the reference is the reference model


# old log-probs / values made to differ from the current ones so that the clip ranges matter: with these
# advantages, clip_range 0.1 clips 3 of the 7 scored tokens' ratios, 0.3 clips 2
LOGPROB_SHIFT = torch.tensor([[-0.5, 0.5, -0.18, 0.0], [0.0, 0.4, 0.0, 0.0], [0.0] * 4, [0.3, 0.0, 0.0, 0.0]])
ADVANTAGES = torch.tensor([[1.0, -1.0, 2.0, 0.5], [-2.0, 1.0, 0.0, 0.0], [0.0] * 4, [1.5, 0.0, 0.0, 0.0]])
OLD_VALUES = torch.tensor([[0.5, -0.5, 0.1, 0.0], [0.3, -0.2, 0.0, 0.0], [0.0] * 4, [-0.6, 0.0, 0.0, 0.0]])
RETURNS = torch.tensor([[0.5, 1.0, -1.0, 0.2], [1.0, -0.3, 0.0, 0.0], [0.0] * 4, [2.0, 0.0, 0.0, 0.0]])


def one_update(tmp_path: Path, model_dir: Path, *overrides: str) -> tuple[PPOTrainer, Evaluation, dict]:
    """One update of every row in one micro-batch, from shifted old log-probs and values, with given advantages;
    also what the models said before it."""
    t = model_trainer(config("ppo.actor_lr=0.01", "ppo.critic_lr=0.01", *overrides), model_dir, tmp_path)
    rollout = rollout_of()
    s = scored_by(t, rollout)
    old = t.evaluate(rollout)
    before = {"logprobs": old.logprobs.clone()}  # the actor before the update, at the temperature
    old.logprobs = old.logprobs + LOGPROB_SHIFT
    if t.critic is not None:
        sequences, attention = rollout.sequences
        with torch.no_grad():
            before["values"] = response_values(t.critic, sequences, attention, 4)
        old.values = OLD_VALUES.clone()
    returns = RETURNS if t.critic is not None else None
    losses = t.update(rollout, old, ADVANTAGES, returns, s.mask)
    return t, old, {"losses": losses, "mask": s.mask, **before}


@pytest.mark.parametrize("clip", [0.1, 0.3])
def test_update_uses_clip_range_and_the_temperature(tmp_path, model_dir, clip):
    for temperature in (1.0, 0.5):  # at 0.5, log-probs at another temperature than evaluate's break the ratios
        _, old, r = one_update(tmp_path, model_dir, f"ppo.clip_range={clip}", f"generation.temperature={temperature}")
        expected, stats = ppo.policy_loss(r["logprobs"], old.logprobs, ADVANTAGES, r["mask"], clip)
        assert r["losses"]["policy_loss"] == [pytest.approx(expected.item(), abs=1e-6)]
        assert r["losses"]["clipfrac"] == [pytest.approx(stats["clipfrac"].item(), abs=1e-6)]
        assert stats["clipfrac"].item() == pytest.approx((3 if clip == 0.1 else 2) / 7)


@pytest.mark.parametrize("clip_value", [0.05, 0.4])
def test_update_uses_value_clip_range(tmp_path, model_dir, clip_value):
    _, old, r = one_update(tmp_path, model_dir, f"ppo.clip_range_value={clip_value}", "ppo.clip_range=0.2")
    expected, stats = ppo.value_loss(r["values"], old.values, RETURNS, r["mask"], clip_value)
    assert r["losses"]["value_loss"] == [pytest.approx(expected.item(), abs=1e-6)]
    assert r["losses"]["vf_clipfrac"] == [pytest.approx(stats["vf_clipfrac"].item(), abs=1e-6)]
    other, _ = ppo.value_loss(r["values"], old.values, RETURNS, r["mask"], 0.2)
    assert expected.item() != pytest.approx(other.item())  # the policy's clip_range would give another loss


def test_dr_grpo_sums_over_tokens_and_divides_by_a_constant(tmp_path, model_dir):
    _, old, r = one_update(tmp_path, model_dir, "ppo.advantage_estimator=dr_grpo", *GROUPS)
    expected, _ = ppo.policy_loss(r["logprobs"], old.logprobs, ADVANTAGES, r["mask"], 0.2, 4 * 4)  # micro x max new
    assert r["losses"]["policy_loss"] == [pytest.approx(expected.item(), abs=1e-6)]


@pytest.mark.parametrize("kl_in, estimator", [("loss", "k3"), ("loss", "k1"), ("reward", "k3")])
def test_the_update_steps_on_the_assembled_loss(tmp_path, model_dir, kl_in, estimator):
    """The weights after the trainer's update equal those after a hand-written one on the documented loss."""
    t, old, r = one_update(tmp_path, model_dir, "ppo.advantage_estimator=grpo", *GROUPS, f"ppo.kl_in={kl_in}",
                           f"ppo.kl_estimator={estimator}", "ppo.kl_coef=0.5")
    hand = model_trainer(t.config, model_dir, tmp_path)
    idx = torch.randperm(4, generator=torch.Generator().manual_seed(t.config.seed))  # the trainer's row order
    sequences, attention = rollout_of().sequences
    logprobs = response_logprobs(hand.actor.module, sequences[idx], attention[idx], 4, 1.0)
    mask = r["mask"][idx]
    loss, _ = ppo.policy_loss(logprobs, old.logprobs[idx], ADVANTAGES[idx], mask, 0.2)
    kl = ppo.masked_mean(ppo.kl_estimate(logprobs, old.ref_logprobs[idx], estimator), mask)
    if kl_in == "loss":  # + kl_coef x the mean KL estimate to the reference over the scored tokens
        loss = loss + 0.5 * kl
        assert r["losses"]["kl_loss"] == [pytest.approx(kl.item(), abs=1e-6)]
    else:
        assert "kl_loss" not in r["losses"]
    hand.actor.backward(loss)
    hand.actor.step()
    got, expected = weights(t), weights(hand)
    assert all(torch.allclose(got[k], expected[k], rtol=0, atol=1e-7) for k in got)


def run_step(tmp_path: Path, model_dir: Path, rollout: Rollout, *overrides: str, monkeypatch, failed=FAILED,
             junk: float = float("nan")) -> tuple[PPOTrainer, dict, dict]:
    """PPOTrainer.step itself, on a given rollout (no sampling) and given RM results: (trainer, metrics, losses)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = config("ppo.actor_lr=0.01", "ppo.critic_lr=0.01", "ppo.micro_batch_size=2", "ppo.mini_batch_size=2",
                 "ppo.ppo_epochs=2", "ppo.whiten_advantages=true", f"output_dir={tmp_path}", *overrides)
    t = model_trainer(cfg, model_dir, tmp_path)
    t.rewards = GivenRewards(cfg, {"rm": rm_result(SCORES, failed=failed, junk=junk)})
    monkeypatch.setattr(train, "generate", lambda *args, **kwargs: rollout)
    losses: dict = {}
    update = t.update
    t.update = lambda *args: losses.update(update(*args)) or losses  # what the step's update returned
    return t, untimed(t.step(1)), losses


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_a_step_where_every_row_failed_leaves_the_weights_bit_identical(tmp_path, model_dir, monkeypatch,
                                                                        estimator):
    extra = GROUPS if estimator == "grpo" else ()
    before = weights(model_trainer(config(f"ppo.advantage_estimator={estimator}", *extra), model_dir, tmp_path))
    t, m, _ = run_step(tmp_path, model_dir, rollout_of(), f"ppo.advantage_estimator={estimator}", *extra,
                    "ppo.adaptive_kl=true", "ppo.kl_coef=0.1", failed=(0, 1, 2, 3), monkeypatch=monkeypatch)
    after = weights(t)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert m["failed_rows"] == 4 and math.isnan(m["reward_mean"]) and math.isnan(m["kl_mean"])
    assert m["kl_coef"] == 0.1  # no scored row: nothing for the adaptive controller to react to
    assert "policy_loss" not in m


@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_masked_tokens_contribute_nothing_to_a_step(tmp_path, model_dir, monkeypatch, estimator):
    """Two steps whose rollouts differ only where the mask is 0 (the padding after each stop token, the failed
    row's tokens and score) end with the same weights, the same metrics: those tokens reach no loss, no KL, no
    advantage statistic and no logged number."""
    extra = (f"ppo.advantage_estimator={estimator}", *(GROUPS if estimator == "rloo" else ()))
    results = [run_step(tmp_path / f"junk{junk}", model_dir, rollout_of(junk=junk), *extra, junk=score,
                        monkeypatch=monkeypatch) for junk, score in ((None, float("nan")), (17, 55.0))]
    (a, metrics_a, _), (b, metrics_b, _) = results
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics_a == metrics_b
    assert metrics_a["failed_rows"] == 1 and math.isfinite(metrics_a["policy_loss"])
    before = weights(model_trainer(config(*extra), model_dir, tmp_path))
    assert any(not torch.equal(before[k], wa[k]) for k in wa)  # and the step did train


def test_a_micro_batch_without_a_scored_token_is_not_averaged_into_the_logged_losses(tmp_path, model_dir,
                                                                                       monkeypatch):
    _, m, losses = run_step(tmp_path, model_dir, rollout_of(), "ppo.micro_batch_size=1", "ppo.mini_batch_size=1",
                            "ppo.ppo_epochs=1", failed=(2, 3), monkeypatch=monkeypatch)
    # rows 2 and 3 failed: their micro-batches (one row each) log a loss of 0 that must not dilute rows 0 and 1's
    scored = np.array(losses["scored"])
    assert sorted(scored.tolist()) == [0.0, 0.0, 1.0, 1.0]
    assert np.array(losses["policy_loss"])[scored == 0].tolist() == [0.0, 0.0]
    for key in ("policy_loss", "value_loss", "clipfrac"):
        assert m[key] == pytest.approx(np.array(losses[key])[scored == 1].mean()), key


# -- a process RM's step rewards ------------------------------------------------------------------------------------
def prm_trainer(tmp_path: Path, estimator: str, *overrides: str) -> PPOTrainer:
    """An outcome RM (`rm`, SCORES) and a process RM (`prm`, weight 0.5) whose steps end at characters 2 and 4 of
    row 0's text (4 tokens: Qwen2.5 ids 3-6, one character each) and at character 1 of row 1's; rows 2 and 3 fail."""
    from transformers import AutoTokenizer

    from templar.assets import tokenizer_dir

    extra = (("ppo.advantage_estimator=grpo", "generation.samples_per_prompt=2", "ppo.rollout_batch_size=2")
             if estimator == "grpo" else ())
    cfg = config("reward.models.1.name=prm", "reward.models.1.kind=prm", "reward.models.1.weight=0.5",
                 "ppo.gamma=1.0", "ppo.lam=1.0", "ppo.kl_coef=0.0", *extra, *overrides)
    t = bare_trainer(cfg, tmp_path)
    t.actor_chat = type("Chat", (), {"tokenizer": AutoTokenizer.from_pretrained(str(tokenizer_dir("qwen2_5")))})()
    prm = rm_result([0.2, 0.4, 0.0, 0.0], failed=(2, 3))
    prm.step_scores = [np.array([0.2, 0.6], np.float32), np.array([0.4], np.float32), np.zeros(0), np.zeros(0)]
    prm.step_ends = [[2, 4], [1], [], []]
    t.rewards = GivenRewards(cfg, {"rm": rm_result(SCORES), "prm": prm})
    return t


def test_a_process_rms_steps_are_per_token_rewards_for_gae_and_its_aggregate_for_group_estimators(tmp_path):
    t = prm_trainer(tmp_path, "gae")
    rollout = rollout_of()
    rollout.texts = [t.actor_chat.tokenizer.decode(rollout.response_ids[i][rollout.response_mask[i].bool()][
        : int(rollout.response_mask[i].sum()) - int(rollout.ended[i])].tolist()) for i in range(4)]
    assert [len(text) for text in rollout.texts[:2]] == [4, 1]  # one character per token
    scored = t.collect(1, reward_conversations(t.data.next_batch(4), rollout.texts), rollout,
                       t.rewards.submit([{}] * 4))
    assert close(scored.step_rewards[:2], [[0, 0.1, 0, 0.3], [0.2, 0, 0, 0]])  # 0.5 x the steps, on their tokens
    assert close(scored.outcome_scores[:2], [2.0, -1.0])  # the PRM's aggregate is not also added at the end
    advantages, _, _ = t.advantages(scored, evaluation(torch.zeros(4, 4)))
    # gamma = lam = 1, V = 0: A_t = the rewards from t to the end; row 0 [0, .1, 0, 2 + .3], row 1 [.2, -1]
    assert close(advantages, [[2.4, 2.4, 2.3, 2.3], [-0.8, -1.0, 0, 0], [0] * 4, [0] * 4])
    g = prm_trainer(tmp_path, "grpo")
    scored = g.collect(1, reward_conversations(g.data.next_batch(4), rollout.texts), rollout,
                       g.rewards.submit([{}] * 4))
    assert close(scored.scores[:2], [2.0 + 0.5 * 0.2, -1.0 + 0.5 * 0.4])  # the aggregate, weighted, for the group
    advantages, _, _ = g.advantages(scored, evaluation())
    assert close(advantages[0], advantages[0, 0].expand(4)) and close(advantages[1, :2], advantages[1, 0].expand(2))
