"""Typed training configuration: YAML + key=value overrides, clear errors."""

from __future__ import annotations

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
    assert config.reward.models[1].weight == 0.25 and config.reward.models[0].path == "tiny:llama3_1"
    assert config.reward.url == "127.0.0.1:9001" and config.deepspeed.zero_stage == 3
    assert config.models.actor == "tiny:qwen2_5" and config.generation.max_new_tokens == 8


@pytest.mark.parametrize("override, message", [
    ("ppo.clip_rnage=0.1", "unknown key ppo.clip_rnage; did you mean 'clip_range'"),
    ("steps=many", "steps must be int, got 'many'"),
    ("ppo.whiten_advantages=3", "must be bool"),
    ("ppo.micro_batch_size=3", "mini_batch_size of micro_batch_size"),
    ("deepspeed.zero_stage=4", "zero_stage must be 0-3"),
    ("reward.models.1.name=rm_llama3", "distinct, non-empty names"),
    ("generation.temperature=0", "temperature must be > 0"),
    ("nonsense", "is not key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_no_reward_models_is_an_error():
    with pytest.raises(ConfigError, match="reward.models is empty"):
        load_config(None, [])
