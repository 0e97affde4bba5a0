"""The Monte-Carlo reset variant: exact Q estimates, independent env noise across branches and
common random numbers across actions, bootstrap, step accounting, learning through the trainer,
exact resume (observation statistics fixed within an iteration: test_observation_statistics.py)."""

import copy
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from rebel import Trainer, TrainerConfig
from rebel.control.estimators import ValueFunction
from rebel.control.evaluation import evaluate
from rebel.control.mc import MonteCarloSampler
from rebel.control.policy import MLPPolicy
from rebel.control.snapshots import reseed, restore
from rebel.runs import read_metrics

FAST = {"progress": False, "report_to": "none", "plot": False}


def make(env_id="Pendulum-v1", policy_class=MLPPolicy, **kwargs):
    torch.manual_seed(0)
    probe = gym.make(env_id)
    policy = policy_class(probe.observation_space, probe.action_space, log_std_init=0.0)
    options = {"num_states": 3, "actions_per_state": 2, "rollouts_per_action": 2, "horizon": 30, "seed": 1, **kwargs}
    return policy, MonteCarloSampler(env_id, policy, **options)


def record_q_values(sampler):
    """Wrap the sampler's branching (what ``collect`` and ``q_values`` call) to keep its inputs
    (and the policy as it was) and its Q estimates."""
    calls = []
    branch = sampler._branch

    def recorded(policy, states, raw_actions, noise, env_seeds):
        result = branch(policy, states, raw_actions, noise, env_seeds)
        calls.append(
            {
                "policy": copy.deepcopy(policy),
                "states": states,
                "raw_actions": raw_actions,
                "noise": noise,
                "env_seeds": env_seeds,
                "rollout": result[0],
                "q": result[2],
            }
        )
        return result

    sampler._branch = recorded
    return calls


def replay(env_id, policy, state, first_raw_action, noise, env_seed, horizon, gamma):
    """One branch by hand, in a fresh env: restore, reseed, take the action, follow pi_t with the given noise."""
    env = gym.make(env_id)
    env.reset(seed=123)  # whatever this reset did is overwritten by the snapshot
    env_state, obs = state
    restore(env, env_state)
    reseed(env, env_seed)
    ret, raw = 0.0, first_raw_action
    for h in range(horizon):
        if h > 0:
            _, raw = policy.act(policy.preprocess(obs[None]), noise=noise[h][None])
            raw = raw[0]
        obs, reward, terminated, truncated, _ = env.step(policy.env_action(raw).numpy())
        ret += gamma**h * reward
        if terminated or truncated:
            break
    return ret


@pytest.mark.parametrize(("env_id", "rel"), [("Pendulum-v1", 1e-6), ("CartPole-v1", 0.0)])
def test_q_estimates_equal_branches_replayed_by_hand(env_id, rel):
    """Exact up to float rounding: one-row forwards here, batched ones in the sampler (a
    continuous action may differ in its last bits, a discrete one does not)."""
    policy, sampler = make(env_id, gamma=0.97)
    calls = record_q_values(sampler)
    sampler.collect(policy)
    batch = sampler.collect(policy)
    call = calls[-1]
    s, n, m = 3, 2, 2
    assert call["q"].shape == (s, n, m)
    assert batch.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.mask.shape == (s * n, 1) and bool(batch.mask.all())
    assert torch.equal(batch.reward, torch.as_tensor(call["q"].mean(-1).reshape(-1), dtype=torch.float32))
    # the inputs are those the policy acted on at the snapshotted states (statistics of then)
    states_obs = np.stack([obs for _, obs in call["states"]])
    assert torch.equal(batch.data["inputs"][:, 0], call["policy"].preprocess(states_obs).repeat_interleave(n, 0))
    assert torch.equal(batch.data["raw_actions"][:, 0], call["raw_actions"].reshape(s * n, *call["raw_actions"].shape[2:]))
    for i in range(s):
        for a in range(n):
            for j in range(m):
                args = call["states"][i], call["raw_actions"][i, a], call["noise"][i, a, j], int(call["env_seeds"][i, a, j])
                expected = replay(env_id, call["policy"], *args, 30, 0.97)
                assert call["q"][i, a, j] == pytest.approx(expected, rel=rel, abs=0.0)


