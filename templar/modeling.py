"""Torch helpers shared by the exported reward scorer and the PPO trainer."""

from __future__ import annotations

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Pad-aware positions: every row's first real token is at position 0, whichever side it is padded on."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
