"""Right padding and pad-aware positions: the one definition the served path, the export's checks, the reward
model trainer and the PPO trainer share (numpy for the served path, torch for the models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by the callers that have tensors; the served path's numpy side needs none
    import torch


def right_pad(rows: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """Token rows -> ([N, W] int64 ids right-padded with pad_id, [N, W] int64 attention mask); W = the longest row
    (at least 1) unless given."""
    width = max(1, max(map(len, rows), default=0)) if width is None else width
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def padded_rows(rows: Sequence[Sequence[float]], fill: float, dtype: type = np.int32) -> np.ndarray:
    """Ragged per-row values (a process RM's steps) -> [N, W] with `fill` past each row's end; W = the longest row
    (at least 1: a tensor of zero width cannot go on the wire)."""
    width = max(1, max(map(len, rows), default=0))
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Pad-aware positions: every row's first real token is at position 0, whichever side it is padded on."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
