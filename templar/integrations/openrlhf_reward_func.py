"""OpenRLHF's in-process reward function, on Templar: pass THIS FILE as `--reward.remote_url` (`--remote_rm_url` before
OpenRLHF 0.10.2); `templar gateway --print-reward-func` prints its path. OpenRLHF loads it and calls
`reward_func(queries, prompts, labels)`; the rows are parsed back into messages with the actor's template and scored
by the served reward models over gRPC, each applying its own template (no HTTP hop).

Configured by environment variables (set them where OpenRLHF's workers run):
    TEMPLAR_ACTOR_TEMPLATE   the actor's tokenizer folder, or a family name fetched by `templar assets`  (required)
    TEMPLAR_MODELS           reward models, NAME[:WEIGHT] comma-separated, e.g. "rm_llama3:1,rm_gemma3:0.5"  (required)
    TEMPLAR_URL              Triton gRPC endpoint(s), comma-separated                    (default 127.0.0.1:8001)
    TEMPLAR_FAILED_REWARD    reward of a row that cannot be parsed or scored; unset: such a call raises
    TEMPLAR_AGGREGATE        a process RM's steps -> its reward: min, last or mean; unset: as it was exported
    TEMPLAR_<OPTION>         any option of the reward client (templar.reward_client.RewardClientConfig), named as
                             its field in capitals: TEMPLAR_TLS=1, TEMPLAR_TLS_CA=ca.pem, TEMPLAR_TLS_CERT,
                             TEMPLAR_TLS_KEY, TEMPLAR_REQUEST_TIMEOUT_S=30, TEMPLAR_MAX_ATTEMPTS,
                             TEMPLAR_HEADERS=key=value[,key=value...], ...
"""

from __future__ import annotations

import os
import threading

from templar import client_options
from templar.integrations.openrlhf import OpenRLHFRewards
from templar.reward_ensemble import RewardEnsemble, WeightedModel
from templar.steps import check_aggregate
from templar.template_parser import TemplateParser

_lock = threading.Lock()
_state: dict[str, object] = {}


def _setup() -> tuple[OpenRLHFRewards, RewardEnsemble]:
    """Built once per process from the environment (OpenRLHF calls from several threads)."""
    with _lock:
        if "rewards" not in _state:
            from templar.environment import use_offline_defaults
            from templar.errors import ConfigError

            use_offline_defaults()
            missing = [k for k in ("TEMPLAR_ACTOR_TEMPLATE", "TEMPLAR_MODELS") if not os.environ.get(k)]
            if missing:
                raise ConfigError(f"set {' and '.join(missing)} for Templar's OpenRLHF reward function ({__file__})")
            failed = os.environ.get("TEMPLAR_FAILED_REWARD")
            parser = TemplateParser.from_source(os.environ["TEMPLAR_ACTOR_TEMPLATE"])
            models = WeightedModel.parse_list(os.environ["TEMPLAR_MODELS"])
            _state["ensemble"] = RewardEnsemble(models, client_options.from_environment(os.environ))
            _state["rewards"] = OpenRLHFRewards(parser, float(failed) if failed else None)
            _state["aggregate"] = check_aggregate(os.environ.get("TEMPLAR_AGGREGATE") or None, "TEMPLAR_AGGREGATE")
    return _state["rewards"], _state["ensemble"]  # type: ignore[return-value]


def reward_func(queries: list[str], prompts: list[str], labels: list, **kwargs) -> dict:
    """OpenRLHF's signature: {"rewards": [...], "scores": [...], "extra_logs": {...}} for the rows."""
    rewards, ensemble = _setup()
    rows = rewards.rows(queries, prompts, labels)
    good = [c for c in rows.conversations if c is not None]
    return rewards.answer(rows, ensemble.score(good, _state["aggregate"]) if good else None)
