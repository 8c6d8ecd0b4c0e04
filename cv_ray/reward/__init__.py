"""Rewards: answer checking, the LLM judge client, the format reward, the dense process reward and
the reward actors. See docs/reward.md."""

from cv_ray.reward.dense import score_group
from cv_ray.reward.outcome import SampleOutcome, UsedOp, outcome_from_trajectory
from cv_ray.reward.reward_worker import RewardGroup, RewardWorker

__all__ = ["RewardGroup", "RewardWorker", "SampleOutcome", "UsedOp", "outcome_from_trajectory", "score_group"]
