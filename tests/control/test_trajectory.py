"""The trajectory variant's sampler: shared starts, exact returns, every step counted."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from rebel.control.estimators import ValueFunction
from rebel.control.policy import MLPPolicy
from rebel.control.snapshots import restore
from rebel.control.trajectory import TrajectorySampler


def make(env_id="Hopper-v5", **kwargs):
    torch.manual_seed(0)
    probe = gym.make(env_id)
    policy = MLPPolicy(probe.observation_space, probe.action_space, log_std_init=0.5)
    return policy, TrajectorySampler(env_id, policy, **{"num_groups": 3, "group_size": 3, "segment_length": 40, "seed": 1, **kwargs})


def test_a_group_starts_from_one_state_and_rewards_are_exact_discounted_returns():
    policy, sampler = make(gamma=0.97, segment_length=8)
    sampler.collect(policy)
    starts = list(sampler.starts)  # where each group's leader stopped: the next segment's start
    batch = sampler.collect(policy)
    assert batch.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first = batch.data["inputs"][:, 0]
    for g in range(3):
        assert torch.equal(first[3 * g], first[3 * g + 1]) and torch.equal(first[3 * g], first[3 * g + 2])
    assert not torch.equal(first[0], first[3])  # groups follow different episodes
    assert not torch.equal(batch.data["raw_actions"][0, 0], batch.data["raw_actions"][1, 0])  # members act independently
    g, member = next((g, 3 * g + 1) for g in range(3) if starts[g] is not None)
    env_state, _ = starts[g]
    env = gym.make("Hopper-v5")
    env.reset(seed=0)
    restore(env, env_state)  # replay the member's actions from the group's start in a fresh env
    ret = 0.0
    for h in range(int(batch.mask[member].sum())):
        _, reward, *_ = env.step(policy.env_action(batch.data["raw_actions"][member, h]).numpy())
        ret += 0.97**h * reward
    assert np.float32(ret) == batch.reward[member].item()


def test_value_function_adds_its_value_at_the_segment_end_and_fits_returns_to_go():
    torch.manual_seed(2)
    value = ValueFunction(11, (16,), epochs=1)
    policy, sampler = make(gamma=0.9, segment_length=30, value_function=value)
    plain_policy, plain = make(gamma=0.9, segment_length=30)
    fits = []
    fit = value.fit

    def recorded_fit(inputs, targets, generator=None):
        fits.append((inputs.clone(), targets.clone(), {k: v.clone() for k, v in value.state_dict().items()}))
        return fit(inputs, targets, generator)

    value.fit = recorded_fit
    batch, without = sampler.collect(policy), plain.collect(plain_policy)
    assert torch.equal(batch.data["raw_actions"], without.data["raw_actions"])  # same rollouts; V changes the rewards only
    inputs, targets, weights = fits[-1]
    before = ValueFunction(11, (16,), epochs=1)
    before.load_state_dict(weights)
    steps = batch.mask.sum(1)
    running = np.flatnonzero((steps == 30).numpy())  # the others fell (no time limit this early)
    ended = torch.as_tensor(steps < 30)
    assert 0 < len(running) < 9  # Hopper with a wide policy: some rollouts fall within 30 steps
    with torch.no_grad():
        v_end = before(policy.preprocess(sampler.pool.obs[running]))  # the statistics move at the next collect
    torch.testing.assert_close(batch.reward[running] - without.reward[running], 0.9**30 * v_end, rtol=1e-5, atol=1e-5)
    assert torch.equal(batch.reward[ended], without.reward[ended])
    # the first-step targets are the rewards themselves; later ones follow G_h = r_h + gamma G_{h+1}
    first_index = torch.cat([torch.zeros(1, dtype=torch.long), steps.cumsum(0)[:-1]])
    torch.testing.assert_close(targets[first_index], batch.reward, rtol=1e-5, atol=1e-4)
    assert torch.equal(inputs, batch.data["inputs"][batch.mask])
    assert {"value_loss", "value_explained_variance"} <= set(batch.stats)


def test_every_environment_step_is_counted():
    policy, sampler = make()
    calls = 0
    for env in sampler.pool.envs:
        step = env.step

        def counted(action, step=step):
            nonlocal calls
            calls += 1
            return step(action)

        env.step = counted
    b1 = sampler.collect(policy)
    assert b1.counts["env_steps"] == calls == int(b1.mask.sum())
    b2 = sampler.collect(policy)
    assert b1.counts["env_steps"] + b2.counts["env_steps"] == calls


def test_state_dict_round_trip_reproduces_the_next_batch():
    policy, sampler = make("Pendulum-v1")
    sampler.collect(policy)
    state, policy_state = sampler.state_dict(), {k: v.clone() for k, v in policy.state_dict().items()}
    a = sampler.collect(policy)
    _, other = make("Pendulum-v1")
    other.load_state_dict(state)
    policy.load_state_dict(policy_state)  # observation statistics as they were
    b = other.collect(policy)
    assert torch.equal(a.reward, b.reward) and torch.equal(a.data["raw_actions"], b.data["raw_actions"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 1}, "group_size must be an integer >= 2"),
        ({"segment_length": 0}, "segment_length must be an integer >= 1"),
        ({"gamma": 1.5}, "gamma must be in"),
        ({"value_function": object()}, "value_function must be None or a rebel.control.estimators.ValueFunction, got object"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make("Pendulum-v1", **kwargs)


def test_the_rollouts_of_a_group_share_the_start_states_env_noise():
    """Slippery FrozenLake, one step a segment: the members restore the start's env generator, so
    members that take the same action reach the same cell (common random numbers across the
    group), while the slip itself still varies from segment to segment."""
    probe = gym.make("FrozenLake-v1", is_slippery=True)
    torch.manual_seed(0)
    policy = MLPPolicy(probe.observation_space, probe.action_space)
    sampler = TrajectorySampler("FrozenLake-v1", policy, num_groups=4, group_size=4, segment_length=1, env_kwargs={"is_slippery": True})
    lake, pairs, slips = probe.unwrapped, 0, set()
    for _ in range(10):
        starts = [0 if start is None else int(start[1]) for start in sampler.starts]  # a reset starts at cell 0
        actions = sampler.collect(policy).data["raw_actions"][:, 0].view(4, 4).tolist()
        reached = sampler.pool.obs.reshape(4, 4).tolist()
        for g in range(4):
            for i in range(4):
                for k in range(i):
                    if actions[g][i] == actions[g][k]:
                        assert reached[g][i] == reached[g][k]
                        pairs += 1
        slips |= {(s, a[0], r[0]) for s, a, r in zip(starts, actions, reached) if len({c for _, c, _, _ in lake.P[s][a[0]]}) == 3}
    assert pairs >= 20
    assert len({(s, a) for s, a, _ in slips}) < len(slips)  # one (cell, action) led to different cells
