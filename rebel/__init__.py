"""rebel-rl: reinforcement learning by REgression to RElative REward (REBEL).

``import rebel`` loads torch and numpy only. The trainer (accelerate) and the adapters
``rebel.control``, ``rebel.text`` and ``rebel.diffusion`` load when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from rebel.batch import RolloutBatch
from rebel.console import hide_library_noise
from rebel.losses import (
    LOSSES,
    TrainingLoss,
    explained_variance,
    group_advantage,
    pair_indices,
    ppo_clip_loss,
    rebel_loss,
    register_loss,
    rloo_loss,
    trajectory_log_prob,
)
from rebel.normalize import RewardNormalizer, RunningMeanStd
from rebel.policy import Policy
from rebel.sampler import Sampler

_LAZY = {
    "Trainer": "rebel.trainer",
    "TrainerConfig": "rebel.trainer",
}
_ADAPTERS = ("control", "text", "diffusion")

hide_library_noise()  # library messages a user cannot act on (rebel.console)

__all__ = [
    "LOSSES",
    "Policy",
    "RewardNormalizer",
    "RolloutBatch",
    "RunningMeanStd",
    "Sampler",
    "Trainer",
    "TrainerConfig",
    "TrainingLoss",
    "explained_variance",
    "group_advantage",
    "pair_indices",
    "ppo_clip_loss",
    "rebel_loss",
    "register_loss",
    "rloo_loss",
    "trajectory_log_prob",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # the installed distribution's, read when asked
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("rebel-rl")
        except PackageNotFoundError:
            return "0+unknown"  # a source tree pip has not installed
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _ADAPTERS:
        return importlib.import_module(f"rebel.{name}")
    raise AttributeError(f"module 'rebel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_ADAPTERS, "__version__"])
