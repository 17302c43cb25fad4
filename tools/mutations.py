"""Mutation check (`make mutations`, `python -m templar.tools.mutations`, `python tools/mutations.py`): does the
test suite notice when the trainer or the serving code is broken in one line?

Each break below is an exact `old -> new` replacement of one line of the current code in one file. The script applies
them one at a time, runs the tests meant to catch that break (a pytest selection per break, `-x`), restores the file
(always: try/finally, also on Ctrl-C and SIGTERM, checked byte-identical), and prints caught / survived per break with
the first failing test and the time; the same as JSON (`--json`, default runs/mutations.json). It exits 1 when a break
survives or an old string is not found exactly once (the list must follow the code: it fails loudly instead).

By default the breaks are applied in a scratch copy of the repository (the working tree is never written: another
process importing the code meanwhile sees no broken file); `--in-place` applies them in the working tree itself.
The unmutated selections run first and must pass. Not part of `make test` (a few minutes). See docs/mutations.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIRING = "tests/test_wiring.py"


def wiring(*names: str) -> tuple[str, ...]:
    return tuple(f"{WIRING}::{name}" for name in names)


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # the pytest selection that should catch it
    why: str = ""


M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    # -- the breaks issue 25 found surviving -----------------------------------------------------------------------
    M("failed-rows-in-update", "trainer/train.py",
      "mask = rollout.response_mask.float() * torch.from_numpy(batch.valid)[:, None]",
      "mask = rollout.response_mask.float()",
      wiring("test_collect_masks_out_the_rows_an_rm_failed_to_score"),
      "rows an RM failed to score stay in the update with a score of 0"),
    M("kl-penalty-sign", "trainer/train.py",
      "kl_rewards = ppo.kl_penalty(kl, scored.mask, kl_coef_in_reward)",
      "kl_rewards = ppo.kl_penalty(kl, scored.mask, -kl_coef_in_reward)",
      wiring("test_the_kl_penalty_enters_the_reward_as_minus_kl_coef_times_the_estimate"),
      "the KL term the step adds to the reward has its sign flipped"),
    M("kl-penalty-sign-in-ppo", "trainer/ppo.py",
      "return -kl_coef * kl * mask", "return kl_coef * kl * mask",
      ("tests/test_ppo.py::test_kl_penalty_is_minus_kl_coef_times_the_estimate_on_the_masked_tokens",),
      "the same flip in the one formula the step now calls"),
    M("lam-not-in-gae", "trainer/estimators.py",
      "ppo.gae_advantages(rewards, x.values, x.mask, p.gamma, p.lam)",
      "ppo.gae_advantages(rewards, x.values, x.mask, p.gamma, 1.0)",
      wiring("test_gamma_and_lam_reach_gae"), "ppo.lam never reaches GAE (lambda = 1)"),
    M("clip-range-not-in-loss", "trainer/train.py",
      "ppo.policy_loss(logprobs, old_logprobs, advantages, mask, p.clip_range, token_normalizer)",
      "ppo.policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, token_normalizer)",
      wiring("test_actor_loss_uses_clip_range_and_the_kl_loss_settings",
             "test_update_uses_clip_range_and_the_temperature"),
      "ppo.clip_range never reaches the clipped objective"),
    M("grpo-without-std", "trainer/estimators.py",
      "compute=_grouped(ppo.group_normalized_scores)),",
      "compute=_grouped(lambda r, v, n: ppo.group_normalized_scores(r, v, n, scale_by_std=False))),",
      wiring("test_group_estimators_shape_the_score_of_each_row"),
      "GRPO wired without dividing by the group's std"),
    # -- config keys that must reach the maths ----------------------------------------------------------------------
    M("gamma-not-in-gae", "trainer/estimators.py",
      "x.mask, p.gamma, p.lam)", "x.mask, 1.0, p.lam)", wiring("test_gamma_and_lam_reach_gae")),
    M("gamma-not-in-group-estimators", "trainer/estimators.py",
      "ppo.shaped_score_advantages(shaped, x.kl_rewards, x.mask, p.gamma)",
      "ppo.shaped_score_advantages(shaped, x.kl_rewards, x.mask, 1.0)",
      wiring("test_group_estimators_discount_the_kl_penalty_with_gamma")),
    M("gamma-not-in-reinforce-pp", "trainer/estimators.py",
      "x.kl_rewards, x.mask, p.gamma, x.reduce)", "x.kl_rewards, x.mask, 1.0, x.reduce)",
      wiring("test_reinforce_pp_whitens_the_returns_over_the_scored_tokens")),
    M("value-clip-is-policy-clip", "trainer/train.py",
      "p.clip_range_value)", "p.clip_range)", wiring("test_update_uses_value_clip_range")),
    M("whiten-advantages-ignored", "trainer/estimators.py",
      "if p.whiten_advantages:", "if False:", wiring("test_advantage_whitening_over_the_masked_tokens_only")),
    M("whiten-advantages-over-padding", "trainer/estimators.py",
      "advantages = ppo.masked_whiten(advantages, x.mask)",
      "advantages = ppo.masked_whiten(advantages, torch.ones_like(x.mask))",
      wiring("test_advantage_whitening_over_the_masked_tokens_only")),
    M("whiten-rewards-ignored", "trainer/estimators.py",
      "if p.whiten_rewards:", "if False:", wiring("test_reward_whitening_before_gae")),
    M("temperature-not-in-update", "trainer/train.py",
      "temperature = self.config.generation.temperature", "temperature = 1.0",
      wiring("test_update_uses_clip_range_and_the_temperature")),
    M("temperature-not-in-evaluate", "trainer/train.py",
      "length, temperature = rollout.response_ids.shape[1], self.config.generation.temperature",
      "length, temperature = rollout.response_ids.shape[1], 1.0",
      wiring("test_evaluate_reads_logprobs_at_the_sampling_temperature")),
    M("logits-not-divided-by-temperature", "trainer/ppo.py",
      "return logits if temperature == 1.0 else logits / temperature", "return logits",
      ("tests/test_ppo.py::test_token_logprobs_divides_logits_by_temperature",)),
    M("kl-estimator-ignored", "trainer/train.py",
      "kl = ppo.kl_estimate(old.logprobs, old.ref_logprobs, p.kl_estimator) * scored.mask",
      'kl = ppo.kl_estimate(old.logprobs, old.ref_logprobs, "k1") * scored.mask',
      wiring("test_the_kl_estimator_key_picks_the_estimate")),
    M("kl-estimator-ignored-in-kl-loss", "trainer/train.py",
      "ppo.kl_estimate(logprobs, ref_logprobs, p.kl_estimator)", 'ppo.kl_estimate(logprobs, ref_logprobs, "k1")',
      wiring("test_actor_loss_uses_clip_range_and_the_kl_loss_settings")),
    M("kl-in-loss-ignored", "trainer/train.py",
      'if p.kl_in == "loss":', "if False:",
      wiring("test_actor_loss_uses_clip_range_and_the_kl_loss_settings",
             "test_the_update_steps_on_the_assembled_loss")),
    M("kl-in-loss-also-in-reward", "trainer/train.py",
      'kl_coef_in_reward = self.kl_ctl.value if p.kl_in == "reward" else 0.0',
      "kl_coef_in_reward = self.kl_ctl.value",
      wiring("test_kl_in_loss_keeps_the_kl_out_of_the_reward")),
    M("kl-coef-from-config-not-controller", "trainer/train.py",
      'self.kl_ctl.value if p.kl_in == "reward"', 'self.config.ppo.kl_coef if p.kl_in == "reward"',
      wiring("test_the_kl_penalty_enters_the_reward_as_minus_kl_coef_times_the_estimate")),
    M("kl-loss-sign", "trainer/train.py",
      'loss = loss + kl_coef * stats["kl_loss"]', 'loss = loss - kl_coef * stats["kl_loss"]',
      wiring("test_actor_loss_uses_clip_range_and_the_kl_loss_settings")),
    M("adaptive-kl-never-built", "trainer/train.py",
      "p.kl_horizon) if p.adaptive_kl", "p.kl_horizon) if False",
      wiring("test_kl_controller_follows_the_config")),
    M("adaptive-kl-update-skipped", "trainer/train.py",
      'self.kl_ctl.update(kl_mean, int(t["valid"]))', "pass",
      wiring("test_the_adaptive_controller_moves_with_the_kl_of_the_scored_rows")),
    M("adaptive-kl-counts-failed-rows", "trainer/train.py",
      'self.kl_ctl.update(kl_mean, int(t["valid"]))', 'self.kl_ctl.update(kl_mean, int(t["rows"]))',
      wiring("test_the_adaptive_controller_moves_with_the_kl_of_the_scored_rows")),
    # -- estimators wired wrong -------------------------------------------------------------------------------------
    M("rloo-wired-as-grpo", "trainer/estimators.py",
      "compute=_grouped(ppo.leave_one_out_scores)),", "compute=_grouped(ppo.group_normalized_scores)),",
      wiring("test_group_estimators_shape_the_score_of_each_row")),
    M("rloo-baseline-includes-self", "trainer/ppo.py",
      "baseline = (r.sum(1, keepdim=True) - r) / others.clamp(min=1)",
      "baseline = r.sum(1, keepdim=True) / count.clamp(min=1)",
      wiring("test_group_estimators_shape_the_score_of_each_row")),
    M("dr-grpo-token-mean", "trainer/estimators.py",
      "sum_over_tokens=True),", "sum_over_tokens=False),",
      wiring("test_dr_grpo_sums_over_tokens_and_divides_by_a_constant")),
    M("groups-count-failed-rows", "trainer/train.py",
      "AdvantageInputs(scores, torch.from_numpy(scored.batch.valid),",
      "AdvantageInputs(scores, torch.ones(len(scores), dtype=torch.bool),",
      wiring("test_group_estimators_shape_the_score_of_each_row")),
    M("ratio-against-current-logprobs", "trainer/train.py",
      "loss, stats = actor_loss(logprobs, old.logprobs[idx],", "loss, stats = actor_loss(logprobs, logprobs.detach(),",
      wiring("test_update_uses_clip_range_and_the_temperature")),
    M("critic-fit-to-advantages", "trainer/train.py",
      "old.values[idx], returns[idx], mask[idx],", "old.values[idx], advantages[idx], mask[idx],",
      wiring("test_update_uses_value_clip_range")),
    M("kl-to-the-actor-itself", "trainer/train.py",
      "ref_logprobs = response_logprobs(self.reference,", "ref_logprobs = response_logprobs(self.actor,",
      wiring("test_evaluate_reads_logprobs_at_the_sampling_temperature")),
    # -- masks end to end -------------------------------------------------------------------------------------------
    M("response-mask-off-by-one", "trainer/actor.py",
      "mask = (positions <= first[:, None]).long()", "mask = (positions < first[:, None]).long()",
      wiring("test_the_response_mask_runs_to_the_first_stop_token_or_to_max_length")),
    M("update-gets-the-unscored-mask", "trainer/train.py",
      "losses = self.update(rollout, old, advantages, returns, scored.mask)",
      "losses = self.update(rollout, old, advantages, returns, rollout.response_mask.float())",
      wiring("test_a_step_where_every_row_failed_leaves_the_weights_bit_identical")),
    M("all-failed-step-still-updates", "trainer/train.py",
      "if allreduce_sum(np.array([float(mask.sum())]))[0] == 0:", "if False:",
      wiring("test_a_step_where_every_row_failed_leaves_the_weights_bit_identical")),
    M("policy-loss-over-padding", "trainer/train.py",
      "ppo.policy_loss(logprobs, old_logprobs, advantages, mask,",
      "ppo.policy_loss(logprobs, old_logprobs, advantages, torch.ones_like(mask),",
      wiring("test_update_uses_clip_range_and_the_temperature")),
    M("value-loss-over-padding", "trainer/train.py",
      "old.values[idx], returns[idx], mask[idx],", "old.values[idx], returns[idx], torch.ones_like(mask[idx]),",
      wiring("test_masked_tokens_contribute_nothing_to_a_step")),
    M("kl-loss-over-padding", "trainer/train.py",
      "ppo.kl_estimate(logprobs, ref_logprobs, p.kl_estimator), mask)",
      "ppo.kl_estimate(logprobs, ref_logprobs, p.kl_estimator), torch.ones_like(mask))",
      wiring("test_the_update_steps_on_the_assembled_loss")),
    M("kl-metric-sign", "trainer/train.py",
      "k1 = ((old.logprobs - old.ref_logprobs) * mask).sum(1)",
      "k1 = ((old.ref_logprobs - old.logprobs) * mask).sum(1)",
      wiring("test_metrics_average_over_scored_rows_and_tokens_only")),
    M("entropy-metric-over-padding", "trainer/train.py",
      '"entropy": (old.entropy * mask).sum()', '"entropy": old.entropy.sum()',
      wiring("test_masked_tokens_change_no_metric")),
    M("reward-mean-over-all-rows", "trainer/train.py",
      '"reward_mean": per_valid(t["score"])', '"reward_mean": t["score"] / t["rows"]',
      wiring("test_metrics_average_over_scored_rows_and_tokens_only")),
    M("losses-average-unscored-micro-batches", "trainer/train.py",
      'stats["scored"] = (mask[idx].sum() > 0).float()', 'stats["scored"] = torch.tensor(1.0)',
      wiring("test_a_micro_batch_without_a_scored_token_is_not_averaged_into_the_logged_losses")),
    # -- rewards: the one combination (the ensemble's) and the trainer's extras (normalisation, unfinished penalty) ---
    M("unfinished-penalty-sign", "trainer/rewards.py",
      "combined -= self.config.unfinished_penalty * (~ended)", "combined += self.config.unfinished_penalty * (~ended)",
      wiring("test_rewards_combine_weights_normalisation_and_the_unfinished_penalty")),
    M("rm-weight-ignored", "templar/reward_ensemble.py",
      "combined += model.weight * scores", "combined += scores",
      wiring("test_rewards_combine_weights_normalisation_and_the_unfinished_penalty")),
    M("normaliser-sees-failed-rows", "trainer/rewards.py",
      "good = scores[valid]", "good = scores",
      wiring("test_rewards_combine_weights_normalisation_and_the_unfinished_penalty")),
    M("row-valid-if-any-rm-scored", "templar/reward_ensemble.py",
      "valid &= result.ok", "valid |= result.ok",
      wiring("test_rewards_combine_weights_normalisation_and_the_unfinished_penalty")),
    # -- serving: the RM's own template, its guards and its truncation ----------------------------------------------
    M("truncation-keeps-the-start", "templar/chat_format.py",
      "return ids[len(ids) - self.max_length:]", "return ids[:self.max_length]",
      ("tests/test_chat_format.py::test_truncation_keeps_the_end_and_the_bos",)),
    M("truncation-drops-the-bos", "templar/chat_format.py",
      "return [ids[0]] + ids[len(ids) - self.max_length + 1:]", "return ids[len(ids) - self.max_length:]",
      ("tests/test_chat_format.py::test_truncation_keeps_the_end_and_the_bos",)),
    M("control-token-guard-off", "templar/chat_format.py",
      "sanitize_control_tokens=bool(hits),", "sanitize_control_tokens=False,",
      ("tests/test_chat_format.py::test_control_token_strings_in_content_stay_text",)),
    M("sampler-ignores-temperature", "trainer/actor.py",
      "probs = torch.softmax(scores if self.temperature == 1.0 else scores / self.temperature, dim=-1)",
      "probs = torch.softmax(scores, dim=-1)",
      ("tests/test_data_and_actor.py::test_the_rollout_sampler_draws_from_the_tempered_top_p_distribution",)),
    # -- fidelity (issue 20): a served score that is not the model's own --------------------------------------------
    M("score-read-at-the-trailing-pad", "templar/export/scorer.py",
      "keep = attention_mask.long() if pad_id is None else attention_mask.long() * (input_ids != pad_id).long()",
      "keep = attention_mask.long()",
      ("tests/test_fidelity.py::test_served_score_is_the_models_own_forward[ends_with_eos_equal_pad-llama]",),
      "the score read at the trailing pad = EOS, one token later than the model's own forward reads it"),
    M("end-of-turn-left-in-a-response", "templar/template_parser.py",
      "            for token in self.trailing_tokens:", "            for token in self.trailing_tokens[:1]:",
      ("tests/test_template_parser.py::test_every_query_parses_to_what_the_actor_saw_or_is_refused",),
      "only the longest trailing token is stripped: an end-of-turn before padding stays in the response"),
    M("batch-dependent-score", "templar/serving/batching.py",
      "width = int(batch.num_tokens[index].max())", "width = max(1, int(batch.num_tokens[index].max()) - 1)",
      ("tests/test_fidelity.py::test_a_score_does_not_depend_on_its_batch",),
      "micro-batches cut one token short: the longest row of each scores differently than alone"),
    # -- process RMs (issue 23): a step's score on the wrong token, or counted twice ---------------------------------
    M("step-reward-on-the-token-before", "templar/steps.py",
      "        found.append(low - 1)", "        found.append(max(low - 2, 0))",
      ("tests/test_beyond_one_score.py::test_each_step_end_lands_on_the_actor_token_that_writes_it",),
      "each step's score lands one actor token before the token that completes the step"),
    M("prm-aggregate-also-at-the-last-token", "trainer/train.py",
      "            scores = scored.outcome_scores", "            scores = scored.scores",
      wiring("test_a_process_rms_steps_are_per_token_rewards_for_gae_and_its_aggregate_for_group_estimators"),
      "GAE gets a process RM's steps on their tokens AND its aggregate at the last token"),
    M("prm-steps-not-in-the-rewards", "trainer/train.py",
      "            kl_rewards = kl_rewards + scored.step_rewards * scored.mask", "            kl_rewards = kl_rewards",
      wiring("test_a_process_rms_steps_are_per_token_rewards_for_gae_and_its_aggregate_for_group_estimators"),
      "a process RM's step rewards never reach the per-token rewards"),
    M("unfinished-character-not-counted", "templar/steps.py",
      "        return len(text) if n == len(ids) else len(text.rstrip(\"\\ufffd\"))",
      "        return len(text.rstrip(\"\\ufffd\"))",
      ("tests/test_beyond_one_score.py::test_a_response_cut_mid_character_has_its_last_step_on_its_last_token",),
      "a response ending mid-character is counted without its U+FFFD, so its last step falls outside it"),
    # -- a row the scorer refuses (an RM's own code: ArmoRM) --------------------------------------------------------
    M("refused-micro-batch-not-retried-row-by-row", "templar/serving/batching.py",
      "            if len(index) > 1:  # which row was it: each alone", "            if False:",
      ("tests/test_batching.py::test_a_row_the_scorer_refuses_is_found_alone_and_its_neighbours_are_scored",),
      "one row the scorer refuses fails every row of its micro-batch"),
)


@dataclass
class Outcome:
    name: str
    path: str
    why: str
    result: str  # caught | survived | error
    caught_by: str | None
    seconds: float
    returncode: int


# -- applying and restoring one break ------------------------------------------------------------------------------
def check_all(root: Path, mutations: tuple[Mutation, ...]) -> list[str]:
    """Every break's old string must occur exactly once in its file (and differ from the new one)."""
    problems = []
    for m in mutations:
        path = root / m.path
        if not path.is_file():
            problems.append(f"{m.name}: {m.path} does not exist")
            continue
        count = path.read_text(encoding="utf-8").count(m.old)
        if count != 1 or m.old == m.new:
            problems.append(f"{m.name}: {m.old!r} occurs {count} time(s) in {m.path} (must be exactly once)")
    return problems


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def applied(root: Path, m: Mutation) -> Iterator[None]:
    """The file with the break in it, restored afterwards whatever happens (checked byte-identical). If the file
    changed meanwhile (someone edited it), only the break is undone, and only if that is unambiguous."""
    path = root / m.path
    original = path.read_bytes()
    text = original.decode("utf-8")
    if text.count(m.old) != 1:
        raise SystemExit(f"mutations: {m.name}: {m.old!r} is not in {m.path} exactly once")
    mutated = text.replace(m.old, m.new).encode("utf-8")
    backup = root / "runs" / "mutations.backup" / (m.path.replace("/", "__") + ".orig")
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_bytes(original)  # a SIGKILL cannot run the finally below: recover() restores from here
    path.write_bytes(mutated)
    try:
        yield
    finally:
        current = path.read_bytes()
        if current == mutated:
            path.write_bytes(original)
        elif current.decode("utf-8").count(m.new) == 1:
            print(f"mutations: WARNING {m.path} changed during the run; undoing only the break", file=sys.stderr)
            path.write_bytes(current.decode("utf-8").replace(m.new, m.old).encode("utf-8"))
        elif current != original:
            raise SystemExit(f"mutations: {m.path} changed during the run and the break cannot be undone safely; "
                             f"the file before the break is in {backup}")
        if current == mutated and sha256(path.read_bytes()) != sha256(original):
            raise SystemExit(f"mutations: {m.path} was not restored byte-identical; the original is in {backup}")
        backup.unlink()


