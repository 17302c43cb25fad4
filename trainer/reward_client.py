"""Kept for code that imports the reward client from here: it lives in `templar.reward_client` (the library), which
the trainer, the tools and the integrations share."""

from templar.reward_client import (FingerprintMismatchError, RewardClient, RewardClientConfig, RewardResult,
                                   RewardServerError)

__all__ = ["FingerprintMismatchError", "RewardClient", "RewardClientConfig", "RewardResult", "RewardServerError"]
