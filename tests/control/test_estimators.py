"""The generic parts of the learned critics: replay buffer, TD targets, polyak averaging, the value function."""

import numpy as np
import pytest
import torch

from rebel.control.estimators import ReplayBuffer, Transitions, TwinQCritic, ValueFunction


def transitions(start, n, obs_dim=2):
    """n transitions numbered start, start + 1, ... in every field."""
    k = np.arange(start, start + n, dtype=np.float32)
    return Transitions(
        obs=np.repeat(k[:, None], obs_dim, 1),
        actions=k[:, None],
        rewards=k,
        next_obs=np.repeat(k[:, None] + 0.5, obs_dim, 1),
        terminated=k % 2,
    )


def test_replay_buffer_wraps_around_and_keeps_the_newest():
    buffer = ReplayBuffer(5, obs_shape=(2,), action_shape=(1,))
    buffer.add(transitions(0, 3))
    assert len(buffer) == 3 and buffer.position == 3
    buffer.add(transitions(3, 4))  # 0..6 into 5 slots: 5, 6 overwrite 0, 1
    assert len(buffer) == 5 and buffer.position == 2
    assert buffer.rewards.tolist() == [5, 6, 2, 3, 4]
    assert buffer.obs[:, 0].tolist() == [5, 6, 2, 3, 4] and buffer.next_obs[1, 1] == 6.5
    assert buffer.terminated.tolist() == [1, 0, 0, 1, 0]
    buffer.add(transitions(10, 7))  # more than the capacity at once: the last five, in ring order
    assert len(buffer) == 5 and sorted(buffer.rewards.tolist()) == [12, 13, 14, 15, 16]
    assert buffer.rewards[(buffer.position - 1) % 5] == 16


def test_replay_buffer_samples_held_transitions_reproducibly():
    buffer = ReplayBuffer(100, obs_shape=(2,), action_shape=(1,))
    buffer.add(transitions(0, 7))
    a = buffer.sample(500, np.random.default_rng(3))
    b = buffer.sample(500, np.random.default_rng(3))
    assert np.array_equal(a.obs, b.obs) and len(a) == 500
    assert set(a.rewards.tolist()) == set(range(7))  # only held rows, all of them over 500 draws
    assert np.array_equal(a.obs[:, 0], a.rewards) and np.array_equal(a.actions[:, 0], a.rewards)  # rows stay aligned
    a.obs[:] = -1  # a copy, not a view
    assert buffer.obs.min() == 0
    with pytest.raises(ValueError, match="empty replay buffer"):
        ReplayBuffer(3, (2,), (1,)).sample(1, np.random.default_rng(0))


def test_replay_buffer_state_round_trip():
    buffer = ReplayBuffer(4, obs_shape=(2,), action_shape=(1,))
    buffer.add(transitions(0, 6))
    other = ReplayBuffer(4, obs_shape=(2,), action_shape=(1,))
    other.load_state_dict(buffer.state_dict())
    assert (other.position, other.size) == (buffer.position, buffer.size)
    for name in ("obs", "actions", "rewards", "next_obs", "terminated"):
        assert np.array_equal(getattr(other, name), getattr(buffer, name))
    with pytest.raises(ValueError, match="capacity 2"):
        ReplayBuffer(2, (2,), (1,)).load_state_dict(buffer.state_dict())
    with pytest.raises(ValueError, match=r"obs has shape \(2, 2\); expected \(3, 2\)"):
        buffer.add(Transitions(np.zeros((2, 2)), np.zeros((2, 1)), np.zeros(3), np.zeros((2, 2)), np.zeros(2)))
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        ReplayBuffer(0, (2,), (1,))


def linear_critic(**kwargs):
    """Q(s, a) = w . [s, a] + b (no hidden layer) with set weights."""
    critic = TwinQCritic(1, 1, hidden_sizes=(), **kwargs)
    with torch.no_grad():
        for net, (w, b) in zip(
            (critic.q1, critic.q2, critic.q1_target, critic.q2_target),
            [((1.0, 2.0), 0.0), ((3.0, 1.0), -1.0), ((1.0, 1.0), 0.0), ((0.5, 3.0), 1.0)],
        ):
            net[0].weight.copy_(torch.tensor([w]))
            net[0].bias.fill_(b)
    return critic


