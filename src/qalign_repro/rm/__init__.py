"""Reward-model backends (see rm/base.py)."""

from qalign_repro.rm.base import REWARDS, RewardModel, Scores

__all__ = ["REWARDS", "RewardModel", "Scores"]