class SameActionPolicy(MLPPolicy):
    """Every action drawn without explicit noise is the mode: all the actions of a state are
    equal, while branch continuations (which get noise) stay random."""

    def act(self, inputs, deterministic=False, generator=None, noise=None):
        return super().act(inputs, deterministic=deterministic or noise is None, generator=generator, noise=noise)


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_common_random_numbers_make_equal_actions_score_equal(env_id):
    policy, sampler = make(env_id, SameActionPolicy, horizon=20)
    calls = record_q_values(sampler)
    batch = sampler.collect(policy)
    q = calls[-1]["q"]
    assert np.array_equal(q[:, 0], q[:, 1])  # branch j of each action: the same noise, the same env RNG
    assert batch.stats["q_diff_abs"] == 0.0
    assert not np.array_equal(q[:, :, 0], q[:, :, 1])  # ... while the continuations are random

    policy, sampler = make(env_id, SameActionPolicy, horizon=20, common_random_numbers=False)
    assert sampler.collect(policy).stats["q_diff_abs"] > 0  # the check above fails without common random numbers


def test_the_branches_of_one_action_see_independent_env_noise():
    """Slippery FrozenLake, horizon 1: a move goes the intended way or to either side, 1/3 each.
    The m = 16 branches of an action reach more than one cell, with the env's frequencies
    (restored alone, all 16 would replay the snapshot's generator and land in one cell)."""
    policy, sampler = make("FrozenLake-v1", num_states=8, rollouts_per_action=16, horizon=1, env_kwargs={"is_slippery": True})
    calls = record_q_values(sampler)
    lake = gym.make("FrozenLake-v1", is_slippery=True).unwrapped
    sides = np.zeros(3)  # how often each of the three moves happened, where all three are told apart
    for _ in range(4):
        sampler.collect(policy)
        call = calls[-1]
        reached = sampler.branches.obs[: 8 * 2 * 16].reshape(8, 2, 16)
        for i, (_, start) in enumerate(call["states"]):
            for a in range(2):
                assert len(set(reached[i, a].tolist())) > 1
                cells = [cell for _, cell, _, _ in lake.P[int(start)][int(call["raw_actions"][i, a])]]
                if len(set(cells)) == 3:
                    sides += [np.sum(reached[i, a] == cell) for cell in cells]
    assert sides.sum() >= 400
    np.testing.assert_allclose(sides / sides.sum(), 1 / 3, atol=0.05)


class NoiseEnv(gym.Env):
    """Each step's observation and reward are the env's own uniform noise, whatever the action."""

    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float64)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.random(1), {}

    def step(self, action):
        noise = self.np_random.random(1)
        return noise, float(noise[0]), False, False, {}


@pytest.mark.parametrize("common", [True, False])
def test_the_actions_of_one_branch_index_see_the_same_env_noise(common):
    """The env noise of branch j is the stream of its seed: shared by the actions of a state
    (common random numbers), its own for every (state, j) (and action, without them)."""
    torch.manual_seed(0)
    policy = MLPPolicy(NoiseEnv.observation_space, NoiseEnv.action_space)
    options = {"num_states": 4, "actions_per_state": 3, "rollouts_per_action": 4, "horizon": 3, "gamma": 0.9}
    sampler = MonteCarloSampler(NoiseEnv, policy, common_random_numbers=common, **options)
    calls = record_q_values(sampler)
    sampler.collect(policy)
    q, seeds = calls[-1]["q"], calls[-1]["env_seeds"]
    for index in np.ndindex(q.shape):
        noise = np.random.default_rng(int(seeds[index])).random(3)
        assert q[index] == pytest.approx(noise @ 0.9 ** np.arange(3), rel=1e-12)
    assert (np.array_equal(q[:, 0], q[:, 1]) and np.array_equal(q[:, 0], q[:, 2])) == common
    assert len(np.unique(q)) == (4 * 4 if common else 4 * 3 * 4)