def recover(root: Path) -> None:
    """Restore files a killed run (SIGKILL: no finally) left broken: the backup is the file before its break."""
    folder = root / "runs" / "mutations.backup"
    for backup in sorted(folder.glob("*.orig")) if folder.is_dir() else []:
        rel = backup.name[: -len(".orig")].replace("__", "/")
        path = root / rel
        original = backup.read_bytes()
        known = [m for m in MUTATIONS if m.path == rel
                 and path.read_bytes() == original.decode("utf-8").replace(m.old, m.new).encode("utf-8")]
        if path.read_bytes() != original and not known:
            raise SystemExit(f"mutations: {rel} differs from the backup {backup} left by a killed run, but not by "
                             "one of the breaks: compare them by hand, then delete the backup")
        path.write_bytes(original)
        backup.unlink()
        print(f"mutations: restored {rel} from a killed run's backup", file=sys.stderr)


# -- running the tests --------------------------------------------------------------------------------------------
def pytest_command(python: str, tests: tuple[str, ...]) -> list[str]:
    return [python, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]


def test_env(root: Path) -> dict[str, str]:
    # no .pyc of a broken file is written (one the same size and second as the restored file would be reused)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_tests(root: Path, python: str, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    started = time.perf_counter()
    try:
        done = subprocess.run(pytest_command(python, tests), cwd=root, env=test_env(root), capture_output=True,
                              text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = -1, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    return code, output, time.perf_counter() - started


def first_failure(output: str) -> str | None:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return found.group(1) if found else None


def try_one(root: Path, m: Mutation, python: str, timeout: float) -> Outcome:
    with applied(root, m):
        code, output, seconds = run_tests(root, python, m.tests, timeout)
    # pytest: 0 all passed (survived), 1 a test failed (caught); anything else (no tests collected, usage error,
    # a crash, a timeout) is an error of the selection, not a catch
    result = {0: "survived", 1: "caught"}.get(code, "error")
    if result == "error":
        print(output[-3000:], file=sys.stderr)
    return Outcome(m.name, m.path, m.why, result, first_failure(output) if code == 1 else None, round(seconds, 1),
                   code)


# -- where the breaks are applied -----------------------------------------------------------------------------------
IGNORED = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")


@contextlib.contextmanager
def scratch_copy(root: Path, python: str) -> Iterator[Path]:
    """A copy of the working tree whose `templar` package is importable as installed (templar/trainer and
    templar/tools as links to trainer/ and tools/, pyproject's package-dir), found before the editable install."""
    with tempfile.TemporaryDirectory(prefix="templar-mutations-") as scratch:
        copy = Path(scratch) / "repo"
        shutil.copytree(root, copy, ignore=IGNORED, symlinks=True)
        for package in ("trainer", "tools"):
            (copy / "templar" / package).symlink_to(Path("..") / package, target_is_directory=True)
        probe = subprocess.run([python, "-c", "import templar.trainer.train as m, templar.chat_format as c; "
                                "print(m.__file__); print(c.__file__)"], cwd=copy, env=test_env(copy),
                               capture_output=True, text=True)
        if probe.returncode != 0 or not all(line.startswith(str(copy)) for line in probe.stdout.split()):
            raise SystemExit(f"mutations: the scratch copy does not import its own code:\n{probe.stdout}"
                             f"{probe.stderr[-2000:]}")
        yield copy


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # the same unwinding as Ctrl-C: every applied() restores its file


# -- the command line -----------------------------------------------------------------------------------------------
def table(outcomes: list[Outcome]) -> str:
    rows = [("break", "file", "result", "caught by", "s")] + [
        (o.name, o.path, o.result, o.caught_by or "-", f"{o.seconds:.1f}") for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mutations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated break names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    parser.add_argument("--check", action="store_true", help="only check that every old string is found once")
    parser.add_argument("--in-place", action="store_true", help="apply the breaks in the working tree itself")
    parser.add_argument("--json", default=str(ROOT / "runs" / "mutations.json"), help="where to write the JSON")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per break's test run")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    return parser.parse_args(argv)


def selected(only: str | None) -> tuple[Mutation, ...]:
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        raise SystemExit("mutations: two breaks share a name")
    if not only:
        return MUTATIONS
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"mutations: unknown break(s): {', '.join(unknown)}")
    return tuple(m for m in MUTATIONS if m.name in wanted)


def run_all(root: Path, mutations: tuple[Mutation, ...], args: argparse.Namespace) -> tuple[list[Outcome], float]:
    union = tuple(dict.fromkeys(test for m in mutations for test in m.tests))
    code, output, baseline_s = run_tests(root, args.python, union, args.timeout)
    if code != 0:
        print(output[-4000:], file=sys.stderr)
        raise SystemExit(f"mutations: the selected tests fail without any break (exit {code}); fix that first")
    print(f"baseline: {len(union)} selection(s) pass unmutated ({baseline_s:.1f} s)")
    outcomes = []
    for i, m in enumerate(mutations, 1):
        outcome = try_one(root, m, args.python, args.timeout)
        outcomes.append(outcome)
        print(f"[{i}/{len(mutations)}] {m.name}: {outcome.result}"
              f"{' by ' + outcome.caught_by if outcome.caught_by else ''} ({outcome.seconds:.1f} s)", flush=True)
    return outcomes, baseline_s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mutations = selected(args.only)
    if args.list:
        for m in mutations:
            print(f"{m.name:40s} {m.path:28s} {m.why}")
        return 0
    recover(ROOT)
    problems = check_all(ROOT, mutations)
    if problems:
        print("mutations: the list does not match the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if args.check:
        print(f"{len(mutations)} breaks, each old string found exactly once")
        return 0
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with contextlib.nullcontext(ROOT) if args.in_place else scratch_copy(ROOT, args.python) as root:
            outcomes, baseline_s = run_all(root, mutations, args)
    except KeyboardInterrupt:
        print("\nmutations: interrupted; every file is restored", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("\n" + table(outcomes))
    caught = sum(o.result == "caught" for o in outcomes)
    print(f"\n{caught} of {len(outcomes)} breaks caught")
    report = {"mode": "in-place" if args.in_place else "scratch copy", "baseline_s": round(baseline_s, 1),
              "caught": caught, "total": len(outcomes),
              "mutations": [{**asdict(o), **{k: v for k, v in asdict(m).items() if k not in ("name", "path", "why")}}
                            for o, m in zip(outcomes, mutations)]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"JSON: {args.json}")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
