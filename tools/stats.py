"""Small statistics shared by the tools that compare two sets of scores."""

from __future__ import annotations

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors (ties broken by position: scores here are floats)."""
    ranks = lambda x: np.argsort(np.argsort(np.asarray(x, dtype=np.float64)))  # noqa: E731
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])