def test_q_values_refuses_env_seeds_of_the_wrong_shape():
    policy, sampler = make("CartPole-v1")
    calls = record_q_values(sampler)
    sampler.collect(policy)
    call = calls[-1]
    with pytest.raises(ValueError, match=r"env_seeds has shape \(3, 2\); expected \(3, 2, 2\): one seed per branch"):
        sampler.q_values(policy, call["states"], call["raw_actions"], call["noise"], call["env_seeds"][..., 0])


def test_every_environment_step_is_counted():
    policy, sampler = make("CartPole-v1", num_states=4, horizon=40, state_stride=5)
    calls = {"walkers": 0, "branches": 0}
    for name in calls:
        for env in getattr(sampler, name).envs:

            def counted(action, step=env.step, name=name):
                calls[name] += 1
                return step(action)

            env.step = counted
    total = 0.0
    for _ in range(5):
        batch = sampler.collect(policy)
        total += batch.counts["env_steps"]
    assert total == calls["walkers"] + calls["branches"]
    assert 5 * 4 <= calls["walkers"] <= 5 * 4 * 5  # each walker moves 1..state_stride steps an iteration
    assert calls["branches"] > 0


def test_bootstrap_is_added_to_unfinished_branches_only():
    seen = []

    def value(obs):
        seen.append(obs)
        return 100.0 + obs[:, 0].astype(np.float64)

    policy, sampler = make("CartPole-v1", num_states=8, rollouts_per_action=1, horizon=15, gamma=0.9)
    calls = record_q_values(sampler)
    sampler.collect(policy)
    call = calls[-1]
    with_value = sampler.q_values(policy, call["states"], call["raw_actions"], call["noise"], call["env_seeds"])
    sampler.bootstrap = value
    assert seen == []
    bootstrapped = sampler.q_values(policy, call["states"], call["raw_actions"], call["noise"], call["env_seeds"]).reshape(-1)
    plain = with_value.reshape(-1)
    added = np.flatnonzero(bootstrapped != plain)
    assert len(seen) == 1 and 0 < len(added) < len(plain)  # some branches fell within the horizon, some did not
    obs = seen[0]
    assert obs.shape == (len(added), 4)
    np.testing.assert_allclose(bootstrapped[added] - plain[added], 0.9**15 * (100.0 + obs[:, 0].astype(np.float64)), rtol=1e-12)
    assert np.array_equal(obs, sampler.branches.obs[added])  # the branches' last observations


def test_branches_cut_by_the_time_limit_are_bootstrapped_at_the_step_they_stopped():
    seen = []

    def value(obs):
        seen.append(obs)
        return 50.0 + obs[:, 2].astype(np.float64)

    # Pendulum never terminates; with a 10-step limit every branch of a 30-step horizon is truncated.
    policy, sampler = make("Pendulum-v1", horizon=30, gamma=0.9, env_kwargs={"max_episode_steps": 10})
    calls = record_q_values(sampler)
    sampler.collect(policy)
    call = calls[-1]
    out = call["rollout"]
    assert out.truncated.all() and not out.terminated.any()
    steps = out.mask.sum(1).numpy()
    assert (steps <= 10).all() and len(set(steps.tolist())) > 1  # cut at different steps (walkers at different times)
    plain = sampler.q_values(policy, call["states"], call["raw_actions"], call["noise"], call["env_seeds"]).reshape(-1)
    sampler.bootstrap = value
    bootstrapped = sampler.q_values(policy, call["states"], call["raw_actions"], call["noise"], call["env_seeds"]).reshape(-1)
    assert len(seen) == 1 and np.array_equal(seen[0], sampler.branches.obs[: len(steps)])  # where each branch stopped
    expected = plain + 0.9**steps * (50.0 + seen[0][:, 2].astype(np.float64))
    np.testing.assert_allclose(bootstrapped, expected, rtol=1e-12)


