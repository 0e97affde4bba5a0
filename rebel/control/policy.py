"""MLP policies for gymnasium spaces: Gaussian for ``Box`` actions, categorical for ``Discrete``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from rebel.batch import RolloutBatch
from rebel.control.distributions import ActionDistribution, Categorical, ClippedGaussian, MultiCategorical, SquashedGaussian
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
    """Raise a one-line error naming the space for spaces the control policies do not support
    (the policy itself sees ``Box`` or ``Discrete`` observations: :func:`~rebel.control.envs.make_env`
    flattens the others)."""
    if not isinstance(observation_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise ValueError(f"{env_name} has observation space {observation_space}; rebel.control supports Box and Discrete observations")
    if isinstance(action_space, gym.spaces.Box):
        if len(action_space.shape) != 1:
            raise ValueError(f"{env_name} has action space {action_space}; Box actions must be 1-D")
    elif isinstance(action_space, gym.spaces.MultiDiscrete):
        if len(action_space.shape) != 1 or np.any(action_space.start != 0):
            raise ValueError(f"{env_name} has action space {action_space}; MultiDiscrete actions must be 1-D and start at 0")
    elif isinstance(action_space, gym.spaces.MultiBinary):
        if len(action_space.shape) != 1:
            raise ValueError(f"{env_name} has action space {action_space}; MultiBinary actions must be 1-D")
    elif not isinstance(action_space, gym.spaces.Discrete):
        raise ValueError(
            f"{env_name} has action space {action_space}; rebel.control supports Box (continuous), Discrete, MultiDiscrete and MultiBinary actions"
        )


def category_sizes(action_space: gym.Space) -> tuple[int, ...] | None:
    """The number of values of each dimension of a ``MultiDiscrete`` (``nvec``) or ``MultiBinary``
    (2 each) action; None for other spaces."""
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        return tuple(int(n) for n in action_space.nvec)
    if isinstance(action_space, gym.spaces.MultiBinary):
        return (2,) * int(action_space.shape[0])
    return None


class MLPPolicy(Policy):
    """``pi(a | s)`` from an MLP on normalised observations.

    * ``Box`` actions: a diagonal Gaussian, tanh-squashed into the bounds with the exact
      log-det correction (``squash=True``, needs finite bounds) or clipped for the env
      only (``squash=False``, log-prob of the unclipped sample as in SB3's PPO); the
      standard deviation is a learned vector (``state_dependent_std=False``) or a head.
    * ``Discrete`` actions: a categorical; ``MultiDiscrete`` / ``MultiBinary`` actions: one
      independent categorical per dimension (two values each for MultiBinary), the
      log-probability summed over dimensions.

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
        self.category_sizes = category_sizes(action_space)  # MultiDiscrete / MultiBinary: values per dimension
        self.categorical = self.discrete or self.category_sizes is not None  # raw actions are indices
        self.obs_dim = (
            int(observation_space.n) if isinstance(observation_space, gym.spaces.Discrete) else int(np.prod(observation_space.shape))
        )
        if self.category_sizes is not None:
            self.act_dim = sum(self.category_sizes)  # logits, one per value of every dimension
        else:
            self.act_dim = int(action_space.n) if self.discrete else int(action_space.shape[0])
        #: shape and dtype of one step's raw action (what batches keep for the log-probs)
        self.raw_shape: tuple[int, ...] = ()
        if self.category_sizes is not None:
            self.raw_shape = (len(self.category_sizes),)
        elif not self.discrete:
            self.raw_shape = (self.act_dim,)
        self.raw_dtype = torch.long if self.categorical else torch.float32
        bounded = not self.categorical and bool(np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high)))
        self.squash = squash and bounded
        self.state_dependent_std = state_dependent_std and not self.categorical
        self.normalize_observations = normalize_observations and isinstance(observation_space, gym.spaces.Box)
        out = self.act_dim * (2 if self.state_dependent_std else 1)
        self.net = mlp([self.obs_dim, *hidden_sizes, out], activation)
        if not self.categorical and not self.state_dependent_std:
            self.log_std = nn.Parameter(torch.full((self.act_dim,), float(log_std_init)))
        self.log_std_init = float(log_std_init)
        with torch.no_grad():  # small last layer: start near the uniform / zero-mean policy
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.zero_()
            if self.state_dependent_std:
                self.net[-1].bias[self.act_dim :] = log_std_init
        if not self.categorical:
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
        if self.category_sizes is not None:
            return MultiCategorical(out, self.category_sizes)
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
        ``[..., act_dim]`` for Gaussians, uniform ``[..., act_dim]`` for categoricals (Gumbel-max
        over each dimension's values).
        """
        dist = self.distribution(inputs)
        if deterministic:  # the raw action of a Gaussian's mode is its mean (pre-tanh or unclipped)
            action = dist.mode()
            return action, (action if self.categorical else dist.mean)
        if noise is None:
            return dist.sample(generator)
        if isinstance(dist, MultiCategorical):
            action = dist.gumbel_max(noise)
            return action, action
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
        if self.categorical:
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
