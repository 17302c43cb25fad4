"""Templar: reward-model serving on NVIDIA Triton with each RM's own chat template, and a PPO trainer that calls it."""

__version__ = "0.1.0"