def test_value_function_bootstraps_running_branches_and_is_fit_to_their_returns_to_go():
    torch.manual_seed(3)
    value = ValueFunction(4, (16,), lr=1e-3, epochs=1)
    policy, sampler = make("CartPole-v1", num_states=8, rollouts_per_action=1, horizon=15, gamma=0.9, value_function=value)
    calls = record_q_values(sampler)
    fits = []
    fit = value.fit

    def recorded_fit(inputs, targets, generator=None):
        fits.append((inputs.clone(), targets.clone(), copy.deepcopy(value)))
        return fit(inputs, targets, generator)

    value.fit = recorded_fit
    batch = sampler.collect(policy)
    call = calls[-1]
    inputs, targets, value_before = fits[-1]
    q_branches = call["q"].reshape(-1)  # m = 1: one branch per (state, action)
    assert np.allclose(batch.reward.numpy(), q_branches, atol=1e-5)

    # Without the value function the estimates lose exactly gamma^H V(s_H) on the branches
    # that ran the whole horizon (their last observations are still in the branch envs).
    sampler.value_function = None
    before = call["policy"]  # as it was during collect
    plain = sampler.q_values(before, call["states"], call["raw_actions"], call["noise"], call["env_seeds"]).reshape(-1)
    running = np.flatnonzero(~np.isclose(q_branches, plain, rtol=0, atol=1e-9))
    assert 0 < len(running) < len(plain)  # some branches fell within the horizon, some did not
    with torch.no_grad():
        v_end = value_before(before.preprocess(sampler.branches.obs[running])).double().numpy()
    np.testing.assert_allclose(q_branches[running] - plain[running], 0.9**15 * v_end, rtol=1e-5)

    # The targets are returns-to-go of every branch step: G_h = r_h + gamma G_{h+1}, from
    # V(s_H) (running branches) or 0; at a branch's first step, the branch's own estimate.
    out = call["rollout"]
    to_go = np.zeros(len(q_branches))
    to_go[running] = v_end
    expected = np.zeros(out.rewards.shape)
    for h in reversed(range(out.rewards.shape[1])):
        to_go = np.where(out.mask[:, h].numpy(), out.rewards[:, h] + 0.9 * to_go, to_go)
        expected[:, h] = to_go
    mask = out.mask.numpy()
    np.testing.assert_allclose(targets.numpy(), expected[mask], rtol=1e-5)
    np.testing.assert_allclose(expected[:, 0], q_branches, rtol=1e-5)
    assert torch.equal(inputs, out.inputs[out.mask])
    assert batch.stats["value_loss"] > 0 and "value_explained_variance" in batch.stats and "value_at_horizon" in batch.stats


def test_walkers_follow_on_policy_episodes_and_report_their_returns():
    policy, sampler = make("CartPole-v1", num_states=4, horizon=5, state_stride=8)
    first = sampler.collect(policy).data["inputs"]
    episodes = []
    for _ in range(20):
        batch = sampler.collect(policy)
        assert not torch.equal(batch.data["inputs"], first)
        if "episode_return" in batch.stats:
            episodes.append(batch.stats["episode_return"])
    assert episodes and all(r >= 1 for r in episodes)  # CartPole: one point per step


def test_spread_walkers_cut_only_each_walkers_first_episode_at_a_random_length():
    policy, sampler = make(
        "Pendulum-v1", num_states=6, horizon=3, state_stride=3, spread_walkers=True, env_kwargs={"max_episode_steps": 30}
    )
    first_cut = sampler.cut.copy()
    assert ((first_cut >= 1) & (first_cut <= 30)).all() and len(set(first_cut.tolist())) > 1
    resets = []  # (walker, age at the reset) of every reset after the start
    reset = sampler._reset_walker

    def recorded(i):
        if not sampler.fresh[i]:
            resets.append((i, int(sampler.walker_age[i])))
        reset(i)

    sampler._reset_walker = recorded
    finished = 0
    for _ in range(40):
        stats = sampler.collect(policy).stats
        finished += int(stats.get("episodes", 0))
    for i in range(6):
        ages = [age for walker, age in resets if walker == i]
        assert ages[0] == first_cut[i] and ages[1:] and set(ages[1:]) == {30}  # cut once, then whole episodes
    assert finished == sum(1 for _, age in resets if age == 30)  # cut episodes are not reported as finished
    assert (sampler.cut == -1).all()


