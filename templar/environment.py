"""Process-wide settings every Templar entry point applies first (the CLI, the deepspeed-launched trainer ranks, the
tests): no model hub, ever (tokenizers and models are local folders), and no tokenizer thread pools that warn when
a process forks (Triton forks one Python stub per model)."""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def use_offline_defaults(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the defaults in `env` (default: this process's environment) unless already set; returns `env`."""
    target = os.environ if env is None else env
    for key, value in OFFLINE_DEFAULTS.items():
        target.setdefault(key, value)
    return target
