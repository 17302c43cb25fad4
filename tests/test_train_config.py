"""Typed training configuration: YAML + key=value overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from templar.trainer.config import ConfigError, TrainConfig, load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_demo_config_loads_with_overrides():
    config = load_config(DEMO, ["steps=3", "ppo.actor_lr=2e-4", "reward.models.1.weight=0.25",
                                "reward.url=127.0.0.1:9001", "deepspeed.zero_stage=3"])
    assert isinstance(config, TrainConfig)
    assert config.steps == 3 and config.ppo.actor_lr == pytest.approx(2e-4)  # "2e-4" is a string in YAML 1.1
    assert [m.name for m in config.reward.models] == ["rm_llama3", "rm_gemma3"]
    assert config.reward.models[1].weight == 0.25 and config.reward.models[0].path == "tiny-rm:llama3_1"
    assert config.reward.url == "127.0.0.1:9001" and config.deepspeed.zero_stage == 3
    assert config.models.actor == "tiny-chat:qwen2_5" and config.generation.max_new_tokens == 24
    assert config.data.path == "builtin:topic-questions" and config.data.rule == "kind_and_polite"


@pytest.mark.parametrize("override, message", [
    ("ppo.clip_rnage=0.1", "unknown key ppo.clip_rnage; did you mean 'clip_range'"),
    ("steps=many", "steps must be int, got 'many'"),
    ("ppo.whiten_advantages=3", "must be bool"),
    ("ppo.micro_batch_size=3", "mini_batch_size of micro_batch_size"),
    ("deepspeed.zero_stage=4", "zero_stage must be 0-3"),
    ("reward.models.1.name=rm_llama3", "distinct, non-empty names"),
    ("generation.temperature=0", "temperature must be > 0"),
    ("nonsense", "is not key=value"),
    ("ppo.advantage_estimator=ppo", "advantage_estimator must be one of gae, grpo, dr_grpo, rloo, reinforce_pp"),
    ("ppo.kl_estimator=k4", "kl_estimator must be one of k1, k2, k3; got 'k4'"),
    ("ppo.kl_in=advantage", "kl_in must be one of reward, loss"),
    ("ppo.advantage_estimator=grpo", "grpo compares responses to the same prompt: set generation.samples_per_prompt "
                                     "to 2 or more"),
    ("generation.samples_per_prompt=0", "samples_per_prompt must be >= 1"),
    ("reward.rm_input=text", "reward.rm_input must be one of messages, actor_text; got 'text'"),
    ("reward.models.0={name: prm, path: 'tiny-prm:llama3_1', kind: prm, prm_preset: math-shepherd}",
     "tiny-prm:llama3_1 is trained in the qwen-prm step format, not 'math-shepherd'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_no_reward_models_is_an_error():
    with pytest.raises(ConfigError, match="reward.models is empty"):
        load_config(None, [])


def test_group_sizes_and_critic_free_estimators():
    grpo = DEMO.with_name("demo_grpo.yaml")
    config = load_config(grpo, [])
    assert config.ppo.advantage_estimator == "grpo" and config.generation.samples_per_prompt == 4
    with pytest.raises(ConfigError, match=r"rollout_batch_size x generation.samples_per_prompt must be a multiple"):
        load_config(DEMO, ["generation.samples_per_prompt=3", "ppo.mini_batch_size=64", "ppo.micro_batch_size=8"])
    assert load_config(DEMO, ["ppo.advantage_estimator=reinforce_pp"]).generation.samples_per_prompt == 1
    with pytest.raises(ConfigError, match="models.critic is set, but ppo.advantage_estimator rloo trains no critic"):
        load_config(DEMO, ["ppo.advantage_estimator=rloo", "generation.samples_per_prompt=2", "models.critic=/x"])


def test_help_config_lists_every_key_as_a_config_file_would(tmp_path):
    """`templar train --help-config` is itself a valid config file: every key, nested as the YAML is, at its default
    value, with its type and meaning; loaded (with one RM named, as a run needs) it gives the defaults back."""
    from templar.tools.train import config_reference
    from templar.trainer.config import RewardConfig, RewardModelConfig

    text = "\n".join(config_reference(TrainConfig))
    config = tmp_path / "reference.yaml"
    config.write_text(text.replace("    - name: ''", "    - name: rm"))
    assert load_config(config) == TrainConfig(reward=RewardConfig(models=[RewardModelConfig(name="rm")]))
    assert "  lam: 0.95" in text and "GAE's lambda" in text and "\nreward:\n" in text
    undocumented = [line for line in text.splitlines() if line.strip().endswith((":", "# int", "# float", "# str"))
                    and "#" in line]
    assert not undocumented, undocumented  # every leaf says what it is, not only its type
    out = subprocess.run([sys.executable, "-m", "templar.cli", "train", "--help-config"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and text in out.stdout
    assert "--help-config" in subprocess.run([sys.executable, "-m", "templar.cli", "train", "--help"],
                                             capture_output=True, text=True, timeout=120).stdout