def test_spread_walkers_needs_a_time_limit():
    from gymnasium.envs.classic_control import PendulumEnv

    policy, _ = make("Pendulum-v1")
    with pytest.raises(ValueError, match="spread_walkers needs an env with a time limit .* PendulumEnv has none"):
        MonteCarloSampler(PendulumEnv, policy, spread_walkers=True)


def test_learns_cartpole_through_the_trainer(tmp_path):
    torch.manual_seed(0)
    probe = gym.make("CartPole-v1")
    policy = MLPPolicy(probe.observation_space, probe.action_space)
    sampler = MonteCarloSampler("CartPole-v1", policy, num_states=16, horizon=50)
    before = evaluate(policy, "CartPole-v1", 10)["eval_return"]
    config = TrainerConfig(
        output_dir=str(tmp_path / "run"),
        iterations=30,
        eta=0.5,
        learning_rate=3e-4,
        epochs=10,
        minibatch_size=16,
        reward_normalization="batch",
        max_grad_norm=0.5,
        **FAST,
    )
    rows = Trainer(policy, sampler, config).train()
    after = evaluate(policy, "CartPole-v1", 10)["eval_return"]
    assert before < 50 and after > before + 100, (before, after)
    assert all(r["start_log_ratio_max"] == 0.0 for r in rows)
    assert {"q_mean", "q_std", "q_diff_abs", "env_steps"} <= set(rows[-1])
    assert rows[-1]["env_steps"] > 20_000


def mc_trainer(tmp_path, name, callbacks=(), env_id="CartPole-v1", **options):
    torch.manual_seed(0)
    probe = gym.make(env_id)
    policy = MLPPolicy(probe.observation_space, probe.action_space)
    sampler = MonteCarloSampler(env_id, policy, num_states=4, rollouts_per_action=2, horizon=20, **options)
    config = TrainerConfig(output_dir=str(tmp_path / name), iterations=6, epochs=2, minibatch_size=4, checkpoint_every=100, **FAST)
    return Trainer(policy, sampler, config, callbacks=callbacks)


def strip_times(rows):
    return [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k} for r in rows]


# Pendulum never terminates: with a 60-step limit, first episodes are still being cut after the resume.
# FrozenLake is slippery: the branches' env seeds shape the Q estimates.
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"env_id": "Pendulum-v1", "spread_walkers": True, "env_kwargs": {"max_episode_steps": 60}},
        {"env_id": "FrozenLake-v1", "env_kwargs": {"is_slippery": True}},
    ],
)
def test_resume_is_bit_identical(tmp_path, options):
    straight = mc_trainer(tmp_path, "straight", **options)
    rows_straight = straight.train()

    def stop_at_3(trainer, metrics):
        if trainer.iteration == 3:
            trainer.request_stop()

    assert len(mc_trainer(tmp_path, "split", [stop_at_3], **options).train()) == 3
    second = mc_trainer(tmp_path, "split", **options)
    second.train(resume=True)
    for (key, a), b in zip(second.policy.state_dict().items(), straight.policy.state_dict().values()):
        assert torch.equal(a, b), key  # parameters and observation statistics
    assert json.dumps(strip_times(read_metrics(tmp_path / "split"))) == json.dumps(strip_times(rows_straight))  # NaN-safe


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_states": 0}, "num_states must be"),
        ({"actions_per_state": 1}, "actions_per_state must be"),
        ({"rollouts_per_action": 0}, "rollouts_per_action must be"),
        ({"horizon": 0}, "horizon must be"),
        ({"horizon": 2.5}, "horizon must be"),
        ({"state_stride": 0}, "state_stride must be"),
        ({"gamma": 1.5}, "gamma must be in"),
        ({"bootstrap": 3.0}, "bootstrap must be"),
        ({"value_function": lambda obs: obs}, "value_function must be None or a rebel.control.estimators.ValueFunction"),
        ({"value_function": ValueFunction(3), "bootstrap": lambda obs: obs[:, 0]}, "give bootstrap or value_function, not both"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)
