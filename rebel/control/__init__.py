"""gymnasium + MuJoCo adapter for REBEL."""

from rebel.control.distributions import (
    ATANH_EPS,
    ActionDistribution,
    Categorical,
    ClippedGaussian,
    SquashedGaussian,
)
from rebel.control.snapshots import frozen_normalizers, restore, snapshot

__all__ = [
    "ATANH_EPS",
    "ActionDistribution",
    "Categorical",
    "ClippedGaussian",
    "SquashedGaussian",
    "frozen_normalizers",
    "restore",
    "snapshot",
]
