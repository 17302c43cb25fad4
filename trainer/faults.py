"""A testing hook: deterministic crashes at named points of a PPO step, for the crash-and-resume tests.

    TEMPLAR_FAULT=<phase>:<step>   e.g. TEMPLAR_FAULT=update:3

makes every rank of the trainer kill itself with a real SIGKILL (no handler, no clean-up, no flush) when it reaches
that point of that step. The points:

    rollout      the responses were generated (nothing of this step written yet)
    scoring      the rewards were collected (this step's samples.jsonl / unscored lines written, metrics not)
    update       the PPO epochs ran (weights changed in memory, this step's metrics not written)
    checkpoint   some files of the checkpoint are in its staging folder, before it is sealed and renamed into place

Unset (always, outside tests), it does nothing.
"""

from __future__ import annotations

import os
import signal

PHASES = ("rollout", "scoring", "update", "checkpoint")


def maybe_die(phase: str, step: int) -> None:
    if os.environ.get("TEMPLAR_FAULT") == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
