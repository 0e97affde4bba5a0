"""MLPPolicy: exact log-probabilities, spaces, observation statistics."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from rebel import RolloutBatch
from rebel.control.policy import MLPPolicy

BOX_OBS = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
BOX_ACT = gym.spaces.Box(np.array([-2.0, 0.0]), np.array([2.0, 1.0]), dtype=np.float32)


def batch_of(policy, inputs, raw):
    b, t = inputs.shape[:2]
    return RolloutBatch(
        group=torch.arange(b) // 2, reward=torch.zeros(b), mask=torch.ones(b, t), data={"inputs": inputs, "raw_actions": raw}
    )


def test_squashed_gaussian_step_log_probs_match_torch_distributions():
    torch.manual_seed(0)
    policy = MLPPolicy(BOX_OBS, BOX_ACT, hidden_sizes=(16,))
    with torch.no_grad():
        policy.net[-1].weight.normal_()  # move away from the near-zero initial mean
    inputs = torch.randn(4, 5, 3)
    action, raw = policy.act(inputs)
    assert (action >= torch.tensor([-2.0, 0.0])).all() and (action <= torch.tensor([2.0, 1.0])).all()
    got = policy.step_log_probs(batch_of(policy, inputs, raw))
    mean = policy.net(inputs)
    reference = TransformedDistribution(
        Normal(mean, policy.log_std.exp().expand_as(mean)),
        [TanhTransform(cache_size=1), AffineTransform(torch.tensor([0.0, 0.5]), torch.tensor([2.0, 0.5]))],
    )
    assert torch.allclose(got, reference.log_prob(action).sum(-1), atol=1e-4)
    assert torch.allclose(policy.env_action(raw), action)


def test_clipped_gaussian_scores_the_unclipped_sample():
    policy = MLPPolicy(BOX_OBS, BOX_ACT, squash=False, log_std_init=1.0)
    inputs = torch.randn(2, 3, 3)
    action, raw = policy.act(inputs)
    assert (raw.abs() > 2).any() and torch.equal(
        action, torch.maximum(torch.minimum(raw, torch.tensor([2.0, 1.0])), torch.tensor([-2.0, 0.0]))
    )
    expected = Normal(policy.net(inputs), policy.log_std.exp()).log_prob(raw).sum(-1)
    assert torch.allclose(policy.step_log_probs(batch_of(policy, inputs, raw)), expected)


def test_state_dependent_std_and_categorical():
    policy = MLPPolicy(BOX_OBS, BOX_ACT, state_dependent_std=True)
    assert not hasattr(policy, "log_std") and policy.net[-1].out_features == 4
    discrete = MLPPolicy(BOX_OBS, gym.spaces.Discrete(3))
    inputs = torch.randn(2, 4, 3)
    action, raw = discrete.act(inputs)
    assert raw.dtype == torch.long and torch.equal(action, raw)
    expected = torch.log_softmax(discrete.net(inputs), -1).gather(-1, raw[..., None])[..., 0]
    assert torch.allclose(discrete.step_log_probs(batch_of(discrete, inputs, raw)), expected)


def test_noise_gives_common_random_numbers():
    policy = MLPPolicy(BOX_OBS, BOX_ACT)
    inputs = torch.randn(3, 3)
    noise = torch.randn(3, 2)
    assert torch.equal(policy.act(inputs, noise=noise)[1], policy.act(inputs, noise=noise)[1])
    discrete = MLPPolicy(BOX_OBS, gym.spaces.Discrete(4))
    uniform = torch.rand(3, 4)
    assert torch.equal(discrete.act(inputs, noise=uniform)[0], discrete.act(inputs, noise=uniform)[0])


def test_observation_statistics_match_numpy_and_are_saved():
    policy = MLPPolicy(BOX_OBS, BOX_ACT)
    data = np.random.default_rng(0).normal(5.0, 3.0, size=(500, 3))
    for chunk in np.array_split(data, 6):
        policy.update_observation_stats(chunk)
    assert np.allclose(policy.obs_mean.numpy(), data.mean(0)) and np.allclose(policy.obs_var.numpy(), data.var(0))
    x = policy.preprocess(data[:4])
    assert torch.allclose(x, torch.as_tensor((data[:4] - data.mean(0)) / np.sqrt(data.var(0) + 1e-8), dtype=torch.float32), atol=1e-5)
    assert {"obs_mean", "obs_var", "obs_count"} <= set(policy.checkpoint_state())


def test_discrete_observations_are_one_hot():
    policy = MLPPolicy(gym.spaces.Discrete(5), BOX_ACT)
    assert policy.preprocess(np.array([2])).tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]]
    a1, a2 = policy.predict(np.array([1, 3])), policy.predict(np.array([1, 3]))
    assert np.array_equal(a1, a2) and a1.shape == (2, 2)


@pytest.mark.parametrize("squash", [True, False])
def test_deterministic_action_is_the_gaussian_mean_squashed_or_clipped_once(squash):
    torch.manual_seed(0)
    policy = MLPPolicy(BOX_OBS, BOX_ACT, squash=squash)
    with torch.no_grad():
        policy.net[-1].bias.copy_(torch.tensor([1.5, -0.8]))  # means far enough out that a second tanh would show
    obs = np.random.default_rng(0).normal(size=(5, 3))
    mean = policy.net(policy.preprocess(obs)).detach().double()
    low, high = torch.tensor([-2.0, 0.0], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64)
    if squash:
        expected = low + (high - low) * (torch.tanh(mean) + 1) / 2
    else:
        expected = torch.maximum(torch.minimum(mean, high), low)
    np.testing.assert_allclose(policy.predict(obs), expected.numpy(), rtol=1e-5, atol=1e-6)
    action, raw = policy.act(policy.preprocess(obs), deterministic=True)
    assert torch.equal(raw, policy.distribution(policy.preprocess(obs)).mean)  # stored like a sample: pre-tanh / unclipped
    assert torch.allclose(policy.env_action(raw), action)


def test_deterministic_discrete_action_is_the_most_likely_one():
    policy = MLPPolicy(BOX_OBS, gym.spaces.Discrete(4))
    obs = np.random.default_rng(1).normal(size=(6, 3))
    logits = policy.net(policy.preprocess(obs))
    assert np.array_equal(policy.predict(obs), logits.argmax(-1).numpy())


@pytest.mark.parametrize(
    ("obs_space", "act_space", "message"),
    [
        (
            BOX_OBS,
            gym.spaces.Tuple((gym.spaces.Discrete(2),)),
            "supports Box \\(continuous\\), Discrete, MultiDiscrete and MultiBinary actions",
        ),
        (BOX_OBS, gym.spaces.Box(-1, 1, (2, 2)), "Box actions must be 1-D"),
        (gym.spaces.Dict({"a": BOX_OBS}), BOX_ACT, "supports Box and Discrete observations"),
    ],
)
def test_unsupported_spaces_are_named(obs_space, act_space, message):
    with pytest.raises(ValueError, match=message):
        MLPPolicy(obs_space, act_space)
    with pytest.raises(ValueError, match="activation='gelu' is not supported"):
        MLPPolicy(BOX_OBS, BOX_ACT, activation="gelu")
