"""Rolling the policy out in an :class:`EnvPool`, the building block of every sampler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rebel.control.envs import EnvPool
from rebel.control.policy import MLPPolicy


@dataclass
class Rollout:
    """``N`` rollouts of at most ``H`` steps (``mask`` marks the steps taken)."""

    inputs: Tensor  # [N, H, obs_dim] preprocessed observations the policy acted on
    raw_actions: Tensor  # [N, H, act_dim] (or [N, H] for Discrete) raw samples, for exact log-probs
    mask: Tensor  # [N, H] bool
    discounted_return: np.ndarray  # [N] sum_h gamma^h r_h
    reward_sum: np.ndarray  # [N] undiscounted
    terminated: np.ndarray  # [N] the episode ended by termination
    truncated: np.ndarray  # [N] the episode ended by a time limit
    raw_observations: np.ndarray  # [sum of steps, *obs_shape] observations met, for normalisation statistics


def rollout(
    pool: EnvPool,
    policy: MLPPolicy,
    index: Sequence[int],
    horizon: int,
    gamma: float,
    generator: torch.Generator | None = None,
    first_raw_actions: Tensor | None = None,
    noise: Tensor | None = None,
) -> Rollout:
    """Follow ``policy`` for up to ``horizon`` steps from the current states of copies
    ``index`` of ``pool``; a copy stops at termination or truncation.

    ``first_raw_actions`` forces the first action of each rollout (a Q(s, a) branch);
    ``noise`` ``[N, H, *noise_shape]`` fixes the policy's sampling randomness (common
    random numbers across branches).
    """
    index = list(index)
    n = len(index)
    inputs = torch.zeros(n, horizon, policy.obs_dim)
    raw_shape = (n, horizon) if policy.discrete else (n, horizon, policy.act_dim)
    raw_actions = torch.zeros(raw_shape, dtype=torch.long if policy.discrete else torch.float32)
    mask = torch.zeros(n, horizon, dtype=torch.bool)
    discounted = np.zeros(n)
    total = np.zeros(n)
    terminated = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    alive = np.ones(n, dtype=bool)
    seen: list[np.ndarray] = []
    for h in range(horizon):
        live = np.flatnonzero(alive)
        if len(live) == 0:
            break
        envs = [index[k] for k in live]
        obs = pool.obs[envs]
        seen.append(obs.copy())
        x = policy.preprocess(obs)
        if h == 0 and first_raw_actions is not None:
            raw = first_raw_actions[live]
            action = policy.env_action(raw)
        else:
            step_noise = None if noise is None else noise[live, h]
            action, raw = policy.act(x, generator=generator, noise=step_noise)
        inputs[live, h] = x
        raw_actions[live, h] = raw
        mask[live, h] = True
        rewards, term, trunc = pool.step(envs, action.cpu().numpy())
        discounted[live] += gamma**h * rewards
        total[live] += rewards
        terminated[live] |= term
        truncated[live] |= trunc
        alive[live] = ~(term | trunc)
    observations = np.concatenate(seen) if seen else np.zeros((0, *pool.observation_space.shape))
    return Rollout(inputs, raw_actions, mask, discounted, total, terminated, truncated, observations)
