"""Estimators of Q(s, a) for the Q variant of REBEL (lecture eq. 23.17).

For a state s, two actions a, a' ~ pi_t(.|s) and one-step log-probs, the regression
target of a pair is ``Q(s, a) - Q(s, a')``. This module holds the generic parts of a
*learned* critic, as in SAC: a :class:`ReplayBuffer` of transitions and a
:class:`TwinQCritic` (two Q networks with target copies, trained by TD towards the
value of the current policy). Only the actor update differs from SAC: REBEL's
regression replaces the reparameterised loss, and the KL to the previous policy that
the regression implies replaces SAC's entropy bonus (``alpha`` defaults to 0).

Everything here is torch + numpy: inputs are float tensors (observation features and
actions as the critic sees them); an adapter converts its observations and actions
(``rebel.control.critic.CriticSampler`` for gymnasium).

:class:`ValueFunction` is a state-value network V(s) fit by regression on observed returns;
the Monte-Carlo reset estimator uses it to bootstrap its rollouts at the horizon.

The other estimator of the design, the Monte-Carlo reset estimator (restore the
simulator to s, take a, follow pi_t, sum the discounted rewards), lives in
``rebel/control/mc.py``: it needs exact environment snapshots, so it belongs to the
control adapter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rebel.config import check_int, check_positive

__all__ = ["NextActionFn", "ReplayBuffer", "Transitions", "TwinQCritic", "ValueFunction"]

#: ``next_obs [B, obs_dim] -> (actions, log_probs [B])``: a' ~ pi(.|s') as the critic takes
#: it, and log pi(a'|s') (used only when ``alpha > 0``).
NextActionFn = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class Transitions:
    """A batch of ``n`` transitions ``(s, a, r, s', terminated)``: numpy arrays from
    :meth:`ReplayBuffer.sample`, float tensors (``actions`` long for a discrete critic)
    for :meth:`TwinQCritic.td_update`.

    ``next_obs`` is the true next observation, also when the episode ended there (not the
    reset observation of the next episode). ``terminated`` is 1 only when the episode
    ended by termination: there the bootstrap is cut; a time-limit truncation bootstraps.
    """

    obs: np.ndarray | Tensor
    actions: np.ndarray | Tensor
    rewards: np.ndarray | Tensor
    next_obs: np.ndarray | Tensor
    terminated: np.ndarray | Tensor

    def __len__(self) -> int:
        return len(self.rewards)


class ReplayBuffer:
    """A ring buffer of the last ``capacity`` transitions, held in numpy arrays.

    Args:
        capacity: transitions kept; the oldest are overwritten first.
        obs_shape, action_shape: the shape of one observation and one action.
        obs_dtype, action_dtype: their storage dtypes (float32 observations and actions
            by default; ``np.int64`` actions for a discrete action space).
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: Sequence[int],
        action_shape: Sequence[int],
        obs_dtype: Any = np.float32,
        action_dtype: Any = np.float32,
    ) -> None:
        check_int("capacity", capacity)
        self.capacity = capacity
        self.obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros((capacity, *action_shape), dtype=action_dtype)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.position = 0  # where the next transition goes
        self.size = 0  # transitions held

    def __len__(self) -> int:
        return self.size

    def _fields(self) -> dict[str, np.ndarray]:
        return {"obs": self.obs, "actions": self.actions, "rewards": self.rewards, "next_obs": self.next_obs, "terminated": self.terminated}

    def add(self, transitions: Transitions) -> None:
        """Append a batch of ``n`` transitions (arrays with leading dimension n)."""
        n = len(transitions)
        values = {name: np.asarray(getattr(transitions, name)) for name in self._fields()}
        for name, array in self._fields().items():
            if values[name].shape != (n, *array.shape[1:]):
                raise ValueError(f"{name} has shape {values[name].shape}; expected {(n, *array.shape[1:])}")
        if n > self.capacity:  # only the last `capacity` survive
            values = {name: v[n - self.capacity :] for name, v in values.items()}
            self.position = (self.position + n - self.capacity) % self.capacity
            n = self.capacity
        index = (self.position + np.arange(n)) % self.capacity
        for name, array in self._fields().items():
            array[index] = values[name]
        self.position = (self.position + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> Transitions:
        """``n`` transitions drawn uniformly with replacement (numpy arrays, copies)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        index = rng.integers(self.size, size=n)
        return Transitions(**{name: array[index] for name, array in self._fields().items()})

    def state_dict(self) -> dict[str, Any]:
        """The held transitions in storage order, plus the write position."""
        return {"position": self.position, "size": self.size, **{name: a[: self.size].copy() for name, a in self._fields().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        size = int(state["size"])
        if size > self.capacity:
            raise ValueError(f"the saved buffer holds {size} transitions; this one has capacity {self.capacity}")
        for name, array in self._fields().items():
            saved = np.asarray(state[name])
            if saved.shape[1:] != array.shape[1:]:
                raise ValueError(f"saved {name} has shape {saved.shape[1:]} per transition; this buffer has {array.shape[1:]}")
            array[:size] = saved
            array[size:] = 0
        self.position, self.size = int(state["position"]), size


def _mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class TwinQCritic(nn.Module):
    """Two Q networks with target copies, trained by TD towards the current policy's Q.

    One :meth:`td_update` on a batch of transitions minimises, for k = 1, 2,
    ``mean (Q_k(s, a) - y)^2`` with the SAC target (no gradient through it)::

        y = r + gamma * (1 - terminated) * (min_k Qtarg_k(s', a') - alpha * log pi(a'|s')),   a' ~ pi(.|s')

    then moves the targets: ``Qtarg <- (1 - tau) * Qtarg + tau * Q``.

    Args:
        obs_dim: size of the observation features.
        act_dim: size of a continuous action, or the number of actions when ``discrete``.
        hidden_sizes: ReLU MLP sizes of each network.
        discrete: ``Q(s, .)`` is a head over ``act_dim`` actions and ``actions`` are indices;
            otherwise Q takes the concatenation ``[s, a]``.
        lr: Adam learning rate of both networks.
        tau: target averaging rate in (0, 1].
        max_grad_norm: clip the networks' joint gradient norm (None: no clipping, as SAC).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: Sequence[int] = (256, 256),
        *,
        discrete: bool = False,
        lr: float = 3e-4,
        tau: float = 0.005,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__()
        check_int("obs_dim", obs_dim)
        check_int("act_dim", act_dim)
        check_positive("critic lr", lr)
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.discrete, self.tau, self.max_grad_norm = discrete, tau, max_grad_norm
        sizes = [obs_dim, *hidden_sizes, act_dim] if discrete else [obs_dim + act_dim, *hidden_sizes, 1]
        self.q1, self.q2 = _mlp(sizes), _mlp(sizes)
        self.q1_target, self.q2_target = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        for p in [*self.q1_target.parameters(), *self.q2_target.parameters()]:
            p.requires_grad_(False)
        self.optimizer = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=lr, foreach=True)

    # ------------------------------------------------------------------ values
    def _evaluate(self, net: nn.Module, obs: Tensor, act: Tensor) -> Tensor:
        if self.discrete:
            return net(obs).gather(-1, act.long().unsqueeze(-1)).squeeze(-1)
        return net(torch.cat([obs, act], dim=-1)).squeeze(-1)

    def q(self, obs: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q1(s, a), Q2(s, a))``, each ``[B]``, from the online networks."""
        return self._evaluate(self.q1, obs, act), self._evaluate(self.q2, obs, act)

    def target_q(self, obs: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        """``(Qtarg1(s, a), Qtarg2(s, a))`` from the target networks."""
        return self._evaluate(self.q1_target, obs, act), self._evaluate(self.q2_target, obs, act)

    @torch.no_grad()
    def value(self, obs: Tensor, act: Tensor, reduction: str = "min") -> Tensor:
        """``[B]`` estimate of Q(s, a) from the online networks: their ``"min"`` (SAC's actor
        uses it; pessimistic) or ``"mean"``."""
        q1, q2 = self.q(obs, act)
        if reduction == "min":
            return torch.minimum(q1, q2)
        if reduction == "mean":
            return (q1 + q2) / 2
        raise ValueError(f"reduction={reduction!r} is not supported; expected 'min' or 'mean'")

    @torch.no_grad()
    def td_target(self, batch: Transitions, next_action_fn: NextActionFn, gamma: float, alpha: float = 0.0) -> Tensor:
        """``[B]`` SAC-style target ``r + gamma (1 - terminated) (min Qtarg(s', a') - alpha log pi(a'|s'))``."""
        next_actions, next_logp = next_action_fn(batch.next_obs)
        next_q = torch.minimum(*self.target_q(batch.next_obs, next_actions))
        if alpha:
            next_q = next_q - alpha * next_logp
        return batch.rewards + gamma * (1.0 - batch.terminated) * next_q

    # ---------------------------------------------------------------- training
    def td_update(self, batch: Transitions, next_action_fn: NextActionFn, gamma: float, alpha: float = 0.0) -> dict[str, float]:
        """One Adam step of both networks on ``batch`` (float tensors), then a polyak step.

        Returns ``critic_loss`` (sum of the two mean squared TD errors), ``q_mean`` (mean
        online Q1 on the batch) and ``target_mean`` (mean target y).
        """
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        target = self.td_target(batch, next_action_fn, gamma, alpha)
        with torch.enable_grad():  # samplers run under the trainer's no_grad
            q1, q2 = self.q(batch.obs, batch.actions)
            loss = nn.functional.mse_loss(q1, target) + nn.functional.mse_loss(q2, target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_([*self.q1.parameters(), *self.q2.parameters()], self.max_grad_norm)
        self.optimizer.step()
        self.polyak_update()
        return {"critic_loss": loss.item(), "q_mean": q1.detach().mean().item(), "target_mean": target.mean().item()}

    @torch.no_grad()
    def polyak_update(self) -> None:
        """``Qtarg <- (1 - tau) * Qtarg + tau * Q`` for both networks."""
        online = [*self.q1.parameters(), *self.q2.parameters()]
        targets = [*self.q1_target.parameters(), *self.q2_target.parameters()]
        torch._foreach_mul_(targets, 1.0 - self.tau)
        torch._foreach_add_(targets, online, alpha=self.tau)

    def checkpoint_state(self) -> dict[str, Any]:
        """Networks, targets and the optimizer: everything an exact resume needs (a copy)."""
        return copy.deepcopy({"networks": self.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["networks"])
        self.optimizer.load_state_dict(state["optimizer"])


class ValueFunction(nn.Module):
    """A state-value network ``V(s)`` fit by least squares to observed returns.

    :meth:`fit` runs ``epochs`` passes of Adam over ``(inputs, targets)`` in shuffled
    minibatches, minimising ``mean (V(s) - G)^2``. The Monte-Carlo reset estimator fits it
    each iteration to the returns-to-go of its branch rollouts (on-policy returns of pi_t
    that are themselves bootstrapped with the previous V at the horizon: n-step TD targets)
    and adds ``gamma^k V(s_k)`` where a branch stopped without terminating (the horizon or
    the time limit).

    Args:
        obs_dim: size of the observation features.
        hidden_sizes: tanh MLP sizes.
        lr: Adam learning rate.
        epochs: passes over each :meth:`fit` call's data.
        minibatch_size: samples per Adam step.
        normalize_targets: learn ``(G - mu) / sigma`` with mu, sigma the mean and standard
            deviation of each :meth:`fit` call's targets; when they change, the output layer is
            rescaled so that V's predictions stay the same (PopArt's correction). Returns of
            hundreds then reach the network as numbers of order one.
    """

    def __init__(
        self,
        obs_dim: int,
        hidden_sizes: Sequence[int] = (64, 64),
        *,
        lr: float = 1e-3,
        epochs: int = 4,
        minibatch_size: int = 256,
        normalize_targets: bool = False,
    ) -> None:
        super().__init__()
        check_int("obs_dim", obs_dim)
        if not hidden_sizes or any(int(h) < 1 for h in hidden_sizes):
            raise ValueError(f"value hidden_sizes must be a non-empty list of sizes >= 1, got {hidden_sizes!r}")
        check_positive("value lr", lr)
        check_int("value epochs", epochs)
        check_int("value minibatch_size", minibatch_size)
        self.epochs, self.minibatch_size, self.normalize_targets = epochs, minibatch_size, normalize_targets
        self.net = _mlp([obs_dim, *(int(h) for h in hidden_sizes), 1], nn.Tanh)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, foreach=True)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def forward(self, obs: Tensor) -> Tensor:
        """``[B]`` values of ``obs [B, obs_dim]``."""
        return self.net(obs).squeeze(-1) * self.target_std + self.target_mean

    @torch.no_grad()
    def _rescale_targets(self, targets: Tensor) -> None:
        """Move (mu, sigma) to ``targets``' mean and standard deviation, keeping V's outputs."""
        mean, std = targets.mean(), targets.std(unbiased=False).clamp_min(1e-6)
        last = self.net[-1]
        last.weight.mul_(self.target_std / std)
        last.bias.mul_(self.target_std).add_(self.target_mean - mean).div_(std)
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    @torch.no_grad()
    def predict(self, obs: Tensor) -> np.ndarray:
        """``[B]`` float64 values of ``obs`` (no gradient), on the CPU."""
        return self.to(obs.device)(obs).double().cpu().numpy()

    def fit(self, inputs: Tensor, targets: Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
        """Regress ``V(inputs)`` on ``targets [B]``; returns ``value_loss`` (mean squared error
        before the fit) and ``value_explained_variance`` (of the targets by V, before the fit)."""
        if inputs.shape[0] != targets.shape[0] or targets.dim() != 1:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be [B, obs_dim] and [B]")
        device = next(self.parameters()).device
        inputs, targets = inputs.to(device), targets.to(device, torch.float32)
        with torch.no_grad():
            before = self(inputs)
        variance = targets.var(unbiased=False)
        stats = {
            "value_loss": (before - targets).pow(2).mean().item(),
            "value_explained_variance": (1 - (targets - before).var(unbiased=False) / variance).item() if variance > 0 else 0.0,
        }
        if self.normalize_targets:
            self._rescale_targets(targets)
        scaled = (targets - self.target_mean) / self.target_std
        with torch.enable_grad():  # samplers run under the trainer's no_grad
            for _ in range(self.epochs):
                order = torch.randperm(len(targets), generator=generator).to(device)
                for start in range(0, len(targets), self.minibatch_size):
                    index = order[start : start + self.minibatch_size]
                    loss = nn.functional.mse_loss(self.net(inputs[index]).squeeze(-1), scaled[index])
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
        return stats

    def checkpoint_state(self) -> dict[str, Any]:
        """Network and optimizer (a copy)."""
        return copy.deepcopy({"network": self.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        network = {"target_mean": torch.zeros(()), "target_std": torch.ones(()), **state["network"]}  # checkpoints before the scale
        self.load_state_dict(network)
        self.optimizer.load_state_dict(state["optimizer"])
