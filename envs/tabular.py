"""Tabular MDPs and bandits where the exact quantities REBEL approximates are computable.

* :class:`TabularMDP`: finite horizon, stochastic transitions, absorbing terminal states;
  exact expected return of any tabular policy and the optimal return by dynamic programming.
* :func:`mirror_descent_step`: the update REBEL regresses onto,
  ``pi_{t+1}(a) ∝ pi_t(a) exp(eta * r(a))``.
* :class:`TabularSoftmaxPolicy` and :class:`TabularSampler`: a :class:`rebel.Policy` and a
  :class:`rebel.Sampler` that run through the real trainer (``rebel train tabular``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rebel.batch import RolloutBatch
from rebel.config import option
from rebel.policy import Policy
from rebel.sampler import Sampler


@dataclass
class TabularMDP:
    """``transitions[s, a, s']``, ``rewards[s, a]`` (deterministic), ``initial[s]``, and
    ``terminal[s]`` (absorbing: an episode ends on reaching one). Episodes last at most
    ``horizon`` steps."""

    transitions: Tensor
    rewards: Tensor
    initial: Tensor
    horizon: int
    terminal: Tensor | None = None

    def __post_init__(self) -> None:
        s, a = self.rewards.shape
        if self.transitions.shape != (s, a, s):
            raise ValueError(f"transitions must have shape ({s}, {a}, {s}), got {tuple(self.transitions.shape)}")
        if not torch.allclose(self.transitions.sum(-1), torch.ones(s, a, dtype=self.transitions.dtype)):
            raise ValueError("every transitions[s, a] must sum to 1")
        if self.initial.shape != (s,) or not torch.isclose(self.initial.sum(), torch.tensor(1.0, dtype=self.initial.dtype)):
            raise ValueError(f"initial must be a distribution over {s} states")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if self.terminal is None:
            self.terminal = torch.zeros(s, dtype=torch.bool)

    @property
    def num_states(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_actions(self) -> int:
        return self.rewards.shape[1]

    @classmethod
    def random(cls, num_states: int = 6, num_actions: int = 3, horizon: int = 8, seed: int = 0, num_terminal: int = 1) -> TabularMDP:
        """A random MDP with sparse stochastic transitions (each (s, a) reaches 2 states) and
        ``num_terminal`` absorbing states; the same seed gives the same MDP."""
        g = torch.Generator().manual_seed(seed)
        transitions = torch.zeros(num_states, num_actions, num_states, dtype=torch.float64)
        for s in range(num_states):
            for a in range(num_actions):
                targets = torch.randperm(num_states, generator=g)[:2]
                weights = torch.rand(2, generator=g, dtype=torch.float64) + 0.25
                transitions[s, a, targets] = weights / weights.sum()
        rewards = torch.rand(num_states, num_actions, generator=g, dtype=torch.float64)
        terminal = torch.zeros(num_states, dtype=torch.bool)
        terminal[num_states - num_terminal :] = True
        rewards[terminal] = 0.0
        initial = torch.zeros(num_states, dtype=torch.float64)
        initial[: num_states - num_terminal] = 1.0 / (num_states - num_terminal)
        return cls(transitions, rewards, initial, horizon, terminal)

    @classmethod
    def bandit(cls, rewards: Tensor | list[float]) -> TabularMDP:
        """A one-state, one-step MDP: a multi-armed bandit with these arm rewards."""
        r = torch.as_tensor(rewards, dtype=torch.float64).reshape(1, -1)
        return cls(torch.ones(1, r.shape[1], 1, dtype=torch.float64), r, torch.ones(1, dtype=torch.float64), 1)

    def expected_return(self, probs: Tensor, start: int | None = None) -> float:
        """Exact expected (undiscounted) return of the policy ``probs[h, s, a]`` from
        ``initial`` (or from state ``start``)."""
        value = self._values(probs.to(torch.float64))
        return float(value[start] if start is not None else self.initial @ value)

    def optimal_return(self) -> float:
        """The best expected return over all (time-dependent) policies."""
        value = torch.zeros(self.num_states, dtype=torch.float64)
        for _ in range(self.horizon):
            value = torch.where(self.terminal, 0.0, (self.rewards + self.transitions @ value).max(-1).values)
        return float(self.initial @ value)

    def _values(self, probs: Tensor) -> Tensor:
        value = torch.zeros(self.num_states, dtype=torch.float64)
        for h in reversed(range(self.horizon)):
            q = self.rewards + self.transitions @ value
            value = torch.where(self.terminal, 0.0, (probs[h] * q).sum(-1))
        return value


def mirror_descent_step(probs: Tensor, rewards: Tensor, eta: float) -> Tensor:
    """The exact mirror-descent update ``pi_{t+1}(a) ∝ pi_t(a) exp(eta * r(a))``."""
    logits = torch.log(probs) + eta * rewards
    return torch.softmax(logits, dim=-1)


class TabularSoftmaxPolicy(Policy):
    """``pi(a | s, h) = softmax(logits[h, s])``: time-dependent, as optimal finite-horizon
    policies are (``time_dependent=False`` shares one table over steps)."""

    def __init__(self, num_states: int, num_actions: int, horizon: int, time_dependent: bool = True) -> None:
        super().__init__()
        self.horizon = horizon
        self.logits = torch.nn.Parameter(torch.zeros(horizon if time_dependent else 1, num_states, num_actions))

    def probs(self) -> Tensor:
        """``[H, S, A]`` action probabilities at each step."""
        return torch.softmax(self.logits, -1).expand(self.horizon, -1, -1)

    def step_log_probs(self, batch: RolloutBatch) -> Tensor:
        states, actions = batch.data["states"], batch.data["actions"]
        steps = torch.arange(states.shape[1], device=states.device) % self.logits.shape[0]
        log_probs = torch.log_softmax(self.logits, -1)
        return log_probs[steps[None, :], states, actions]


class TabularSampler(Sampler):
    """Each iteration draws ``num_contexts`` start states from ``initial`` and ``group_size``
    rollouts from each (one group per start state); reward = the rollout's return."""

    def __init__(self, mdp: TabularMDP, num_contexts: int = 32, group_size: int = 4, seed: int = 0) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (REBEL compares trajectories of a context), got {group_size}")
        if num_contexts < 1:
            raise ValueError(f"num_contexts must be >= 1, got {num_contexts}")
        self.mdp, self.num_contexts, self.group_size = mdp, num_contexts, group_size
        self.generator = torch.Generator().manual_seed(seed)
        best = mdp.optimal_return()
        self.optimum = {"expected_return": best, "episode_return": best, "reward_mean": best}  # drawn in curves.png

    def collect(self, policy: Policy) -> RolloutBatch:
        mdp, g = self.mdp, self.generator
        probs = policy.probs().detach().double().cpu()  # type: ignore[operator]
        starts = torch.multinomial(mdp.initial, self.num_contexts, replacement=True, generator=g)
        group = torch.arange(self.num_contexts).repeat_interleave(self.group_size)
        state = starts.repeat_interleave(self.group_size)
        n, horizon = len(state), mdp.horizon
        states = torch.zeros(n, horizon, dtype=torch.long)
        actions = torch.zeros(n, horizon, dtype=torch.long)
        mask = torch.zeros(n, horizon, dtype=torch.bool)
        reward = torch.zeros(n, dtype=torch.float64)
        alive = ~mdp.terminal[state]
        for h in range(horizon):
            action = torch.multinomial(probs[h, state], 1, generator=g).squeeze(1)
            states[:, h], actions[:, h], mask[:, h] = state, action, alive
            reward += torch.where(alive, mdp.rewards[state, action], 0.0)
            next_state = torch.multinomial(mdp.transitions[state, action], 1, generator=g).squeeze(1)
            state = torch.where(alive, next_state, state)
            alive = alive & ~mdp.terminal[state]
        return RolloutBatch(
            group=group,
            reward=reward.float(),
            mask=mask,
            data={"states": states, "actions": actions},
            context=starts.repeat_interleave(self.group_size).tolist(),
            counts={"env_steps": float(mask.sum())},
            stats={
                "episode_return": reward.mean().item(),
                "expected_return": mdp.expected_return(probs),
                "optimal_return": mdp.optimal_return(),
            },
        )

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class TabularConfig:
    """The embedded tabular task of ``rebel train tabular``."""

    env: str = option("mdp", "mdp (random stochastic MDP with a terminal state) | bandit")
    num_states: int = option(6, "states of the random MDP")
    num_actions: int = option(3, "actions (arms of the bandit)")
    horizon: int = option(8, "steps per episode of the MDP")
    env_seed: int = option(0, "seed that draws the MDP or the bandit")
    num_contexts: int = option(32, "start states (groups) per iteration")
    group_size: int = option(4, "rollouts per start state")

    def __post_init__(self) -> None:
        if self.env not in ("mdp", "bandit"):
            raise ValueError(f"env={self.env!r} is not supported; expected 'mdp' or 'bandit'")


def make_tabular(config: TabularConfig, seed: int = 0) -> tuple[TabularSoftmaxPolicy, TabularSampler]:
    """The policy and sampler of the embedded tabular task."""
    if config.env == "bandit":
        arms = torch.linspace(0.0, 1.0, config.num_actions, dtype=torch.float64)
        mdp = TabularMDP.bandit(arms[torch.randperm(config.num_actions, generator=torch.Generator().manual_seed(config.env_seed))])
    else:
        mdp = TabularMDP.random(config.num_states, config.num_actions, config.horizon, seed=config.env_seed)
    policy = TabularSoftmaxPolicy(mdp.num_states, mdp.num_actions, mdp.horizon)
    return policy, TabularSampler(mdp, config.num_contexts, config.group_size, seed=seed)