def batch():
    return Transitions(
        obs=torch.tensor([[1.0], [2.0], [0.0]]),
        actions=torch.tensor([[0.5], [-1.0], [1.0]]),
        rewards=torch.tensor([1.0, -2.0, 0.5]),
        next_obs=torch.tensor([[2.0], [-1.0], [3.0]]),
        terminated=torch.tensor([0.0, 0.0, 1.0]),
    )


def next_action(next_obs):  # a' = 0.5 * s' with log pi(a'|s') = -1
    return 0.5 * next_obs, torch.full((len(next_obs),), -1.0)


def test_td_target_matches_a_hand_computation():
    critic = linear_critic()
    # targets at (s', a' = s'/2): Qtarg1 = s' + a' = 1.5 s', Qtarg2 = 0.5 s' + 3 a' + 1 = 2 s' + 1
    # s' = 2: min(3, 5) = 3;  s' = -1: min(-1.5, -1) = -1.5;  s' = 3: terminated, no bootstrap
    expected = torch.tensor([1.0 + 0.9 * 3.0, -2.0 + 0.9 * -1.5, 0.5])
    assert torch.allclose(critic.td_target(batch(), next_action, gamma=0.9), expected)
    # alpha > 0 adds the entropy term -alpha * log pi = +0.2 to the bootstrapped value
    expected_alpha = torch.tensor([1.0 + 0.9 * 3.2, -2.0 + 0.9 * -1.3, 0.5])
    assert torch.allclose(critic.td_target(batch(), next_action, gamma=0.9, alpha=0.2), expected_alpha)


def test_td_update_fits_both_networks_and_moves_the_targets_by_polyak():
    critic = linear_critic(tau=0.25, lr=0.05)
    y = critic.td_target(batch(), next_action, gamma=0.9)
    q1, q2 = critic.q(batch().obs, batch().actions)
    loss_before = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    old_targets = [p.clone() for p in [*critic.q1_target.parameters(), *critic.q2_target.parameters()]]
    stats = critic.td_update(batch(), next_action, gamma=0.9)
    assert stats["critic_loss"] == pytest.approx(loss_before.item())
    assert stats["target_mean"] == pytest.approx(y.mean().item())
    online = [*critic.q1.parameters(), *critic.q2.parameters()]
    targets = [*critic.q1_target.parameters(), *critic.q2_target.parameters()]
    for old, p, p_target in zip(old_targets, online, targets):
        assert torch.equal(p_target, old * 0.75 + 0.25 * p)  # tau = 1/4: exact in floating point
    for _ in range(500):  # gamma = 0: a plain regression onto r, which both linear nets can fit exactly
        stats = critic.td_update(batch(), next_action, gamma=0.0)
    assert stats["critic_loss"] < 1e-3 * loss_before.item()


def test_terminated_transitions_do_not_bootstrap():
    critic = linear_critic()
    b = batch()
    b.terminated = torch.ones(3)
    assert torch.equal(critic.td_target(b, next_action, gamma=0.9), b.rewards)
    b.terminated = torch.zeros(3)  # a truncated transition is not terminated: it bootstraps
    assert critic.td_target(b, next_action, gamma=0.9)[2] == pytest.approx(0.5 + 0.9 * min(4.5, 7.0))


def test_discrete_critic_is_a_head_over_actions():
    critic = TwinQCritic(3, 4, hidden_sizes=(8,), discrete=True)
    obs, act = torch.randn(5, 3), torch.tensor([0, 3, 1, 1, 2])
    q1, q2 = critic.q(obs, act)
    assert torch.equal(q1, critic.q1(obs)[torch.arange(5), act]) and q2.shape == (5,)
    assert torch.equal(critic.value(obs, act, "min"), torch.minimum(q1, q2))
    assert torch.equal(critic.value(obs, act, "mean"), (q1 + q2) / 2)
    b = Transitions(obs, act, torch.zeros(5), torch.randn(5, 3), torch.zeros(5))
    stats = critic.td_update(b, lambda s: (torch.zeros(len(s), dtype=torch.long), torch.zeros(len(s))), gamma=0.99)
    assert np.isfinite(stats["critic_loss"])


