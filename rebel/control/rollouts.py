"""Rolling the policy out in an :class:`EnvPool`, the building block of every sampler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from rebel.control.envs import EnvPool
from rebel.control.estimators import ValueFunction
from rebel.control.policy import MLPPolicy


@dataclass
class Rollout:
    """``N`` rollouts of at most ``H`` steps (``mask`` marks the steps taken)."""

    inputs: Tensor  # [N, H, obs_dim] preprocessed observations the policy acted on
    raw_actions: Tensor  # [N, H, *policy.raw_shape] raw samples, for exact log-probs
    mask: Tensor  # [N, H] bool
    rewards: np.ndarray  # [N, H] per-step rewards (0 after a rollout stopped)
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
    raw_actions = torch.zeros((n, horizon, *policy.raw_shape), dtype=policy.raw_dtype)
    mask = torch.zeros(n, horizon, dtype=torch.bool)
    step_rewards = np.zeros((n, horizon))
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
        step_rewards[live, h] = rewards
        discounted[live] += gamma**h * rewards
        total[live] += rewards
        terminated[live] |= term
        truncated[live] |= trunc
        alive[live] = ~(term | trunc)
    observations = np.concatenate(seen) if seen else np.zeros((0, *pool.observation_space.shape))
    return Rollout(inputs, raw_actions, mask, step_rewards, discounted, total, terminated, truncated, observations)


class PendingObservations:
    """The observations an iteration met, held back from the policy's normalisation statistics
    until the start of the next ``collect``: the statistics then stay fixed for the whole
    iteration, so the policy that samples the batch, the pi_t it is scored as and the policy
    the update moves differ only in the parameters the regression fits.

    A sampler calls :meth:`apply` first in ``collect``, :meth:`add` with the observations the
    statistics should take in, and puts :meth:`state_dict` in its own (exact resume).
    """

    def __init__(self, observation_space: gym.Space) -> None:
        self.empty = np.zeros((0, *observation_space.shape), dtype=observation_space.dtype)
        self.chunks: list[np.ndarray] = []

    def add(self, obs: np.ndarray) -> None:
        """Hold a copy of raw observations ``[n, *obs_shape]`` for the next :meth:`apply`."""
        self.chunks.append(np.array(obs))

    def observations(self) -> np.ndarray:
        """``[n, *obs_shape]``: everything added since the last :meth:`apply`, in order."""
        return np.concatenate(self.chunks) if self.chunks else self.empty

    def apply(self, policy: MLPPolicy) -> None:
        """Fold the held observations into ``policy``'s statistics (in one update) and drop them."""
        policy.update_observation_stats(self.observations())
        self.chunks = []

    def state_dict(self) -> dict[str, Any]:
        return {"pending_observations": self.observations()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints written before the statistics waited for the next collect hold none.
        self.chunks = [np.array(state["pending_observations"])] if "pending_observations" in state else []


def end_values(out: Rollout, obs: np.ndarray, values: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``[N]``: ``values(obs)`` where a rollout stopped (``obs`` ``[N, ...]``) unless its
    episode terminated there, then 0. Rollouts cut by the horizon and by a time limit are
    both bootstrapped: the limit is not part of the task's state (V cannot see it), as
    SB3 treats timeouts."""
    end = np.zeros(len(out.terminated))
    running = np.flatnonzero(~out.terminated)
    if len(running):
        found = np.asarray(values(obs[running].copy()), dtype=np.float64)
        if found.shape != (len(running),):
            raise ValueError(f"bootstrap returned shape {found.shape} for {len(running)} observations; expected ({len(running)},)")
        end[running] = found
    return end


def bootstrapped_return(out: Rollout, end_value: np.ndarray, gamma: float) -> np.ndarray:
    """``[N]``: ``sum_h gamma^h r_h + gamma^k end_value`` with ``k`` the steps each rollout took."""
    return out.discounted_return + gamma ** out.mask.sum(1).numpy() * end_value


def returns_to_go(out: Rollout, end_value: np.ndarray, gamma: float) -> Tensor:
    """``[N, H]`` discounted return from every step taken to the rollout's end:
    ``G_h = r_h + gamma G_{h+1}``, starting from ``end_value [N]`` after the last step taken
    (a value of the state reached, or 0 where the episode ended). Zero after the end."""
    rewards = torch.as_tensor(out.rewards, dtype=torch.float32)
    to_go = torch.as_tensor(end_value, dtype=torch.float32)
    targets = torch.zeros_like(rewards)
    for h in reversed(range(rewards.shape[1])):
        to_go = torch.where(out.mask[:, h], rewards[:, h] + gamma * to_go, to_go)
        targets[:, h] = torch.where(out.mask[:, h], to_go, 0.0)
    return targets


def check_discount(gamma: float) -> None:
    """A sampler's ``gamma`` must lie in [0, 1]."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")


def check_value_function(value_function: object) -> None:
    """A sampler's ``value_function`` argument must be None or a :class:`ValueFunction`."""
    if value_function is not None and not isinstance(value_function, ValueFunction):
        raise ValueError(f"value_function must be None or a rebel.control.estimators.ValueFunction, got {type(value_function).__name__}")


def value_function_state(value_function: ValueFunction | None) -> dict[str, Any]:
    """The ``value_function`` entry of a sampler's ``state_dict`` (none without one)."""
    return {} if value_function is None else {"value_function": value_function.checkpoint_state()}


def load_value_function_state(value_function: ValueFunction | None, state: dict[str, Any]) -> None:
    """Restore what :func:`value_function_state` saved, refusing a checkpoint that disagrees
    with the sampler on having a value function."""
    if (value_function is None) != ("value_function" not in state):
        raise ValueError("the checkpoint and this sampler disagree on having a value_function")
    if value_function is not None:
        value_function.load_checkpoint_state(state["value_function"])


def fit_value(
    value_function: ValueFunction, out: Rollout, end_value: np.ndarray, gamma: float, generator: torch.Generator | None = None
) -> dict[str, float]:
    """Fit ``value_function`` to the :func:`returns_to_go` of every step of ``out`` (the
    preprocessed observations the policy acted on); returns its statistics and
    ``value_at_horizon``, the mean ``end_value`` of the rollouts that did not terminate."""
    stats = value_function.fit(out.inputs[out.mask], returns_to_go(out, end_value, gamma)[out.mask], generator=generator)
    running = ~out.terminated
    if running.any():
        stats["value_at_horizon"] = float(end_value[running].mean())
    return stats
