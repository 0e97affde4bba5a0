"""The Monte-Carlo reset variant: Q(s, a) from branch rollouts restored from a snapshot of s.

For a state ``s`` and actions ``a_1..a_n ~ pi_t(.|s)``::

    Q(s, a) ~ (1/m) sum_j [ sum_{h<H} gamma^h r_h  (+ gamma^H V(s_H) if the branch is still running) ]

where branch ``j`` restores the simulator to ``s``, restarts its random generator from a seed
of its own, takes ``a`` and then follows pi_t. REBEL regresses ``(Delta(a_i) - Delta(a_k)) / eta``
on ``Q(s, a_i) - Q(s, a_k)`` with one-step log-ratios (docs/math.md, "Q-critic variant").
Without ``V`` and with branches that run to the episode's end the estimate is unbiased; a
branch cut at ``H`` replaces the rest of its return by ``V(s_H)``, and the estimate inherits
``gamma^H`` times V's error (docs/control.md, "Monte-Carlo reset estimator").
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rebel.batch import RolloutBatch
from rebel.config import check_counts, check_group_size
from rebel.control.envs import EnvPool, EnvSource
from rebel.control.estimators import ValueFunction
from rebel.control.policy import MLPPolicy
from rebel.control.rollouts import (
    PendingObservations,
    Rollout,
    bootstrapped_return,
    check_discount,
    check_value_function,
    end_values,
    fit_value,
    load_value_function_state,
    rollout,
    value_function_state,
)
from rebel.policy import Policy
from rebel.sampler import Sampler

Bootstrap = Callable[[np.ndarray], np.ndarray]
Snapshot = tuple[dict[str, Any], np.ndarray]  # what EnvPool.snapshot returns


class MonteCarloSampler(Sampler):
    """Each iteration, ``num_states`` states with ``actions_per_state`` actions each; an
    action's reward is its Monte-Carlo reset estimate of Q(s, a).

    **States.** ``num_states`` *walkers* follow their own on-policy episodes (a walker whose
    episode ends is reset at once with a fresh seed). Each iteration every walker first
    advances a random number of steps drawn uniformly from ``1..state_stride`` (so that
    consecutive iterations visit different states), then the state it stands in is
    snapshotted.

    **Spread walkers** (``spread_walkers``): the walkers start together at t = 0 and, on a
    task that never terminates (HalfCheetah), stay close together (the random strides spread
    them by a few dozen steps): 256 walkers moving 5.5 steps an iteration have not reached
    t = 900 after 1M env steps, so the late part of an episode is never trained on. With this option each walker's
    first episode is cut (reset, not counted as finished) after a length drawn uniformly from
    ``1..T`` (``T`` the env's time limit), so that from the second episode on the walkers
    cover all of the episode's time steps.

    **Q estimates.** At each state ``n = actions_per_state`` raw actions are drawn from
    pi_t. Each (state, action) gets ``m = rollouts_per_action`` branches: restore the
    snapshot, restart the env's random generator from the branch's seed (see below), take
    the action, follow pi_t for ``horizon - 1`` more steps or until the
    episode terminates or is truncated, sum the discounted rewards; ``bootstrap(obs)``
    (raw observations ``[k, *obs_shape]`` -> values ``[k]``), when given, adds
    ``gamma**k * V(s_k)`` to a branch that stopped after ``k`` steps without terminating:
    ``k = horizon`` for one still running, fewer for one cut by the time limit (bootstrapped
    as SB3 treats timeouts: the limit is not part of the state V sees).
    Q(s, a) is the mean of the ``m`` branch returns. All branches of an iteration run in
    one batched rollout (one policy forward per step for all of them).

    **Learned value at the horizon.** With ``value_function`` (a
    :class:`~rebel.control.estimators.ValueFunction` of the policy's preprocessed observations)
    the sampler bootstraps with it (as ``bootstrap`` would) and, after each iteration's
    branches, fits it to their returns-to-go: at branch step ``h``,
    ``G_h = r_h + gamma G_{h+1}``, ending in ``V`` of where a branch stopped, or 0 for one
    that terminated. The branches are on-policy (their first action too),
    so these are n-step TD targets of V^{pi_t}; a horizon of a few steps then sees as far
    as V does (a fall 100 steps ahead, say), at a fraction of the branch steps. Stats:
    ``value_loss`` and ``value_explained_variance`` (of the targets, by V before the fit),
    ``value_at_horizon`` (mean V added at the branches' ends).

    **Independent branches, common random numbers.** The ``m`` branches of an action get
    independent policy noise and independent env noise: after the restore each branch's env
    generator restarts from a seed drawn from the sampler's RNG for (state, ``j``), so the
    mean over ``m`` averages the env's randomness too, not only the policy's (restored
    alone, every branch of a state would replay the snapshot's env generator). Branch ``j``
    of every action of a state gets the same policy noise and the same env seed, so
    ``Q(s, a) - Q(s, a')`` is not blurred by independent continuation noise.
    ``common_random_numbers=False`` draws both per (state, action, ``j``) (for ablations).

    **Counting and statistics.** ``env_steps`` counts every step: walker steps plus
    branch steps. ``episode_return`` is the mean undiscounted return of the walker
    episodes that ended this iteration. Walker episodes span many iterations (about
    ``episode_length / ((state_stride + 1) / 2)``), so this curve lags the policy;
    ``q_mean`` follows the current policy.

    **Worker processes** (``workers > 0``): the walkers and the branches are each divided among
    that many processes (:class:`~rebel.control.envs.EnvPool`); snapshots travel from the
    walkers' workers to the branches' and are restored there, with the same results.

    **Observation statistics.** The policy's normalisation statistics take in the
    observations the walkers met in an iteration at the start of the next :meth:`collect`
    (:class:`~rebel.control.rollouts.PendingObservations`), and stay fixed until then.
    """

    def __init__(
        self,
        env: EnvSource,
        policy: MLPPolicy,
        num_states: int = 32,
        actions_per_state: int = 2,
        rollouts_per_action: int = 1,
        horizon: int = 100,
        gamma: float = 0.99,
        bootstrap: Bootstrap | None = None,
        value_function: ValueFunction | None = None,
        seed: int = 0,
        env_kwargs: dict[str, Any] | None = None,
        state_stride: int = 10,
        common_random_numbers: bool = True,
        spread_walkers: bool = False,
        workers: int = 0,
    ) -> None:
        check_counts(num_states=num_states, rollouts_per_action=rollouts_per_action, horizon=horizon, state_stride=state_stride)
        check_group_size("actions_per_state", actions_per_state)
        check_discount(gamma)
        if bootstrap is not None and not callable(bootstrap):
            raise ValueError(f"bootstrap must be None or a callable obs -> values, got {type(bootstrap).__name__}")
        check_value_function(value_function)
        if value_function is not None and bootstrap is not None:
            raise ValueError("give bootstrap or value_function, not both: both set the value added at the horizon")
        self.num_states, self.actions_per_state, self.rollouts_per_action = num_states, actions_per_state, rollouts_per_action
        self.horizon, self.gamma, self.bootstrap, self.value_function = horizon, gamma, bootstrap, value_function
        self.state_stride, self.common_random_numbers, self.spread_walkers = state_stride, common_random_numbers, spread_walkers
        self.policy = policy
        self.walkers = EnvPool(env, num_states, workers=workers, **(env_kwargs or {}))
        spec = self.walkers.spec
        self.episode_limit = spec.max_episode_steps if spec is not None else None
        if spread_walkers and not self.episode_limit:
            self.walkers.close()
            raise ValueError(f"spread_walkers needs an env with a time limit (spec.max_episode_steps); {self.walkers.name} has none")
        self.branches = EnvPool(env, num_states * actions_per_state * rollouts_per_action, workers=workers, **(env_kwargs or {}))
        self.pending = PendingObservations(self.walkers.observation_space)  # walker observations not yet in the statistics
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)  # reset seeds and strides
        self.generator = torch.Generator().manual_seed(seed)  # actions and branch noise
        self.fresh = np.ones(self.num_states, dtype=bool)  # walkers not started yet
        self.walker_return = np.zeros(self.num_states)  # undiscounted return of each walker's episode so far
        self.walker_age = np.zeros(self.num_states, dtype=np.int64)  # steps into each walker's episode
        self.cut = np.full(self.num_states, -1, dtype=np.int64)  # length at which a first episode is cut (-1: none)
        if self.spread_walkers:
            self.cut = self.rng.integers(1, self.episode_limit, size=self.num_states, endpoint=True)

    # ---------------------------------------------------------------- collect
    def collect(self, policy: Policy) -> RolloutBatch:
        assert isinstance(policy, MLPPolicy)
        # The statistics come from the walkers' observations: the branch observations are
        # on-policy too, but they repeat each state's neighbourhood n * m times; the walkers'
        # are the states the regression is made on.
        self.pending.apply(policy)
        n = self.actions_per_state
        walker_steps, branch_steps = self.walkers.steps, self.branches.steps
        walker_obs, finished = self._advance_walkers(policy)

        states = self.walkers.snapshots(range(self.num_states))
        inputs = policy.preprocess(self.walkers.obs).repeat_interleave(n, dim=0)  # [S * n, obs_dim]
        _, raw = policy.act(inputs, generator=self.generator)
        raw_actions = raw.reshape(self.num_states, n, *raw.shape[1:])
        noise, env_seeds = self._branch_noise(policy), self._env_seeds(self.num_states, n)
        branches, end_value, q_branches = self._branch(policy, states, raw_actions, noise, env_seeds)
        q = q_branches.mean(-1)  # [S, n]
        value_stats = {} if self.value_function is None else fit_value(self.value_function, branches, end_value, self.gamma, self.generator)
        self.pending.add(walker_obs)

        pairs = list(itertools.combinations(range(n), 2))
        stats = {
            "q_mean": float(q.mean()),
            "q_std": float(q.std()),
            "q_diff_abs": float(np.mean([np.abs(q[:, i] - q[:, k]).mean() for i, k in pairs])),
            **value_stats,
        }
        if finished:
            stats["episode_return"] = float(np.mean(finished))
            stats["episodes"] = float(len(finished))
        batch_size = self.num_states * n
        return RolloutBatch(
            group=torch.arange(self.num_states).repeat_interleave(n),
            reward=torch.as_tensor(q.reshape(-1), dtype=torch.float32),
            mask=torch.ones(batch_size, 1, dtype=torch.bool),
            data={"inputs": inputs[:, None], "raw_actions": raw[:, None]},
            counts={"env_steps": float(self.walkers.steps - walker_steps + self.branches.steps - branch_steps)},
            stats=stats,
        )

    def q_values(
        self,
        policy: MLPPolicy,
        states: list[Snapshot],
        raw_actions: Tensor,
        noise: Tensor | None = None,
        env_seeds: np.ndarray | None = None,
    ) -> np.ndarray:
        """Monte-Carlo reset estimates ``[S, n, m]``, one per branch, of Q(s, a).

        Args:
            states: ``S`` snapshots (from :meth:`EnvPool.snapshot`).
            raw_actions: ``[S, n, ...]`` raw actions (as :meth:`MLPPolicy.act` returns them)
                taken first in the branches of each state.
            noise: ``[S, n, m, horizon, *policy.noise_shape()]`` sampling noise of each
                branch's policy steps (step 0 is unused: the first action is given), or
                None to sample with the sampler's generator.
            env_seeds: ``[S, n, m]`` seeds each branch's env generator restarts from after
                the restore, or None to draw them from the sampler's RNG (shared by the
                actions of a state unless ``common_random_numbers=False``).
        """
        if env_seeds is None:
            env_seeds = self._env_seeds(len(states), raw_actions.shape[1])
        return self._branch(policy, states, raw_actions, noise, env_seeds)[2]

    def _branch(
        self, policy: MLPPolicy, states: list[Snapshot], raw_actions: Tensor, noise: Tensor | None, env_seeds: np.ndarray
    ) -> tuple[Rollout, np.ndarray, np.ndarray]:
        """The branch rollouts of :meth:`q_values`, the value added at each branch's end ``[B]``
        (0 where none was) and the estimates ``[S, n, m]``."""
        s, n, m, horizon = len(states), raw_actions.shape[1], self.rollouts_per_action, self.horizon
        b = s * n * m
        if raw_actions.shape[0] != s or b > len(self.branches):
            raise ValueError(
                f"raw_actions has shape {tuple(raw_actions.shape)}; expected [{s}, n, ...] with {s} * n * {m} <= {len(self.branches)}"
            )
        if np.shape(env_seeds) != (s, n, m):
            raise ValueError(f"env_seeds has shape {np.shape(env_seeds)}; expected ({s}, {n}, {m}): one seed per branch")
        seeds = np.reshape(env_seeds, -1)  # branch k = (state * n + action) * m + rollout
        self.branches.restore_many(range(b), [states[k // (n * m)] for k in range(b)], [int(seed) for seed in seeds])
        first = raw_actions.repeat_interleave(m, dim=1).reshape(b, *raw_actions.shape[2:])
        flat_noise = None if noise is None else noise.reshape(b, horizon, *noise.shape[4:])
        out = rollout(self.branches, policy, range(b), horizon, self.gamma, self.generator, first, flat_noise)
        end_value = np.zeros(b)  # V where a branch stopped without terminating, else 0
        if self.bootstrap is not None or self.value_function is not None:
            end_value = end_values(out, self.branches.obs[:b], functools.partial(self._values, policy))
        q = bootstrapped_return(out, end_value, self.gamma)
        return out, end_value, q.reshape(s, n, m)

    def _values(self, policy: MLPPolicy, obs: np.ndarray) -> np.ndarray:
        if self.value_function is not None:
            return self.value_function.predict(policy.preprocess(obs))
        assert self.bootstrap is not None
        return np.asarray(self.bootstrap(obs), dtype=np.float64)

    # ----------------------------------------------------------------- helpers
    def _advance_walkers(self, policy: MLPPolicy) -> tuple[np.ndarray, list[float]]:
        """Start fresh walkers, then step each a random ``1..state_stride`` steps with pi_t,
        resetting those whose episode ends. Returns the observations the walkers acted on
        and the returns of the episodes that ended."""
        pool = self.walkers
        for i in np.flatnonzero(self.fresh):
            self._reset_walker(int(i))
        self.fresh[:] = False
        remaining = self.rng.integers(1, self.state_stride, size=self.num_states, endpoint=True)
        seen: list[np.ndarray] = []
        finished: list[float] = []
        while (live := np.flatnonzero(remaining > 0)).size:
            obs = pool.obs[live]
            seen.append(obs.copy())
            action, _ = policy.act(policy.preprocess(obs), generator=self.generator)
            rewards, terminated, truncated = pool.step(live.tolist(), action.cpu().numpy())
            self.walker_return[live] += rewards
            self.walker_age[live] += 1
            remaining[live] -= 1
            ended = terminated | truncated
            for i in live[ended]:
                finished.append(float(self.walker_return[i]))
                self._reset_walker(int(i))
            for i in live[~ended & (self.walker_age[live] == self.cut[live])]:  # a first episode cut short: not counted
                self._reset_walker(int(i))
        return np.concatenate(seen), finished

    def _reset_walker(self, i: int) -> None:
        if self.walker_age[i] > 0:
            self.cut[i] = -1  # only a walker's first episode is cut
        self.walkers.reset([i], [int(self.rng.integers(2**31))])
        self.walker_return[i] = 0.0
        self.walker_age[i] = 0

    def _branch_noise(self, policy: MLPPolicy) -> Tensor:
        """``[S, n, m, H, *noise_shape]``: shared by the actions of a state (common random
        numbers) unless ``common_random_numbers=False``."""
        n = self.actions_per_state
        shape = (self.num_states, 1 if self.common_random_numbers else n, self.rollouts_per_action, self.horizon, *policy.noise_shape())
        draw = torch.rand if policy.categorical else torch.randn  # uniform for Gumbel-max, normal for Gaussians
        return draw(shape, generator=self.generator).expand(self.num_states, n, *shape[2:])

    def _env_seeds(self, s: int, n: int) -> np.ndarray:
        """``[s, n, m]`` seeds of the branches' env generators, from the sampler's RNG (so a
        resumed run draws the same): one per (state, branch ``j``), shared by the ``n``
        actions (common random numbers) unless ``common_random_numbers=False``."""
        shape = (s, 1 if self.common_random_numbers else n, self.rollouts_per_action)
        return np.broadcast_to(self.rng.integers(2**31, size=shape), (s, n, self.rollouts_per_action))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
            "walkers": self._walker_states(),
            "walker_return": self.walker_return.copy(),
            "walker_age": self.walker_age.copy(),
            "cut": self.cut.copy(),
            **self.pending.state_dict(),
            **value_function_state(self.value_function),
        }

    def _walker_states(self) -> list[Snapshot | None]:
        """Each walker's snapshot, None for one not started yet."""
        started = np.flatnonzero(~self.fresh).tolist()
        states: list[Snapshot | None] = [None] * self.num_states
        for i, walker in zip(started, self.walkers.snapshots(started)):
            states[i] = walker
        return states

    def close(self) -> None:
        """Close the env copies (and their worker processes)."""
        self.walkers.close()
        self.branches.close()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["walkers"]) != self.num_states:
            raise ValueError(f"the checkpoint holds {len(state['walkers'])} walkers but this sampler has num_states={self.num_states}")
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])
        self.fresh = np.array([walker is None for walker in state["walkers"]])
        started = np.flatnonzero(~self.fresh).tolist()
        self.walkers.restore_many(started, [state["walkers"][i] for i in started])
        self.walker_return = np.array(state["walker_return"])
        self.walker_age = np.array(state.get("walker_age", np.zeros(self.num_states, dtype=np.int64)))
        self.cut = np.array(state.get("cut", np.full(self.num_states, -1, dtype=np.int64)))
        self.pending.load_state_dict(state)
        load_value_function_state(self.value_function, state)