def test_checkpoint_state_round_trip():
    critic = TwinQCritic(2, 1, hidden_sizes=(4,))
    b = Transitions(torch.randn(6, 2), torch.rand(6, 1), torch.randn(6), torch.randn(6, 2), torch.zeros(6))
    f = lambda s: (torch.zeros(len(s), 1), torch.zeros(len(s)))
    critic.td_update(b, f, gamma=0.9)
    other = TwinQCritic(2, 1, hidden_sizes=(4,))
    other.load_checkpoint_state(critic.checkpoint_state())
    critic.td_update(b, f, gamma=0.9)
    other.td_update(b, f, gamma=0.9)
    for a, c in zip(critic.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.0}, "tau must be in"),
        ({"lr": -1.0}, "critic lr must be"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be"),
        ({"obs_dim": 0}, "obs_dim must be"),
    ],
)
def test_bad_critic_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TwinQCritic(**{"obs_dim": 2, "act_dim": 1, **kwargs})
    with pytest.raises(ValueError, match="reduction='max'"):
        TwinQCritic(2, 1).value(torch.zeros(1, 2), torch.zeros(1, 1), "max")


def test_value_function_learns_a_regression_and_reports_its_fit_before():
    torch.manual_seed(0)
    x = torch.randn(2048, 3)
    y = 5.0 + x[:, 0] - 2.0 * x[:, 1] ** 2
    value = ValueFunction(3, (32, 32), lr=3e-3, epochs=20, minibatch_size=128)
    with torch.no_grad():
        start = (value(x) - y).pow(2).mean().item()
    first = value.fit(x, y, generator=torch.Generator().manual_seed(0))
    assert first["value_loss"] == pytest.approx(start, rel=1e-5)  # measured before the fit
    second = value.fit(x, y)
    assert second["value_loss"] < 0.15 * start and second["value_explained_variance"] > 0.8, second
    assert value(x).shape == (2048,)


def test_value_function_target_scaling_keeps_outputs_and_fits_large_returns():
    torch.manual_seed(0)
    x = torch.randn(2048, 3)
    y = 300.0 + 40.0 * x[:, 0] - 20.0 * x[:, 1] ** 2  # returns of a few hundred, as on locomotion tasks
    scaled = ValueFunction(3, (32, 32), lr=3e-3, epochs=5, minibatch_size=128, normalize_targets=True)
    before = scaled(x).detach()
    scaled._rescale_targets(y)  # the scale moves to (mean, std) of y ...
    assert scaled.target_mean.item() == pytest.approx(y.mean().item(), rel=1e-5)
    assert scaled.target_std.item() == pytest.approx(y.std(unbiased=False).item(), rel=1e-5)
    torch.testing.assert_close(scaled(x).detach(), before, rtol=1e-5, atol=1e-3)  # ... and V's outputs stay
    plain = ValueFunction(3, (32, 32), lr=3e-3, epochs=5, minibatch_size=128)
    plain.load_state_dict(scaled.state_dict() | {"target_mean": torch.zeros(()), "target_std": torch.ones(())})
    for _ in range(6):
        with_scale, without = scaled.fit(x, y), plain.fit(x, y)
    # same network and steps: the scaled one explains the returns, the plain one has not yet reached their level
    assert with_scale["value_explained_variance"] > 0.9 > without["value_explained_variance"], (with_scale, without)
    state = scaled.checkpoint_state()
    restored = ValueFunction(3, (32, 32), normalize_targets=True)
    restored.load_checkpoint_state(state)
    assert torch.equal(restored(x), scaled(x))
    old = {"network": {k: v for k, v in state["network"].items() if not k.startswith("target_")}, "optimizer": state["optimizer"]}
    restored.load_checkpoint_state(old)  # a checkpoint from before the scale: mean 0, std 1
    assert restored.target_std.item() == 1.0 and restored.target_mean.item() == 0.0


def test_value_function_checkpoint_round_trip_and_bad_inputs():
    torch.manual_seed(0)
    x, y = torch.randn(64, 2), torch.randn(64)
    a = ValueFunction(2, (8,))
    a.fit(x, y)
    b = ValueFunction(2, (8,))
    b.load_checkpoint_state(a.checkpoint_state())
    a.fit(x, y, generator=torch.Generator().manual_seed(1))
    b.fit(x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(x), b(x))  # optimizer state travelled too
    with pytest.raises(ValueError, match=r"inputs \(64, 2\) and targets \(63,\) must be"):
        a.fit(x, y[:63])
    with pytest.raises(ValueError, match="value hidden_sizes must be"):
        ValueFunction(2, ())
    with pytest.raises(ValueError, match="value lr must be a finite number > 0, got 0"):
        ValueFunction(2, lr=0)
    with pytest.raises(ValueError, match="value epochs must be an integer >= 1, got 0"):
        ValueFunction(2, epochs=0)
