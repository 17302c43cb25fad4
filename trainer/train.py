"""PPO with DeepSpeed, rewards from Triton over gRPC, each model applying its own chat template (`templar train`).

One step, top to bottom (`PPOTrainer.step`):
  1. rollout     the actor formats each prompt with ITS template, samples (generation.samples_per_prompt responses
                 per prompt), stops at its end-of-turn token, and the response is decoded back to plain text;
  2. rewards     {"messages": prompt + [assistant: response]} goes to every RM (each applies ITS template inside
                 Triton) in the background, while
  3. the trainer computes the rollout's log-probs, the reference log-probs and (with a critic) the values;
  4. wait        for the rewards; rows an RM could not score are masked out (and recorded), never zeroed;
  5. advantages  per-token KL estimate (k1/k2/k3) as a reward penalty or a loss term, then the advantage estimator
                 (trainer/estimators.py): GAE with the critic, or GRPO / Dr. GRPO / RLOO / REINFORCE++;
  6. update      PPO epochs over minibatches: clipped policy loss (actor), clipped value loss (critic, if any);
  7. KL          controller update, metrics, checkpoint.

The command line is `templar train` (templar.tools.train); `train(config)` here is the run itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from templar.chat_format import ChatFormat
from templar.conversation import Messages
from templar.errors import ConfigError
from templar.steps import step_end_tokens
from templar.trainer.preferences import RULES
from templar.trainer import ppo
from templar.trainer.actor import (Rollout, generate, response_logprobs, response_logprobs_and_entropy,
                                   response_values)
from templar.trainer.checkpoint import latest_checkpoint, load_checkpoint, remove_leftovers, save_checkpoint
from templar.trainer.config import PPOConfig, TrainConfig, to_dict
from templar.trainer.data import PromptStream, load_prompts
from templar.trainer.distributed import (World, allreduce_max, allreduce_sum, barrier, gather_objects,
                                         init_distributed, make_engine, parameters_sha256, rng_state, run_on_main,
                                         set_rng_state, zero_stage)
from templar.trainer.estimators import ESTIMATORS, AdvantageInputs
from templar.trainer.faults import maybe_die
from templar.trainer.metrics import MetricsLog, plot_curves, restart_jsonl
from templar.trainer.models import load_actor, load_critic, load_reference
from templar.trainer.reward_server import reward_endpoints
from templar.trainer.rewards import (RewardBatch, RewardModels, actor_text_rows, record_unscored,
                                     reward_conversations, step_rewards, text_ids)
from templar.trainer.sources import ModelSources, resolve_models

log = logging.getLogger("templar.trainer")


def reduce_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks (global statistics, e.g. REINFORCE++'s whitening)."""
    return torch.from_numpy(allreduce_sum(values.detach().double().numpy()))


def explained_variance(t: dict[str, float]) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens of every rank (NaN without any)."""
    if not t["masked"]:
        return float("nan")
    var = lambda total, squares: squares / t["masked"] - (total / t["masked"]) ** 2  # noqa: E731
    returns_var = var(t["ret"], t["ret_sq"])
    return 1.0 - var(t["res"], t["res_sq"]) / returns_var if returns_var > 0 else float("nan")


def kl_controller(p: PPOConfig) -> ppo.FixedKLController:
    """`ppo.kl_coef`, moved towards `ppo.target_kl` over `ppo.kl_horizon` rows when `ppo.adaptive_kl` is on."""
    return ppo.AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl \
        else ppo.FixedKLController(p.kl_coef)


def actor_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               advantages: torch.Tensor, mask: torch.Tensor, p: PPOConfig, kl_coef: float,
               token_normalizer: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The actor's loss on one micro-batch, as the config assembles it: the clipped surrogate (`ppo.clip_range`),
    plus `kl_coef` x the KL estimate (`ppo.kl_estimator`) when `ppo.kl_in` is "loss". Plain, so tests run it."""
    loss, stats = ppo.policy_loss(logprobs, old_logprobs, advantages, mask, p.clip_range, token_normalizer)
    stats["policy_loss"] = loss
    if p.kl_in == "loss":  # GRPO's way: the KL to the reference as a loss term, not in the reward
        stats["kl_loss"] = ppo.masked_mean(ppo.kl_estimate(logprobs, ref_logprobs, p.kl_estimator), mask)
        loss = loss + kl_coef * stats["kl_loss"]
    return loss, stats


