"""MLP policies for gymnasium spaces: Gaussian for ``Box`` actions, categorical for ``Discrete``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from rebel.batch import RolloutBatch
from rebel.control.distributions import ActionDistribution, Categorical, ClippedGaussian, SquashedGaussian
from rebel.policy import Policy

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU}
LOG_STD_RANGE = (-5.0, 2.0)
OBS_CLIP = 10.0


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def check_spaces(observation_space: gym.Space, action_space: gym.Space, env_name: str = "the env") -> None:
    """Raise a clear error for spaces the control policies do not support."""
    if not isinstance(observation_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise ValueError(f"{env_name} has observation space {observation_space}; rebel.control supports Box and Discrete observations")
    if isinstance(action_space, gym.spaces.Box):
        if len(action_space.shape) != 1:
            raise ValueError(f"{env_name} has action space {action_space}; Box actions must be 1-D")
    elif not isinstance(action_space, gym.spaces.Discrete):
        raise ValueError(f"{env_name} has action space {action_space}; rebel.control supports Box (continuous) and Discrete actions")


class MLPPolicy(Policy):
    """``pi(a | s)`` from an MLP on normalised observations.

    * ``Box`` actions: a diagonal Gaussian, tanh-squashed into the bounds with the exact
      log-det correction (``squash=True``, needs finite bounds) or clipped for the env
      only (``squash=False``, log-prob of the unclipped sample as in SB3's PPO); the
      standard deviation is a learned vector (``state_dependent_std=False``) or a head.
    * ``Discrete`` actions: a categorical.

    Observations are normalised with running statistics held as buffers (saved with the
    policy, frozen while training). Batches carry the normalised observations the policy
    acted on, so scoring a trajectory uses exactly the inputs it was sampled from.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        squash: bool = True,
        state_dependent_std: bool = False,
        log_std_init: float = -0.5,
        normalize_observations: bool = True,
    ) -> None:
        super().__init__()
        check_spaces(observation_space, action_space)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        self.observation_space, self.action_space = observation_space, action_space
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.obs_dim = (
            int(observation_space.n) if isinstance(observation_space, gym.spaces.Discrete) else int(np.prod(observation_space.shape))
        )
        self.act_dim = int(action_space.n) if self.discrete else int(action_space.shape[0])
        bounded = not self.discrete and bool(np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high)))
        self.squash = squash and bounded
        self.state_dependent_std = state_dependent_std and not self.discrete
        self.normalize_observations = normalize_observations and isinstance(observation_space, gym.spaces.Box)
        out = self.act_dim * (2 if self.state_dependent_std else 1)
        self.net = mlp([self.obs_dim, *hidden_sizes, out], activation)
        if not self.discrete and not self.state_dependent_std:
            self.log_std = nn.Parameter(torch.full((self.act_dim,), float(log_std_init)))
        self.log_std_init = float(log_std_init)
        with torch.no_grad():  # small last layer: start near the uniform / zero-mean policy
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.zero_()
            if self.state_dependent_std:
                self.net[-1].bias[self.act_dim :] = log_std_init
        if not self.discrete:
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))
        self.register_buffer("obs_mean", torch.zeros(self.obs_dim, dtype=torch.float64))
        self.register_buffer("obs_var", torch.ones(self.obs_dim, dtype=torch.float64))
        self.register_buffer("obs_count", torch.zeros((), dtype=torch.float64))

    # ------------------------------------------------------------ observations
    def preprocess(self, obs: np.ndarray | Tensor) -> Tensor:
        """Raw observations ``[..., *obs_shape]`` -> normalised float inputs ``[..., obs_dim]``."""
        obs_t = torch.as_tensor(obs, device=self.obs_mean.device)
        if isinstance(self.observation_space, gym.spaces.Discrete):
            return nn.functional.one_hot(obs_t.long(), self.obs_dim).float()
        flat = obs_t.reshape(*obs_t.shape[: obs_t.dim() - len(self.observation_space.shape)], self.obs_dim).double()
        if self.normalize_observations:
            flat = ((flat - self.obs_mean) / torch.sqrt(self.obs_var + 1e-8)).clamp(-OBS_CLIP, OBS_CLIP)
        return flat.float()

    @torch.no_grad()
    def update_observation_stats(self, obs: np.ndarray) -> None:
        """Fold raw observations ``[n, *obs_shape]`` into the running mean and variance."""
        if not self.normalize_observations:
            return
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float64, device=self.obs_mean.device).reshape(-1, self.obs_dim)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
        total = self.obs_count + n
        delta = batch_mean - self.obs_mean
        m2 = self.obs_var * self.obs_count + batch_var * n + delta**2 * self.obs_count * n / total
        self.obs_mean.add_(delta * n / total)
        self.obs_var.copy_(m2 / total)
        self.obs_count.copy_(total)

    # ----------------------------------------------------------- distributions
    def distribution(self, inputs: Tensor) -> ActionDistribution:
        """The action distribution at preprocessed inputs ``[..., obs_dim]``."""
        out = self.net(inputs)
        if self.discrete:
            return Categorical(out)
        if self.state_dependent_std:
            mean, log_std = out.split(self.act_dim, dim=-1)
        else:
            mean, log_std = out, self.log_std.expand_as(out)
        log_std = log_std.clamp(*LOG_STD_RANGE)
        if self.squash:
            return SquashedGaussian(mean, log_std, self.action_low, self.action_high)
        return ClippedGaussian(mean, log_std, self.action_low, self.action_high)

    @torch.no_grad()
    def act(
        self, inputs: Tensor, deterministic: bool = False, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(action for the env, raw action to store)`` at preprocessed inputs.

        ``noise`` fixes the sample's randomness (common random numbers): standard normal
        ``[..., act_dim]`` for Gaussians, uniform ``[..., n]`` for a categorical (Gumbel-max).
        """
        dist = self.distribution(inputs)
        if deterministic:  # the raw action of a Gaussian's mode is its mean (pre-tanh or unclipped)
            action = dist.mode()
            return action, (action if isinstance(dist, Categorical) else dist.mean)
        if noise is None:
            return dist.sample(generator)
        if isinstance(dist, Categorical):
            gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-12)))
            action = (dist.logits + gumbel).argmax(-1)
            return action, action
        raw = dist.mean + dist.std * noise
        if isinstance(dist, SquashedGaussian):
            return dist.loc + dist.scale * torch.tanh(raw), raw
        return dist.clip(raw), raw

    def env_action(self, raw: Tensor) -> Tensor:
        """The action the env receives for a stored raw action."""
        if self.discrete:
            return raw
        if self.squash:
            return self.action_low + (self.action_high - self.action_low) * (torch.tanh(raw) + 1) / 2
        return torch.clamp(raw, self.action_low, self.action_high)

    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one step's ``noise`` for :meth:`act`."""
        return (self.act_dim,)

    def step_log_probs(self, batch: RolloutBatch) -> Tensor:
        """``[B, T]`` log pi(a_h | s_h) from ``batch.data["inputs"]`` and ``["raw_actions"]``."""
        dist = self.distribution(batch.data["inputs"])
        raw = batch.data["raw_actions"]
        return dist.log_prob(raw, raw)  # Gaussians: the pre-tanh / unclipped sample gives the exact density

    def predict(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions for raw observations (one or a batch), as numpy, ready for ``env.step``."""
        _, raw = self.act(self.preprocess(np.asarray(obs)), deterministic)
        return self.env_action(raw).cpu().numpy()
