"""Advantage estimators as pure functions (no Ray, no I/O, no config objects).

The driver calls :func:`compute_advantages` after the reward step, with one scalar reward per
trajectory and the trajectory's GRPO group key (``Trajectory.uid``: all samples of one task share
it). Estimators register by name in :data:`ADVANTAGE_ESTIMATORS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

# Guards the division for groups whose rewards are all equal (std 0): their advantages are 0.
_STD_EPS = 1e-6


class AdvantageEstimator(Protocol):
    def __call__(self, rewards: np.ndarray, groups: np.ndarray, std_norm: bool) -> np.ndarray:
        """rewards: ``[N]`` float; groups: ``[N]`` int group index. Returns advantages ``[N]``."""


def grpo_advantages(rewards: np.ndarray, groups: np.ndarray, std_norm: bool) -> np.ndarray:
    """GRPO: ``A_i = (r_i - mean_g) / (std_g + eps)`` within each group ``g`` (or ``r_i - mean_g`` without std norm).

    ``std_g`` is the population standard deviation (ddof = 0) of the group's rewards. A group of one,
    or a group whose rewards are all equal, carries no signal and gets zeros.
    """
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for g in np.unique(groups):
        members = groups == g
        centred = rewards[members] - rewards[members].mean()
        if std_norm:
            centred = centred / (rewards[members].std() + _STD_EPS)
        advantages[members] = centred
    return advantages


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {"grpo": grpo_advantages}


def compute_advantages(estimator: str, rewards: Sequence[float], uids: Sequence[str], std_norm: bool = True
                       ) -> tuple[list[float], dict[str, float]]:
    """One advantage per trajectory from its scalar reward and its group key.

    rewards, uids: length ``N``. Returns (advantages of length ``N``, metrics: reward and advantage
    statistics and the fraction of groups whose rewards were all equal, which carry no gradient).
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {estimator!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    if len(rewards) != len(uids):
        raise ValueError(f"{len(rewards)} rewards for {len(uids)} uids")
    r = np.asarray(rewards, dtype=np.float64)
    if not np.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    _, groups = np.unique(np.asarray(uids, dtype=object).astype(str), return_inverse=True)
    adv = ADVANTAGE_ESTIMATORS[estimator](r, groups, std_norm)
    flat_groups = [g for g in np.unique(groups) if np.ptp(r[groups == g]) == 0]
    metrics = {
        "reward_mean": float(r.mean()) if len(r) else 0.0,
        "reward_std": float(r.std()) if len(r) else 0.0,
        "advantage_abs_mean": float(np.abs(adv).mean()) if len(adv) else 0.0,
        "flat_group_frac": len(flat_groups) / max(1, len(np.unique(groups))),
    }
    return adv.tolist(), metrics
