"""gymnasium + MuJoCo adapter for REBEL.

``Rebel`` trains, evaluates, saves and loads agents (Stable-Baselines3's shape); the
variants are samplers: ``TrajectorySampler`` (rollouts from one start state),
``MonteCarloSampler`` (Monte-Carlo reset estimates of Q(s, a)) and ``CriticSampler``
(twin Q critics on a replay buffer).
"""

from rebel.control.agent import ControlConfig, Rebel
from rebel.control.critic import CriticSampler
from rebel.control.distributions import ATANH_EPS, ActionDistribution, Categorical, ClippedGaussian, MultiCategorical, SquashedGaussian
from rebel.control.envs import EnvPool, make_env
from rebel.control.evaluation import evaluate, record_video
from rebel.control.mc import MonteCarloSampler
from rebel.control.policy import MLPPolicy
from rebel.control.snapshots import frozen_normalizers, restore, snapshot
from rebel.control.trajectory import TrajectorySampler

__all__ = [
    "ATANH_EPS",
    "ActionDistribution",
    "Categorical",
    "ClippedGaussian",
    "ControlConfig",
    "CriticSampler",
    "EnvPool",
    "MLPPolicy",
    "MonteCarloSampler",
    "MultiCategorical",
    "Rebel",
    "SquashedGaussian",
    "TrajectorySampler",
    "evaluate",
    "frozen_normalizers",
    "make_env",
    "record_video",
    "restore",
    "snapshot",
]
