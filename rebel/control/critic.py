"""The critic variant: REBEL's regression on Q(s, a) - Q(s, a') from twin Q critics trained
off-policy on a replay buffer (SAC's critic, REBEL's actor update).

:class:`CriticSampler` is more than a sampler: it owns the critic and trains it (TD on the
replay buffer, step 2 below) inside ``collect``, before it builds the REBEL batch. The
trainer sees only that batch and fits the policy; the critic, its optimizer and the buffer
are the sampler's state (saved in checkpoints through ``state_dict``)."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from rebel.batch import RolloutBatch
from rebel.config import check_choice, check_counts, check_group_size, check_int, check_positive
from rebel.control.distributions import ActionDistribution
from rebel.control.envs import VEC_ENVS, EnvSource, make_env, remote_env
from rebel.control.estimators import ReplayBuffer, Transitions, TwinQCritic
from rebel.control.policy import MLPPolicy
from rebel.control.rollouts import PendingObservations, check_discount
from rebel.control.snapshots import restore, snapshot
from rebel.policy import Policy
from rebel.sampler import Sampler


class CriticSampler(Sampler):
    """Each iteration: act, fit the critic (its own TD learner), then compare actions at replay states.

    1. **Act.** Step ``num_envs`` copies of the env (a ``SyncVectorEnv``, or with
       ``vec_env="async"`` an ``AsyncVectorEnv`` with one worker process per copy, that resets an
       ended episode in the same step) for ``steps_per_iteration`` environment steps in
       all (rounded up to a multiple of ``num_envs``) with pi_t, or with uniformly random
       actions while fewer than ``learning_starts`` steps were taken (as SAC). Every
       transition goes to the replay buffer, with the true last observation of an ended
       episode as ``next_obs`` and ``terminated`` apart from time-limit truncation (a
       truncated transition still bootstraps).
    2. **Fit the critic.** Once the buffer holds ``max(learning_starts, critic_batch_size)``
       transitions, ``updates_per_step`` TD updates per step collected (fractions carry
       over) of :class:`~rebel.control.estimators.TwinQCritic` towards Q of the current policy:
       ``y = r + gamma (1 - terminated) (min Qtarg(s', a') - alpha log pi(a'|s'))``,
       ``a' ~ pi_t(.|s')``, minibatches of ``critic_batch_size``.
    3. **The REBEL batch.** ``num_states`` states drawn from the buffer, ``actions_per_state``
       actions ``a ~ pi_t(.|s)`` each (one group per state, ``T = 1``) and reward
       ``Q(s, a) = min(Q1, Q2)(s, a)`` of the online critics (:attr:`q_reduction`; SAC's
       actor uses the min too). Until the critic has had its first update the rewards
       are 0: the regression's target is then 0 and its gradient at pi_t exactly 0, so
       the policy does not follow an untrained critic. With ``alpha > 0`` (soft Q) the
       reward is ``Q(s, a) - alpha log pi_t(a|s)``: REBEL's step
       ``pi_{t+1} ~ pi_t^(1 - eta alpha) exp(eta Q)`` then has SAC's soft-optimal policy
       ``exp(Q / alpha)`` as its fixed point (keep ``eta * alpha <= 1``). The batch's
       ``entropy_weight`` is alpha, so that the trainer's reward normalisation divides by at
       least ``eta * alpha`` and keeps that fixed point (:class:`~rebel.RewardNormalizer`).

    ``log pi`` is, as in SAC, the density of the action as the critic takes it: a bounded
    ``Box`` action rescaled to ``[-1, 1]``, so ``log pi`` of the env action plus
    ``sum log((high - low) / 2)``; entropies and ``target_entropy`` are in those units.

    **Tuned alpha** (``tune_alpha=True``, SAC's ``ent_coef="auto"``): after each TD update
    one Adam step (at ``critic_lr``) of ``log alpha`` on SAC's temperature loss
    ``-log alpha * (log pi_t(a'|s') + target_entropy)`` over the minibatch's next actions:
    alpha grows while the entropy of pi_t is below ``target_entropy`` (default ``-dim(A)``,
    SAC's; ``0.5 log n`` for ``Discrete``) and shrinks above it, capped at ``max_alpha``
    (the agent passes ``1 / eta``). ``alpha`` is its starting value. Without an entropy
    term the step ``pi_t exp(eta Q)`` narrows the policy at every iteration, the two actions
    of a pair become nearly the same and their Q difference carries less and less signal.

    Observations are stored raw; the critic and the policy both see ``policy.preprocess``
    of them. Use ``MLPPolicy(..., normalize_observations=False)``: the critic's inputs
    must not drift. If the policy does normalise, its statistics take in the observations of
    the uniformly random warm-up only (the first ``learning_starts`` steps), each iteration's
    at the start of the next :meth:`collect`
    (:class:`~rebel.control.rollouts.PendingObservations`), and are frozen after.
    ``Box`` actions reach the critic rescaled to ``[-1, 1]`` (``tanh`` of the raw sample
    for a squashed policy); ``Discrete`` actions as indices into a Q head over actions;
    ``MultiDiscrete`` / ``MultiBinary`` actions as the one-hots of their dimensions side by side
    (``log pi`` the sum of the dimensions' log-probabilities, no rescaling).

    Stats: ``episode_return`` and ``episode_length`` (means over the episodes finished this
    iteration), ``critic_loss``, ``td_target_mean`` and ``critic_updates`` (when the critic
    was updated), ``q_mean`` (of Q itself) and ``q_diff_abs`` (mean gap between the rewards of
    a pair: ``|Q(s, a) - Q(s, a')|``, of the soft rewards when ``alpha > 0``) of the REBEL
    batch, ``entropy`` (``-log pi_t`` of the sampled actions, when ``alpha > 0``), ``buffer_size``;
    with ``tune_alpha`` also ``alpha`` and ``next_entropy`` (``-log pi_t(a'|s')`` of the TD
    updates' next actions, what alpha is tuned on).
    """

    #: Which estimate of Q the REBEL batch uses: ``"min"`` or ``"mean"`` of the two critics.
    q_reduction: str = "min"
    #: log pi of the critic's action minus log pi of the env action (a bounded Box: sum log((high - low) / 2)).
    log_action_scale: float = 0.0

    def __init__(
        self,
        env: EnvSource,
        policy: MLPPolicy,
        num_envs: int = 1,
        steps_per_iteration: int = 1000,
        learning_starts: int = 5000,
        buffer_size: int = 1_000_000,
        critic_batch_size: int = 256,
        updates_per_step: float = 1.0,
        critic_lr: float = 3e-4,
        critic_hidden_sizes: Sequence[int] = (256, 256),
        gamma: float = 0.99,
        tau: float = 0.005,
        alpha: float = 0.0,
        tune_alpha: bool = False,
        target_entropy: float | None = None,
        max_alpha: float = math.inf,
        num_states: int = 256,
        actions_per_state: int = 2,
        seed: int = 0,
        env_kwargs: dict[str, Any] | None = None,
        vec_env: str = "sync",
    ) -> None:
        check_choice("vec_env", vec_env, VEC_ENVS)
        check_counts(num_envs=num_envs, steps_per_iteration=steps_per_iteration, num_states=num_states)
        check_counts(buffer_size=buffer_size, critic_batch_size=critic_batch_size)
        check_int("learning_starts", learning_starts, minimum=0)
        check_group_size("actions_per_state", actions_per_state)
        if not (math.isfinite(updates_per_step) and updates_per_step >= 0):
            raise ValueError(f"updates_per_step must be a finite number >= 0, got {updates_per_step!r}")
        check_positive("critic_lr", critic_lr)
        check_discount(gamma)
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau!r}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not max_alpha > 0:
            raise ValueError(f"max_alpha must be > 0, got {max_alpha!r}")
        if tune_alpha and not alpha > 0:
            raise ValueError(f"tune_alpha needs a starting alpha > 0, got alpha={alpha!r}")
        if not critic_hidden_sizes or any(int(h) < 1 for h in critic_hidden_sizes):
            raise ValueError(f"critic_hidden_sizes must be a non-empty list of sizes >= 1, got {critic_hidden_sizes!r}")
        if not isinstance(policy, MLPPolicy):
            raise TypeError(f"policy must be a rebel.control.MLPPolicy, got {type(policy).__name__}")
        self.num_envs, self.steps_per_iteration, self.learning_starts = num_envs, steps_per_iteration, learning_starts
        self.critic_batch_size, self.updates_per_step = critic_batch_size, float(updates_per_step)
        self.gamma, self.alpha = gamma, min(alpha, max_alpha)
        self.tune_alpha, self.max_alpha = tune_alpha, max_alpha
        self.num_states, self.actions_per_state = num_states, actions_per_state

        same_step = gym.vector.AutoresetMode.SAME_STEP
        if vec_env == "async":
            remote = functools.partial(remote_env, env, env_kwargs or {})
            self.envs: gym.vector.VectorEnv = gym.vector.AsyncVectorEnv([remote] * num_envs, autoreset_mode=same_step)
        else:
            factory = functools.partial(make_env, env, **(env_kwargs or {}))
            self.envs = gym.vector.SyncVectorEnv([factory] * num_envs, autoreset_mode=same_step)
        obs_space, action_space = self.envs.single_observation_space, self.envs.single_action_space
        if obs_space != policy.observation_space or action_space != policy.action_space:
            raise ValueError(
                f"the policy was built for spaces {policy.observation_space} -> {policy.action_space}, "
                f"but the env has {obs_space} -> {action_space}"
            )
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.category_sizes = policy.category_sizes  # MultiDiscrete / MultiBinary: the critic takes one-hots
        self.pending = PendingObservations(obs_space)  # warm-up observations not yet in the statistics
        if not policy.categorical:
            low, high = action_space.low, action_space.high
            self.bounded = bool(np.all(np.isfinite(low)) and np.all(np.isfinite(high)))
            self.action_low = torch.as_tensor(low, dtype=torch.float32)
            self.action_high = torch.as_tensor(high, dtype=torch.float32)
            if self.bounded:
                self.log_action_scale = float(torch.log((self.action_high - self.action_low) / 2).sum())
        discrete_obs = isinstance(obs_space, gym.spaces.Discrete)
        self.buffer = ReplayBuffer(
            buffer_size,
            obs_shape=obs_space.shape,
            action_shape=() if self.discrete else (policy.act_dim,),
            obs_dtype=np.int64 if discrete_obs else np.float32,
            action_dtype=np.int64 if self.discrete else np.float32,
        )
        with torch.random.fork_rng(devices=[]):  # the critic's initialisation depends on `seed` only
            torch.manual_seed(seed)
            self.critic = TwinQCritic(
                policy.obs_dim,
                policy.act_dim,
                tuple(int(h) for h in critic_hidden_sizes),
                discrete=self.discrete,
                lr=critic_lr,
                tau=tau,
            )
        if target_entropy is None:  # SAC's -dim(A); half the uniform entropy for Discrete (summed over dimensions)
            if policy.categorical:
                target_entropy = 0.5 * sum(math.log(n) for n in self.category_sizes or (action_space.n,))
            else:
                target_entropy = -float(np.prod(action_space.shape))
        self.target_entropy = float(target_entropy)
        self.log_alpha = torch.tensor(math.log(self.alpha) if self.alpha > 0 else 0.0, requires_grad=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=critic_lr)
        self.total_steps = 0  # environment steps taken by this sampler
        self.critic_updates = 0  # TD updates done
        self.update_credit = 0.0  # fractional TD updates carried over
        self.seed(seed)

    # ----------------------------------------------------------------- public
    def seed(self, seed: int) -> None:
        """Reseed the action and replay generators and start new episodes (reset seeds
        ``seed, seed + 1, ...``); the buffer and the critic are kept."""
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.obs, _ = self.envs.reset(seed=seed)
        self.episode_return = np.zeros(self.num_envs)
        self.episode_length = np.zeros(self.num_envs, dtype=np.int64)

    def collect(self, policy: Policy) -> RolloutBatch:
        if not isinstance(policy, MLPPolicy):
            raise TypeError(f"CriticSampler needs a rebel.control.MLPPolicy, got {type(policy).__name__}")
        self.pending.apply(policy)
        device = policy.obs_mean.device
        self.critic.to(device)
        steps, finished = self._act(policy)
        stats: dict[str, float] = {"buffer_size": float(len(self.buffer))}
        stats.update(self._fit_critic(policy, steps))
        batch = self._rebel_batch(policy)
        if finished:
            returns, lengths = zip(*finished)
            stats.update(episode_return=float(np.mean(returns)), episode_length=float(np.mean(lengths)), episodes=float(len(finished)))
        batch.counts = {"env_steps": float(steps)}
        batch.stats = {**stats, **batch.stats}
        return batch

    # ------------------------------------------------------------------ steps
    def _act(self, policy: MLPPolicy) -> tuple[int, list[tuple[float, int]]]:
        """Step the envs for one iteration; returns the steps taken and the (return, length)
        of the episodes that ended."""
        finished: list[tuple[float, int]] = []
        steps = 0
        for _ in range(-(-self.steps_per_iteration // self.num_envs)):
            if self.total_steps < self.learning_starts:
                self.pending.add(self.obs)
                env_actions = self._random_actions()
            else:
                env_actions, _ = policy.act(policy.preprocess(self.obs), generator=self.generator)
            env_actions = env_actions.cpu()
            next_obs, rewards, terminated, truncated, infos = self.envs.step(env_actions.numpy())
            ended = np.flatnonzero(terminated | truncated)
            true_next = next_obs.copy()
            for i in ended:
                true_next[i] = infos["final_obs"][i]
            self.buffer.add(Transitions(self.obs, self._critic_actions(env_actions).numpy(), rewards, true_next, terminated))
            self.episode_return += rewards
            self.episode_length += 1
            finished.extend(zip(self.episode_return[ended].tolist(), self.episode_length[ended].tolist()))
            self.episode_return[ended] = 0.0
            self.episode_length[ended] = 0
            self.obs = next_obs
            self.total_steps += self.num_envs
            steps += self.num_envs
        return steps, finished

    def _random_actions(self) -> Tensor:
        """Uniform actions from the sampler's own generator (``action_space.sample`` has an RNG
        that snapshots do not capture); an unbounded Box draws a standard normal."""
        if self.discrete:
            return torch.as_tensor(self.rng.integers(self.envs.single_action_space.n, size=self.num_envs))
        if self.category_sizes is not None:
            return torch.as_tensor(self.rng.integers(self.category_sizes, size=(self.num_envs, len(self.category_sizes))))
        shape = (self.num_envs, *self.action_low.shape)
        if self.bounded:
            return torch.as_tensor(self.rng.uniform(self.action_low.numpy(), self.action_high.numpy(), size=shape), dtype=torch.float32)
        return torch.as_tensor(self.rng.standard_normal(shape), dtype=torch.float32)

    def _log_prob(self, dist: ActionDistribution, env_actions: Tensor, raw: Tensor) -> Tensor:
        """log pi of the actions as the critic takes them (SAC's units): the env actions' plus
        the log of the rescaling's Jacobian."""
        return dist.log_prob(env_actions, raw) + self.log_action_scale

    def _critic_actions(self, env_actions: Tensor) -> Tensor:
        """Actions as the critic takes them: indices (Discrete), one-hots of every dimension
        side by side (MultiDiscrete, MultiBinary), or a bounded Box rescaled to [-1, 1]."""
        if self.category_sizes is not None:
            columns = env_actions.long().unbind(-1)
            return torch.cat([torch.nn.functional.one_hot(a, n) for a, n in zip(columns, self.category_sizes)], dim=-1).float()
        if self.discrete or not self.bounded:
            return env_actions
        low, high = self.action_low.to(env_actions.device), self.action_high.to(env_actions.device)
        return 2 * (env_actions - low) / (high - low) - 1

    # ----------------------------------------------------------------- critic
    def _fit_critic(self, policy: MLPPolicy, steps: int) -> dict[str, float]:
        if len(self.buffer) < max(self.learning_starts, self.critic_batch_size):
            return {}
        self.update_credit += self.updates_per_step * steps
        n = int(self.update_credit)
        self.update_credit -= n
        if n == 0:
            return {}

        last_logp = torch.zeros(())  # log pi_t(a'|s') of the latest TD target, what alpha is tuned on

        def next_actions(next_inputs: Tensor) -> tuple[Tensor, Tensor]:
            nonlocal last_logp
            dist = policy.distribution(next_inputs)  # one forward pass: policy.act's sample, and its density
            env_actions, raw = dist.sample(self.generator)
            logp = self._log_prob(dist, env_actions, raw) if self.alpha else torch.zeros(len(raw), device=raw.device)
            last_logp = logp
            return self._critic_actions(env_actions), logp

        results, entropies = [], []
        for _ in range(n):
            batch = self._tensors(policy, self.buffer.sample(self.critic_batch_size, self.rng))
            results.append(self.critic.td_update(batch, next_actions, self.gamma, self.alpha))
            if self.tune_alpha:
                entropies.append(self._alpha_step(last_logp))
        self.critic_updates += n
        stats = {
            "critic_loss": float(np.mean([r["critic_loss"] for r in results])),
            "td_target_mean": float(np.mean([r["target_mean"] for r in results])),
            "critic_updates": float(n),
        }
        if self.tune_alpha:
            stats.update(alpha=self.alpha, next_entropy=float(np.mean(entropies)))
        return stats

    def _alpha_step(self, logp: Tensor) -> float:
        """One Adam step of log alpha on SAC's loss ``-log alpha (log pi + target_entropy)``:
        alpha grows while the policy's entropy is below the target and shrinks above it."""
        entropy = -logp.float().mean().item()
        with torch.enable_grad():
            loss = -self.log_alpha * (self.target_entropy - entropy)
            self.alpha_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.alpha_optimizer.step()
        with torch.no_grad():
            self.log_alpha.clamp_(max=math.log(self.max_alpha))
        self.alpha = math.exp(self.log_alpha.item())
        return entropy

    def _tensors(self, policy: MLPPolicy, t: Transitions) -> Transitions:
        device = policy.obs_mean.device
        actions = torch.as_tensor(t.actions, device=device)
        return Transitions(
            obs=policy.preprocess(t.obs),
            actions=actions,
            rewards=torch.as_tensor(t.rewards, device=device),
            next_obs=policy.preprocess(t.next_obs),
            terminated=torch.as_tensor(t.terminated, device=device),
        )

    # ------------------------------------------------------------ REBEL batch
    def _rebel_batch(self, policy: MLPPolicy) -> RolloutBatch:
        k = self.actions_per_state
        states = self.buffer.sample(self.num_states, self.rng).obs
        inputs = policy.preprocess(states).repeat_interleave(k, dim=0)
        env_actions, raw = policy.act(inputs, generator=self.generator)
        if self.critic_updates:
            q = self.critic.value(inputs, self._critic_actions(env_actions), self.q_reduction).float()
        else:  # an untrained critic: no signal, and the policy stays where it is
            q = torch.zeros(len(inputs), device=inputs.device)
        stats = {"q_mean": q.mean().item()}
        if self.alpha and self.critic_updates:  # the soft Q's own policy improvement: reward Q - alpha log pi_t
            logp = self._log_prob(policy.distribution(inputs), env_actions, raw).float()
            q = q - self.alpha * logp
            stats["entropy"] = -logp.mean().item()
        per_state = q.view(self.num_states, k)
        pair_gaps = (per_state[:, :, None] - per_state[:, None, :]).abs().sum() / (self.num_states * k * (k - 1))
        return RolloutBatch(
            group=torch.arange(self.num_states, device=inputs.device).repeat_interleave(k),
            reward=q,
            mask=torch.ones(len(q), 1, dtype=torch.bool, device=inputs.device),
            data={"inputs": inputs[:, None], "raw_actions": raw[:, None]},
            stats={**stats, "q_diff_abs": pair_gaps.item()},
            entropy_weight=self.alpha if self.critic_updates else 0.0,
        )

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "generator": self.generator.get_state(),
            "envs": self._env_states(),
            "obs": self.obs.copy(),
            "episode_return": self.episode_return.copy(),
            "episode_length": self.episode_length.copy(),
            "total_steps": self.total_steps,
            "critic_updates": self.critic_updates,
            "update_credit": self.update_credit,
            "log_alpha": self.log_alpha.detach().clone(),
            "alpha_optimizer": copy.deepcopy(self.alpha_optimizer.state_dict()),
            "critic": self.critic.checkpoint_state(),
            "buffer": self.buffer.state_dict(),
            **self.pending.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.generator.set_state(state["generator"])
        self._restore_envs(state["envs"])
        self.obs = np.array(state["obs"])
        self.episode_return = np.array(state["episode_return"])
        self.episode_length = np.array(state["episode_length"])
        self.total_steps = int(state["total_steps"])
        self.critic_updates = int(state["critic_updates"])
        self.update_credit = float(state["update_credit"])
        if "log_alpha" in state:  # checkpoints from before alpha tuning keep the constructor's alpha
            with torch.no_grad():
                self.log_alpha.copy_(state["log_alpha"])
            self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
            if self.tune_alpha:
                self.alpha = math.exp(self.log_alpha.item())  # as _alpha_step sets it
        self.critic.load_checkpoint_state(state["critic"])
        self.buffer.load_state_dict(state["buffer"])
        self.pending.load_state_dict(state)

    def _env_states(self) -> dict[str, Any]:
        """The envs' exact states: :func:`snapshot` of the ``SyncVectorEnv``, or each worker's
        snapshot of its env (an ``AsyncVectorEnv``)."""
        if isinstance(self.envs, gym.vector.AsyncVectorEnv):
            return {"kind": "async_vector", "envs": list(self.envs.call("take_snapshot"))}
        return snapshot(self.envs)

    def _restore_envs(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_env_states` saved, in either kind of vector env (a run may resume
        with the other ``vec_env``; the sub-envs' states are the same)."""
        if len(state["envs"]) != self.num_envs:
            raise ValueError(f"the checkpoint holds {len(state['envs'])} envs but this sampler has num_envs={self.num_envs}")
        if isinstance(self.envs, gym.vector.AsyncVectorEnv):
            self.envs.set_attr("incoming", list(state["envs"]))
            self.envs.call("put_snapshot")
        elif state["kind"] == "async_vector":
            for env, env_state in zip(self.envs.envs, state["envs"]):
                restore(env, env_state)
        else:
            restore(self.envs, state)

    def close(self) -> None:
        self.envs.close()
