"""The trajectory variant: groups of rollouts that start from one shared state."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rebel.batch import RolloutBatch
from rebel.config import check_counts, check_group_size
from rebel.control.envs import EnvPool, EnvSource
from rebel.control.estimators import ValueFunction
from rebel.control.policy import MLPPolicy
from rebel.control.rollouts import (
    PendingObservations,
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


class TrajectorySampler(Sampler):
    """Each iteration, ``num_groups`` groups of ``group_size`` rollouts of ``segment_length``
    steps; the rollouts of a group start from one exact environment state (a snapshot)
    and their rewards are their discounted returns.

    A group's start state walks along an on-policy episode: the next segment starts
    where the group's first rollout (its *leader*) stopped, and a new episode starts
    (reset with a fresh seed) when the leader's episode ends. ``episode_return`` in the
    metrics is the mean undiscounted return of the leaders' finished episodes.

    With ``value_function`` (a :class:`~rebel.control.estimators.ValueFunction` of the policy's
    preprocessed observations) a rollout that stopped after ``k`` steps without terminating
    (the segment's end, or the time limit) has ``gamma^k V(s_k)`` added to its reward, so
    that the comparison sees past the segment's end, and V is fit each iteration to the
    returns-to-go of every rollout step (ending in ``V(s_k)`` or 0), as in
    :class:`~rebel.control.mc.MonteCarloSampler`.

    The rollouts of a group restore the start's snapshot with its env random generator, so
    on a stochastic env they meet the same stream of env noise (common random numbers across
    the group); they differ by their own policy noise.

    The policy's observation statistics take in every rollout step of an iteration at the
    start of the next :meth:`collect` (:class:`~rebel.control.rollouts.PendingObservations`).

    ``workers > 0`` steps the copies in that many worker processes (:class:`~rebel.control.envs.EnvPool`),
    with the same results.
    """

    def __init__(
        self,
        env: EnvSource,
        policy: MLPPolicy,
        num_groups: int = 8,
        group_size: int = 2,
        segment_length: int = 200,
        gamma: float = 0.99,
        seed: int = 0,
        env_kwargs: dict[str, Any] | None = None,
        value_function: ValueFunction | None = None,
        workers: int = 0,
    ) -> None:
        check_group_size("group_size", group_size)
        check_counts(num_groups=num_groups, segment_length=segment_length)
        check_discount(gamma)
        check_value_function(value_function)
        self.value_function = value_function
        self.num_groups, self.group_size, self.segment_length, self.gamma = num_groups, group_size, segment_length, gamma
        self.pool = EnvPool(env, num_groups * group_size, workers=workers, **(env_kwargs or {}))
        self.policy = policy
        self.pending = PendingObservations(self.pool.observation_space)  # rollout observations not yet in the statistics
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self.seeds = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.starts: list[Any] = [None] * self.num_groups
        self.leader_return = np.zeros(self.num_groups)

    def collect(self, policy: Policy) -> RolloutBatch:
        assert isinstance(policy, MLPPolicy)
        self.pending.apply(policy)
        n, pool = self.group_size, self.pool
        new = [g for g in range(self.num_groups) if self.starts[g] is None]  # groups starting a new episode
        pool.reset([g * n for g in new], [int(self.seeds.integers(2**31)) for _ in new])
        for g, start in zip(new, pool.snapshots([g * n for g in new])):
            self.starts[g] = start
            self.leader_return[g] = 0.0
        pool.restore_many(range(len(pool)), [self.starts[member // n] for member in range(len(pool))])
        steps_before = pool.steps
        out = rollout(pool, policy, range(len(pool)), self.segment_length, self.gamma, self.generator)
        reward = torch.as_tensor(out.discounted_return, dtype=torch.float32)
        value_stats: dict[str, float] = {}
        if self.value_function is not None:
            value_function = self.value_function
            end_value = end_values(out, pool.obs, lambda obs: value_function.predict(policy.preprocess(obs)))
            reward = torch.as_tensor(bootstrapped_return(out, end_value, self.gamma), dtype=torch.float32)
            value_stats = fit_value(self.value_function, out, end_value, self.gamma, self.generator)
        finished = []
        going = []  # groups whose leader's episode goes on
        for g in range(self.num_groups):
            leader = g * n
            self.leader_return[g] += out.reward_sum[leader]
            if out.terminated[leader] or out.truncated[leader]:
                finished.append(self.leader_return[g])
                self.starts[g] = None
            else:
                going.append(g)
        for g, start in zip(going, pool.snapshots([g * n for g in going])):
            self.starts[g] = start
        self.pending.add(out.raw_observations)
        stats = {"segment_return": float(out.reward_sum.mean()), "segment_length": float(out.mask.sum(1).float().mean()), **value_stats}
        if finished:
            stats["episode_return"] = float(np.mean(finished))
            stats["episodes"] = float(len(finished))
        return RolloutBatch(
            group=torch.arange(self.num_groups).repeat_interleave(n),
            reward=reward,
            mask=out.mask,
            data={"inputs": out.inputs, "raw_actions": out.raw_actions},
            counts={"env_steps": float(pool.steps - steps_before)},
            stats=stats,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds.bit_generator.state,
            "generator": self.generator.get_state(),
            "starts": list(self.starts),
            "leader_return": self.leader_return.copy(),
            **self.pending.state_dict(),
            **value_function_state(self.value_function),
        }

    def close(self) -> None:
        """Close the env copies (and their worker processes)."""
        self.pool.close()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seeds.bit_generator.state = state["seeds"]
        self.generator.set_state(state["generator"])
        self.starts = list(state["starts"])
        self.leader_return = np.array(state["leader_return"])
        self.pending.load_state_dict(state)
        load_value_function_state(self.value_function, state)