@dataclass
class Evaluation:
    """Step 3: what the models before this step's update say about the rollout, per response token."""

    logprobs: torch.Tensor  # log pi_old
    ref_logprobs: torch.Tensor  # log pi_ref
    values: torch.Tensor | None  # V_old (None without a critic)
    entropy: torch.Tensor  # H(pi_old) at each response position


@dataclass
class Scored:
    """Step 4: the rewards, and which rows take part in the update."""

    batch: RewardBatch
    scores: torch.Tensor  # [B] combined score, 0 where invalid (masked anyway)
    mask: torch.Tensor  # [B, Lr] response tokens of valid rows
    failed: int  # rows recorded as unscored
    wait_s: float
    versions: dict[str, float] = field(default_factory=dict)  # rm_version/<name>: newest RM version that scored
    rule_hits: int = 0  # responses keeping data.rule (when one is set)
    # process RMs (reward.models[].kind: prm): [B, Lr] weight * step score on the tokens that end each step, and the
    # combined score without the PRMs' aggregates (what a per-token estimator adds at the last token); None without
    step_rewards: torch.Tensor | None = None
    outcome_scores: torch.Tensor | None = None


class StepTimes(dict):
    """Seconds per phase of one step (`time/<phase>` in the metrics)."""

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - started


class PPOTrainer:
    def __init__(self, config: TrainConfig, world: World, endpoints: list[str], sources: ModelSources,
                 prompts: list[Messages]):
        self.config, self.world = config, world
        self.output_dir = Path(config.output_dir)
        self.actor_chat = ChatFormat.from_dir(sources.actor, chat_template_file=config.models.actor_chat_template,
                                              max_length=config.models.max_prompt_tokens)
        tokenizer = self.actor_chat.tokenizer
        self.stop_ids = self.actor_chat.stop_token_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        p = config.ppo
        self.estimator = ESTIMATORS[p.advantage_estimator]
        self.group_size = config.generation.samples_per_prompt
        self.actor = make_engine(load_actor(sources.actor), p.actor_lr, config)
        self.critic = (make_engine(load_critic(sources.critic, sources.actor), p.critic_lr, config)
                       if self.estimator.needs_critic else None)
        self.reference = load_reference(sources.actor)
        self.kl_ctl = kl_controller(p)
        self.data = PromptStream(prompts, seed=config.seed, shuffle=config.data.shuffle, rank=world.rank,
                                 world_size=world.size)
        self.rewards = RewardModels(config.reward, endpoints, allreduce_sum)
        self.shuffle = torch.Generator().manual_seed(config.seed * 1000 + world.rank)
        self.times = StepTimes()
        self.checkpoint_s = 0.0  # the last checkpoint's write time, reported with the next step
        log.info("actor %s: chat_template sha256 %s, stop tokens %s", sources.actor, self.actor_chat.template_sha256,
                 tokenizer.convert_ids_to_tokens(self.stop_ids))
        log.info("advantage estimator %s (%s), %d response(s) per prompt, KL %s in the %s", self.estimator.name,
                 self.estimator.paper, self.group_size, p.kl_estimator, p.kl_in)
        if config.reward.rm_input == "actor_text":
            log.warning("reward.rm_input=actor_text: every RM reads the conversation in the ACTOR's template, as "
                        "single-template frameworks feed it (for comparison; the RMs never saw this format)")

    @property
    def engines(self) -> dict:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict:
        return {"step": step, "kl_ctl": self.kl_ctl.state_dict(), "data": self.data.state_dict(),
                "reward_normalizers": self.rewards.state_dict(), "rng": rng_state(),
                "shuffle_rng": self.shuffle.get_state()}

    def load_state_dict(self, state: dict) -> int:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.data.load_state_dict(state["data"])
        self.rewards.load_state_dict(state["reward_normalizers"])
        set_rng_state(state["rng"])
        self.shuffle.set_state(state["shuffle_rng"])
        return state["step"]

    # -- one PPO step: the phases below, in order --------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        started = time.perf_counter()
        self.times = StepTimes()
        # 1. Rollout with the actor's own template (n responses per prompt: rows [g*n, (g+1)*n) are one group);
        #    responses back to plain text.
        prompts = [prompt for prompt in self.data.next_batch(self.config.ppo.rollout_batch_size)
                   for _ in range(self.group_size)]
        synced = self.config.deepspeed.zero_stage == 3 and self.world.size > 1
        with self.times("rollout"):
            rollout = generate(self.actor.module, self.actor_chat, prompts, self.config.generation, self.stop_ids,
                               self.pad_id, synced_gpus=synced)
        maybe_die("rollout", step)  # testing hooks (templar.trainer.faults): a SIGKILL here when asked
        # 2. Every RM scores the structured conversation with its own template, in the background ...
        conversations = reward_conversations(prompts, rollout.texts)
        pending = self.rewards.submit(conversations if self.config.reward.rm_input == "messages"
                                      else actor_text_rows(conversations, self.actor_chat))
        # 3. ... while we compute the rollout's log-probs, the reference log-probs and the values.
        old = self.evaluate(rollout)
        # 4. Wait for the rewards; rows that could not be scored are masked out of the update.
        scored = self.collect(step, conversations, rollout, pending)
        maybe_die("scoring", step)
        # 5. Per-token KL estimate, then the advantage estimator (GAE with the critic, or a critic-free one).
        advantages, returns, kl = self.advantages(scored, old)
        # 6. PPO epochs over minibatches.
        losses = self.update(rollout, old, advantages, returns, scored.mask)
        maybe_die("update", step)
        # 7. KL controller and metrics (summed over ranks).
        return self.metrics(rollout, scored, old, kl, advantages, returns, losses, time.perf_counter() - started)

    def evaluate(self, rollout: Rollout) -> Evaluation:
        sequences, attention = rollout.sequences
        length, temperature = rollout.response_ids.shape[1], self.config.generation.temperature
        with torch.no_grad():
            with self.times("old_logprobs"):
                logprobs, entropy = response_logprobs_and_entropy(self.actor, sequences, attention, length,
                                                                  temperature)
            with self.times("reference"):
                ref_logprobs = response_logprobs(self.reference, sequences, attention, length, temperature)
            values = None
            if self.critic is not None:
                with self.times("critic"):
                    values = response_values(self.critic, sequences, attention, length)
        return Evaluation(logprobs, ref_logprobs, values, entropy)

    def collect(self, step: int, conversations: list[dict], rollout: Rollout, pending: dict) -> Scored:
        with self.times("rewards_wait"):
            batch = self.rewards.collect(pending, rollout.ended.numpy())
        failed = record_unscored(self.output_dir / f"unscored.rank{self.world.rank}.jsonl", step, conversations,
                                 batch)
        if self.world.is_main:  # one sample per step: what the actor said and what every RM made of it
            self._record_sample(step, conversations[0], rollout, batch)
        mask = rollout.response_mask.float() * torch.from_numpy(batch.valid)[:, None]
        scores = torch.from_numpy(np.nan_to_num(batch.scores)).float()
        rule = RULES.get(self.config.data.rule)
        hits = sum(rule(c["messages"][:-1], c["messages"][-1]["content"]) for c in conversations) if rule else 0
        return Scored(batch, scores, mask, failed, self.times["rewards_wait"], self.rewards.note_versions(step, batch),
                      hits, *self._step_rewards(rollout, batch, scores))

    def _step_rewards(self, rollout: Rollout, batch: RewardBatch, scores: torch.Tensor):
        """(the process RMs' step rewards on the actor's tokens, the score without their aggregates), or (None,
        None) without a process RM."""
        prms = {rm.name: rm.weight for rm in self.config.reward.models if rm.kind == "prm"}
        if not prms:
            return None, None
        dense = step_rewards(self.actor_chat.tokenizer, rollout.response_ids, rollout.response_mask, rollout.ended,
                             batch.per_rm, prms)
        aggregates = sum(weight * np.nan_to_num(batch.per_rm[name].scores) for name, weight in prms.items())
        return torch.from_numpy(dense), scores - torch.from_numpy(aggregates).float()

    def advantages(self, scored: Scored, old: Evaluation) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(advantages, value targets or None, the per-token KL estimate)."""
        p = self.config.ppo
        kl = ppo.kl_estimate(old.logprobs, old.ref_logprobs, p.kl_estimator) * scored.mask
        kl_coef_in_reward = self.kl_ctl.value if p.kl_in == "reward" else 0.0
        kl_rewards = ppo.kl_penalty(kl, scored.mask, kl_coef_in_reward)  # the tested formula, not a copy of it
        scores = scored.scores
        if scored.step_rewards is not None and self.estimator.per_token_rewards:  # a PRM's steps, token by token
            kl_rewards = kl_rewards + scored.step_rewards * scored.mask
            scores = scored.outcome_scores
        inputs = AdvantageInputs(scores, torch.from_numpy(scored.batch.valid), kl_rewards, scored.mask,
                                 old.values, self.group_size, reduce_over_ranks)
        advantages, returns = self.estimator.compute(inputs, p)
        return advantages, returns, kl

    def update(self, rollout: Rollout, old: Evaluation, advantages: torch.Tensor, returns: torch.Tensor | None,
               mask: torch.Tensor) -> dict[str, list[float]]:
        """DeepSpeed accumulates micro-batches up to a minibatch, then steps the optimizer. A step in which no rank
        has a scored token updates nothing: its zero gradients would still move the weights (AdamW's weight decay,
        Adam's momentum). Each micro-batch's stats carry `scored` (1 if it had a scored token), so the logged
        losses average only over micro-batches that had something to learn from."""
        p = self.config.ppo
        if allreduce_sum(np.array([float(mask.sum())]))[0] == 0:  # every rank decides alike: no collective waits
            return {}
        sequences, attention = rollout.sequences
        rows, length = len(rollout.texts), rollout.response_ids.shape[1]
        temperature = self.config.generation.temperature
        # Dr. GRPO: the loss is a sum over tokens divided by a constant, not a mean over each batch's tokens
        normalizer = p.micro_batch_size * self.config.generation.max_new_tokens if self.estimator.sum_over_tokens \
            else None
        losses: dict[str, list[float]] = {}
        for _ in range(p.ppo_epochs):
            order = torch.randperm(rows, generator=self.shuffle)
            for start in range(0, rows, p.micro_batch_size):
                idx = order[start:start + p.micro_batch_size]
                with self.times("update"):
                    logprobs = response_logprobs(self.actor, sequences[idx], attention[idx], length, temperature)
                    loss, stats = actor_loss(logprobs, old.logprobs[idx], old.ref_logprobs[idx], advantages[idx],
                                             mask[idx], p, self.kl_ctl.value, normalizer)
                    self.actor.backward(loss)
                    self.actor.step()
                if self.critic is not None:
                    with self.times("critic"):
                        values = response_values(self.critic, sequences[idx], attention[idx], length)
                        vf_loss, vf_stats = ppo.value_loss(values, old.values[idx], returns[idx], mask[idx],
                                                           p.clip_range_value)
                        self.critic.backward(vf_loss)
                        self.critic.step()
                    stats.update(value_loss=vf_loss, **vf_stats)
                stats["scored"] = (mask[idx].sum() > 0).float()
                for key, value in stats.items():
                    losses.setdefault(key, []).append(float(value.detach()))
        return losses

    def metrics(self, rollout: Rollout, scored: Scored, old: Evaluation, kl: torch.Tensor, advantages: torch.Tensor,
                returns: torch.Tensor | None, losses: dict[str, list[float]], step_s: float) -> dict[str, float]:
        """Sums over every rank first (one all-reduce), then the per-row / per-token means the log shows."""
        batch, valid, mask = scored.batch, torch.from_numpy(scored.batch.valid).float(), scored.mask
        k1 = ((old.logprobs - old.ref_logprobs) * mask).sum(1)
        group_std, all_equal = ppo.group_statistics(scored.scores, torch.from_numpy(batch.valid), self.group_size)
        sums = {
            "valid": valid.sum(), "score": (scored.scores * valid).sum(), "kl": k1.sum(), "kl_est": kl.sum(),
            "rows": float(len(valid)), "tokens": float(rollout.response_mask.sum()),
            "unfinished": float((~rollout.ended).sum()), "failed": float(scored.failed), "masked": mask.sum(),
            "entropy": (old.entropy * mask).sum(), "adv": (advantages * mask).sum(),
            "adv_sq": (advantages**2 * mask).sum(), "groups": float(len(group_std)), "group_std": group_std.sum(),
            "groups_equal": all_equal.float().sum(), "rule": float(scored.rule_hits),
            # per micro-batch losses, weighted by whether it had a scored token (a fully masked one logs a 0 loss)
            "loss_weight": float(sum(losses.get("scored", []))),
            **{f"loss/{k}": float(np.nansum(np.array(v) * losses["scored"])) for k, v in losses.items()
               if k not in ("ratio_max", "scored")},
            **{f"score/{name}": float(np.nansum(np.where(batch.valid, r.scores, 0.0)))
               for name, r in batch.per_rm.items()},
            **step_sums(batch),
            "step_rewards": float((scored.step_rewards * mask).sum()) if scored.step_rewards is not None else 0.0,
        }
        if returns is not None:  # explained variance of the critic's values
            residual = returns - old.values
            sums.update(ret=(returns * mask).sum(), ret_sq=(returns**2 * mask).sum(), res=(residual * mask).sum(),
                        res_sq=(residual**2 * mask).sum())
        t = dict(zip(sums, allreduce_sum(np.array([float(v) for v in sums.values()], dtype=np.float64))))
        per_valid = lambda total: total / t["valid"] if t["valid"] else float("nan")  # noqa: E731
        kl_mean = per_valid(t["kl"])
        if t["valid"]:  # a step with no scored row tells the controller nothing about the KL
            self.kl_ctl.update(kl_mean, int(t["valid"]))
        per_token = lambda total: total / t["masked"] if t["masked"] else float("nan")  # noqa: E731
        metrics = {
            "reward_mean": per_valid(t["score"]), "kl_mean": kl_mean, "kl_estimate_mean": per_valid(t["kl_est"]),
            "kl_coef": self.kl_ctl.value,
            **{key[5:]: t[key] / t["loss_weight"] if t["loss_weight"] else float("nan") for key in t
               if key.startswith("loss/")},
            "ratio_max": allreduce_max(max(losses.get("ratio_max", [1.0]))),
            "entropy": per_token(t["entropy"]), "advantage_mean": per_token(t["adv"]),
            "advantage_std": math.sqrt(max(per_token(t["adv_sq"]) - per_token(t["adv"]) ** 2, 0.0))
            if t["masked"] else float("nan"),
            "reward_std_in_group": t["group_std"] / t["groups"], "groups_all_equal": t["groups_equal"] / t["groups"],
            "response_length_mean": t["tokens"] / t["rows"], "unfinished_rows": int(t["unfinished"]),
            "failed_rows": int(t["failed"]), "rm_latency_s": batch.latency_s, "reward_wait_s": scored.wait_s,
            "reward_wait_share": scored.wait_s / step_s, "step_time_s": step_s,
        }
        metrics["kl_per_token"] = per_token(t["kl"])  # nats per response token (k1)
        if returns is not None:
            metrics["explained_variance"] = explained_variance(t)
        if self.config.data.rule:
            metrics["rule_satisfied"] = t["rule"] / t["rows"]  # share of all responses keeping data.rule
        metrics.update({f"score/{name}": per_valid(t[f"score/{name}"]) for name in batch.per_rm})
        metrics.update({key: per_valid(t[key]) for key in t if key.startswith(("steps/", "first_step/", "last_step/"))})
        if scored.step_rewards is not None:
            metrics["step_rewards_mean"] = per_valid(t["step_rewards"])  # per response: sum of its step rewards
        metrics.update({f"time/{phase}": seconds for phase, seconds in self.times.items()})
        metrics["time/checkpoint"], self.checkpoint_s = self.checkpoint_s, 0.0
        return {**metrics, **scored.versions}

    def _record_sample(self, step: int, conversation: dict, rollout: Rollout, batch: RewardBatch) -> None:
        row = {"step": step, "ended": bool(rollout.ended[0]), **conversation,
               "scores": {name: (float(r.scores[0]) if r.ok[0] else r.status[0]) for name, r in batch.per_rm.items()}}
        steps = {name: r for name, r in batch.per_rm.items() if r.step_scores is not None and r.ok[0]}
        if steps:  # a process RM's: each step's score and the actor token it landed on (ids: the text's own)
            ids = text_ids(rollout.response_ids[0], rollout.response_mask[0], rollout.ended[0])
            row["response_ids"] = ids
            row["steps"] = {name: [{"end": end, "token": token, "score": float(score)} for end, token, score in zip(
                r.step_ends[0], step_end_tokens(self.actor_chat.tokenizer, ids, r.step_ends[0]), r.step_scores[0])]
                for name, r in steps.items()}
        with open(self.output_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def save_final(self) -> None:
        """Hugging Face folders of the trained actor and critic (with the actor's tokenizer and template)."""
        import deepspeed

        final = self.output_dir / "final"
        for name, engine in self.engines.items():
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
                if self.world.is_main:
                    engine.module.save_pretrained(final / name, safe_serialization=True)
                    self.actor_chat.tokenizer.save_pretrained(str(final / name))
        barrier()


def step_sums(batch: RewardBatch) -> dict[str, float]:
    """Each process RM's sums over the scored rows: steps read, and the scores of the first and of the last step
    (where a PRM's signal moves); the step rewards the actor's tokens got are summed beside them."""
    sums = {}
    for name, result in batch.per_rm.items():
        if result.step_scores is None:
            continue
        rows = [scores for scores, ok in zip(result.step_scores, batch.valid) if ok and len(scores)]
        sums[f"steps/{name}"] = float(sum(len(scores) for scores in rows))
        sums[f"first_step/{name}"] = float(sum(scores[0] for scores in rows))
        sums[f"last_step/{name}"] = float(sum(scores[-1] for scores in rows))
    return sums


# -- the run ---------------------------------------------------------------------------------------------------------
def _setup_logging(output_dir: Path, world: World) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if world.is_main:
        handlers.append(logging.FileHandler(output_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank {world.rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()  # e.g. the critic's expected "score.weight newly initialized"
    transformers.utils.logging.disable_progress_bar()


def _prepare(config: TrainConfig, world: World, resume: bool) -> tuple[Path, Path | None]:
    """The output folder, logging, the saved config, and the checkpoint to resume from (an error if there is none)."""
    output_dir = Path(config.output_dir)
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    _setup_logging(output_dir, world)
    if world.is_main:
        (output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    checkpoint = run_on_main(world, lambda: _resume_point(output_dir, resume))
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint in {output_dir / 'checkpoints'} (none complete); run without "
                          "--resume to start a new run")
    return output_dir, checkpoint


def _resume_point(output_dir: Path, resume: bool) -> Path | None:
    """Rank 0: clear what an interrupted checkpoint save left behind; the newest complete checkpoint if resuming."""
    remove_leftovers(output_dir)
    return latest_checkpoint(output_dir) if resume else None


def check_inputs(config: TrainConfig, output_dir: Path) -> tuple[ModelSources, list[Messages]]:
    """Every input the run needs (model sources, the actor's template, the prompt data), checked before any server
    starts or engine is built."""
    sources = resolve_models(config, output_dir)
    try:  # the actor must come with a tokenizer and a chat template (or models.actor_chat_template)
        ChatFormat.from_dir(sources.actor, chat_template_file=config.models.actor_chat_template)
    except OSError as exc:
        raise ConfigError(f"models.actor: no tokenizer in {sources.actor} ({exc})") from None
    return sources, load_prompts(config.data.path, config.data.split)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """SIGTERM / SIGINT finish the current step, then a checkpoint is saved and the run ends."""
    stop = {"requested": False}

    def request_stop(signum, _frame):
        log.warning("signal %d: finishing this step, then saving a checkpoint", signum)
        stop["requested"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_at(trainer: PPOTrainer, config: TrainConfig, world: World, checkpoint: Path | None) -> int:
    """Seed (after all set-up, so the run's random stream does not depend on what set-up had to build), then
    restore the checkpoint if resuming; returns the first step to run."""
    torch.manual_seed(config.seed + world.rank)
    np.random.seed(config.seed + world.rank)
    if checkpoint is None:
        return 1
    start = trainer.load_state_dict(load_checkpoint(checkpoint, trainer.engines, world)) + 1
    log.info("resumed from %s: continuing at step %d", checkpoint, start)
    return start


def _run_steps(trainer: PPOTrainer, config: TrainConfig, world: World, start: int, resumed: bool,
               stop: dict[str, bool]) -> int:
    """Steps start..config.steps with metrics and checkpoints; returns the last step run."""
    from tqdm import tqdm

    output_dir = Path(config.output_dir)
    after = start - 1 if resumed else None  # a resumed run redoes the steps logged after its checkpoint
    restart_jsonl(output_dir / f"unscored.rank{world.rank}.jsonl", after)  # every rank writes its own
    metrics_log = MetricsLog(output_dir, world.is_main, resume_after_step=after)  # metrics.jsonl, samples.jsonl
    progress = tqdm(total=config.steps, initial=start - 1, desc="ppo", unit="step", disable=not world.is_main,
                    dynamic_ncols=True)
    last_saved = step = start - 1
    try:
        for step in range(start, config.steps + 1):
            metrics = trainer.step(step)
            metrics_log.log(step, metrics)
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_mean']:.3f}",
                                 s_per_step=f"{metrics['step_time_s']:.1f}")
            stopping = allreduce_sum(np.array([float(stop["requested"])]))[0] > 0
            if step % config.save_every == 0 or step == config.steps or stopping:
                saving = time.perf_counter()
                save_checkpoint(output_dir, step, trainer.engines, trainer.state_dict(step), world)
                trainer.checkpoint_s = time.perf_counter() - saving  # in the next step's time/checkpoint
                last_saved = step
            if stopping:
                break
    finally:
        progress.close()
        metrics_log.close()
    if last_saved < step:
        save_checkpoint(output_dir, step, trainer.engines, trainer.state_dict(step), world)
    return step


def _summarise(output_dir: Path, world: World, summary: dict) -> dict:
    if world.is_main:
        if (output_dir / "metrics.jsonl").exists():
            summary["curves_png"] = str(plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png"))
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "reward_models"}))
    if not summary["ranks_agree"]:
        raise RuntimeError(f"ranks disagree on the actor's weights: {summary['actor_sha256_per_rank']}")
    return summary


def train(config: TrainConfig, *, resume: bool = False) -> dict:
    """Run PPO as configured; returns the run summary (also written to OUTPUT_DIR/summary.json)."""
    world = init_distributed()
    output_dir, checkpoint = _prepare(config, world, resume)
    sources, prompts = run_on_main(world, lambda: check_inputs(config, output_dir))
    with _stop_on_signals() as stop, reward_endpoints(config, world, output_dir) as endpoints:
        trainer = PPOTrainer(config, world, endpoints, sources, prompts)
        log.info("rank %d of %d on %s, DeepSpeed ZeRO stage %d", world.rank, world.size,
                 next(trainer.actor.module.parameters()).device, zero_stage(config))
        fingerprints = trainer.rewards.connect()
        if world.is_main:
            (output_dir / "reward_models.json").write_text(json.dumps(fingerprints, indent=2))
        start = _start_at(trainer, config, world, checkpoint)
        step = _run_steps(trainer, config, world, start, checkpoint is not None, stop)
        completed = step == config.steps and not stop["requested"]
        if completed:
            trainer.save_final()
        checksums = gather_objects(parameters_sha256(trainer.actor.module))
        versions = trainer.rewards.versions  # per RM: [{"version", "from_step"}], a hot swap adds an entry
        trainer.rewards.close()
    return _summarise(output_dir, world, {
        "steps": step, "completed": completed, "ranks": world.size, "actor_sha256_per_rank": checksums,
        "ranks_agree": len(set(checksums)) == 1, "reward_models": fingerprints, "output_dir": str(output_dir),
        "reward_model_versions": versions})
