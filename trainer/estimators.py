"""Advantage estimators (`ppo.advantage_estimator`): the seam between the trainer and the maths in `ppo.py`.

Each estimator says whether it needs a critic (the trainer builds, updates and checkpoints one only then), the
smallest group of responses per prompt it can learn from (`generation.samples_per_prompt`), how the policy loss is
normalised, and turns one step's rewards into per-token advantages (and, with a critic, value targets).

  name          paper                                                critic  group  advantage of response i
  gae           Schulman et al. 2016 (GAE), 2017 (PPO)               yes     1      GAE over the critic's values
  grpo          Shao et al. 2024, DeepSeekMath                       no      >= 2   (r_i - mean) / std of its group
  dr_grpo       Liu et al. 2025, Understanding R1-Zero-Like Training no      >= 2   r_i - mean of its group; the loss
                                                                                    is a token sum / a constant
  rloo          Ahmadian et al. 2024, Back to Basics (RLOO)          no      >= 2   r_i - mean of the group's others
  reinforce_pp  Hu 2025, REINFORCE++                                 no      1      return-to-go, whitened over the
                                                                                    global batch

With the KL as a reward penalty (`ppo.kl_in: reward`), critic-free advantages are the return-to-go of the per-token
penalty plus the (shaped) score at the last token; with `kl_in: loss` they are the shaped score on every token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from templar.trainer import ppo

if TYPE_CHECKING:  # the config checks its estimator names against ESTIMATORS
    from templar.trainer.config import PPOConfig


@dataclass
class AdvantageInputs:
    scores: torch.Tensor  # [B] combined RM score per row (0 where invalid)
    valid: torch.Tensor  # [B] bool: every RM scored the row
    # [B, T] per-token rewards: -kl_coef * KL estimate (zero when the KL is a loss term), plus, for an estimator with
    # per_token_rewards, a process RM's step scores on the tokens that end each step
    kl_rewards: torch.Tensor
    mask: torch.Tensor  # [B, T] response tokens of valid rows
    values: torch.Tensor | None  # [B, T] the critic's values (critic estimators only)
    group_size: int  # generation.samples_per_prompt: rows [g*n, (g+1)*n) answer the same prompt
    reduce: ppo.Reduce  # sums over data-parallel ranks (global statistics)


Compute = Callable[[AdvantageInputs, "PPOConfig"], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Estimator:
    name: str
    paper: str
    needs_critic: bool
    min_group_size: int  # fewer responses per prompt and every advantage is 0
    compute: Compute  # -> (advantages [B, T], value targets [B, T] or None)
    sum_over_tokens: bool = False  # policy loss: sum over tokens / (rows x max_new_tokens) instead of a token mean
    # the per-token reward term (`kl_rewards`) is a return's rewards, so a process RM's step scores join it on the
    # tokens that end each step (GAE, REINFORCE++); the group estimators take the PRM's aggregate as its score
    per_token_rewards: bool = False


def _gae(x: AdvantageInputs, p: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = x.kl_rewards + ppo.score_at_last_token(x.scores, x.mask)
    if p.whiten_rewards:
        rewards = ppo.masked_whiten(rewards, x.mask, shift_mean=False)
    advantages, returns = ppo.gae_advantages(rewards, x.values, x.mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = ppo.masked_whiten(advantages, x.mask)
    return advantages, returns


def _grouped(shape: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> Compute:
    def compute(x: AdvantageInputs, p: PPOConfig) -> tuple[torch.Tensor, None]:
        shaped = shape(x.scores, x.valid, x.group_size)
        return ppo.shaped_score_advantages(shaped, x.kl_rewards, x.mask, p.gamma), None

    return compute


def _reinforce_pp(x: AdvantageInputs, p: PPOConfig) -> tuple[torch.Tensor, None]:
    return ppo.reinforce_pp_advantages(x.scores, x.kl_rewards, x.mask, p.gamma, x.reduce), None


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("gae", "Schulman et al. 2016/2017 (GAE, PPO)", needs_critic=True, min_group_size=1, compute=_gae,
              per_token_rewards=True),
    Estimator("grpo", "Shao et al. 2024 (DeepSeekMath)", needs_critic=False, min_group_size=2,
              compute=_grouped(ppo.group_normalized_scores)),
    Estimator("dr_grpo", "Liu et al. 2025 (Dr. GRPO)", needs_critic=False, min_group_size=2,
              compute=_grouped(lambda r, v, n: ppo.group_normalized_scores(r, v, n, scale_by_std=False)),
              sum_over_tokens=True),
    Estimator("rloo", "Ahmadian et al. 2024 (RLOO)", needs_critic=False, min_group_size=2,
              compute=_grouped(ppo.leave_one_out_scores)),
    Estimator("reinforce_pp", "Hu 2025 (REINFORCE++)", needs_critic=False, min_group_size=1, compute=_reinforce_pp,
              per_token_rewards=True),
)}
