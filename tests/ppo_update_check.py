"""Run by tests/test_ppo_update.py in a process of its own (DeepSpeed's process group and environment stay out of the
pytest process): one PPO update through the real trainer (PPOTrainer on DeepSpeed engines) on a real rollout of the
tiny actor, with chosen rewards, and print what the update did to the log-probabilities as JSON.

    python tests/ppo_update_check.py ACTOR_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from templar.environment import use_offline_defaults
from templar.trainer import ppo
from templar.trainer.actor import generate
from templar.trainer.config import load_config
from templar.trainer.data import load_prompts
from templar.trainer.distributed import init_distributed
from templar.trainer.rewards import RewardBatch
from templar.trainer.sources import ModelSources
from templar.trainer.train import PPOTrainer, Scored


def main(actor: Path, output_dir: Path) -> dict:
    config = load_config(None, [f"output_dir={output_dir}", f"models.actor={actor}", "reward.models.0.name=unused",
                                "reward.url=127.0.0.1:1", "generation.max_new_tokens=6", "ppo.rollout_batch_size=8",
                                "ppo.mini_batch_size=8", "ppo.micro_batch_size=4", "ppo.ppo_epochs=1",
                                "ppo.actor_lr=3e-4", "ppo.kl_coef=0.0", "deepspeed.zero_stage=2"])
    torch.manual_seed(0)
    trainer = PPOTrainer(config, init_distributed(), ["127.0.0.1:1"], ModelSources(actor, "actor"), load_prompts())
    prompts = trainer.data.next_batch(8)
    rollout = generate(trainer.actor.module, trainer.actor_chat, prompts, config.generation, trainer.stop_ids,
                       trainer.pad_id)
    old = trainer.evaluate(rollout)
    rewarded = torch.tensor([1.0, -1.0] * 4)  # rows 0, 2, 4, 6 rewarded; 1, 3, 5, 7 penalised
    mask = rollout.response_mask.float()
    batch = RewardBatch(rewarded.numpy(), torch.ones(8, dtype=torch.bool).numpy(), {}, 0.0)
    advantages, returns, _ = trainer.advantages(Scored(batch, rewarded, mask, 0, 0.0), old)
    losses = trainer.update(rollout, old, advantages, returns, mask)
    new = trainer.evaluate(rollout)
    change = ((new.logprobs - old.logprobs) * mask).sum(1)  # log-probability of each whole response
    before, _ = ppo.policy_loss(old.logprobs, old.logprobs, advantages, mask, config.ppo.clip_range)
    after, _ = ppo.policy_loss(new.logprobs, old.logprobs, advantages, mask, config.ppo.clip_range)
    return {"logprob_change": change.tolist(), "rewarded": (rewarded > 0).tolist(),
            "policy_loss_before": float(before), "policy_loss_after": float(after),
            "policy_loss_logged": losses["policy_loss"], "advantage_sign_agrees": bool(
                ((advantages * mask).sum(1).sign() == rewarded.sign()).all())}


if __name__ == "__main__":
    use_offline_defaults()
    print("RESULT " + json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
