"""Dict / Tuple / MultiDiscrete / MultiBinary observations (flattened), MultiDiscrete and
MultiBinary actions (independent categoricals), their log-probs against a direct computation,
learning on a MultiDiscrete task, and the one-line errors for the spaces left unsupported."""

import math
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

from rebel.batch import RolloutBatch
from rebel.control.agent import Rebel
from rebel.control.critic import CriticSampler
from rebel.control.distributions import MultiCategorical
from rebel.control.envs import make_env
from rebel.control.policy import MLPPolicy
from rebel.runs import read_metrics

FAST = {"progress": False, "report_to": "none", "plot": False}


class Tiny(gym.Env):
    """One-step-per-decision task: reward 1 per action dimension that equals ``target`` (the
    observation is noise), 5 steps an episode."""

    def __init__(self, observation_space=None, action_space=None, target=(2, 0, 1)):
        self.observation_space = observation_space or gym.spaces.Box(-1, 1, (2,))
        self.action_space = action_space or gym.spaces.MultiDiscrete([3, 2, 4])
        self.target, self.t = np.array(target), 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        return self.observation_space.sample()

    def step(self, action):
        self.t += 1
        reward = float(np.sum(np.asarray(action) == self.target))
        return self._obs(), reward, False, self.t >= 5, {}


def test_multi_categorical_log_probs_entropy_and_mode_equal_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(4, 3 + 2 + 4)
    dist = MultiCategorical(logits, (3, 2, 4))
    action, raw = dist.sample()
    assert action.shape == (4, 3) and torch.equal(action, raw)
    for row in range(4):
        direct, entropy = 0.0, 0.0
        for d, (lo, n) in enumerate([(0, 3), (3, 2), (5, 4)]):
            p = np.exp(logits[row, lo : lo + n].double().numpy())
            p /= p.sum()
            direct += math.log(p[action[row, d]])
            entropy -= float((p * np.log(p)).sum())
        assert dist.log_prob(action)[row].item() == pytest.approx(direct, abs=1e-5)
        assert dist.entropy()[row].item() == pytest.approx(entropy, abs=1e-5)
    assert torch.equal(dist.mode(), torch.stack([c.argmax(-1) for c in logits.split([3, 2, 4], -1)], -1))


def test_multibinary_log_prob_is_a_product_of_bernoullis():
    space = gym.spaces.MultiBinary(3)
    policy = MLPPolicy(gym.spaces.Box(-1, 1, (2,)), space, hidden_sizes=(8,))
    inputs = torch.randn(5, 2)
    with torch.no_grad():
        torch.nn.init.normal_(policy.net[-1].weight)
        logits = policy.net(inputs)  # [5, 6]: two logits per bit
    _, raw = policy.act(inputs)
    assert raw.shape == (5, 3) and set(raw.unique().tolist()) <= {0, 1}
    batch = RolloutBatch(group=torch.zeros(5, dtype=torch.long), reward=torch.zeros(5), mask=torch.ones(5, 1, dtype=torch.bool),
                         data={"inputs": inputs[:, None], "raw_actions": raw[:, None]})  # fmt: skip
    p_one = torch.sigmoid(logits[:, 1::2] - logits[:, 0::2])  # P(bit = 1) of each Bernoulli
    direct = torch.where(raw == 1, p_one, 1 - p_one).log().sum(-1)
    torch.testing.assert_close(policy.step_log_probs(batch)[:, 0], direct, atol=1e-5, rtol=0)


def test_gumbel_noise_draws_multidiscrete_actions_with_the_policys_probabilities():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, -0.5]]).expand(20000, 5)
    dist = MultiCategorical(logits, (3, 2))
    action = dist.gumbel_max(torch.rand(20000, 5, generator=torch.Generator().manual_seed(0)))
    for d, (lo, n) in enumerate([(0, 3), (3, 2)]):
        frequency = np.bincount(action[:, d].numpy(), minlength=n) / 20000
        np.testing.assert_allclose(frequency, torch.softmax(logits[0, lo : lo + n], -1).numpy(), atol=0.015)


def test_dict_observations_are_flattened_in_key_order_and_normalised_per_entry(tmp_path):
    space = gym.spaces.Dict({"pos": gym.spaces.Box(-5, 5, (2,)), "cell": gym.spaces.Discrete(3), "bits": gym.spaces.MultiBinary(2)})
    env = make_env(lambda: Tiny(observation_space=space))
    assert isinstance(env.observation_space, gym.spaces.Box) and env.observation_space.shape == (7,)
    raw = {"bits": np.array([1, 0], dtype=np.int8), "cell": 2, "pos": np.array([0.5, -3.0], dtype=np.float32)}
    np.testing.assert_array_equal(env.observation(raw), [1, 0, 0, 0, 1, 0.5, -3.0])  # keys sorted: bits, cell (one-hot), pos
    agent = Rebel(lambda: Tiny(observation_space=space), variant="mc", output_dir=str(tmp_path / "run"), **FAST)
    flat = env.observation(raw)
    assert np.array_equal(agent.predict(raw)[0], agent.predict(flat)[0])  # a dict of the env's own space, flattened first
    assert np.array_equal(agent.predict([raw, raw])[0], agent.predict(np.stack([flat, flat]))[0])
    policy = MLPPolicy(env.observation_space, env.action_space)
    obs = np.stack([env.reset(seed=s)[0] for s in range(50)])
    policy.update_observation_stats(obs)
    np.testing.assert_allclose(policy.obs_mean.numpy(), obs.mean(0))
    np.testing.assert_allclose(policy.obs_var.numpy(), obs.var(0))


@pytest.mark.parametrize(
    ("space", "flat"),
    [
        (gym.spaces.MultiDiscrete([3, 2]), {(2, 1): [0, 0, 1, 0, 1]}),  # one-hot per dimension
        (gym.spaces.MultiBinary(3), {(1, 0, 1): [1, 0, 1]}),  # as 0/1 floats
        (gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Box(0, 1, (1,)))), {}),
    ],
    ids=["MultiDiscrete", "MultiBinary", "Tuple"],
)
def test_multidiscrete_multibinary_and_tuple_observations_train_and_predict(tmp_path, space, flat):
    env = make_env(lambda: Tiny(observation_space=space))
    for value, expected in flat.items():
        np.testing.assert_array_equal(env.observation(np.array(value)), expected)
    agent = Rebel(lambda: Tiny(observation_space=space), variant="mc", output_dir=str(tmp_path / "run"),
                  num_groups=4, horizon=2, eval_episodes=1, **FAST)  # fmt: skip
    agent.learn(200)
    action, _ = agent.predict(space.sample())
    assert agent.env_observation_space == space and agent.policy.action_space.contains(action.astype(np.int64))
    assert len(agent.predict([space.sample(), space.sample()])[0]) == 2


def test_the_critic_takes_one_hots_and_sums_log_probs_over_dimensions():
    env = make_env(Tiny)
    policy = MLPPolicy(env.observation_space, env.action_space, normalize_observations=False)
    sampler = CriticSampler(Tiny, policy, steps_per_iteration=10, learning_starts=10, critic_batch_size=8, alpha=0.1)
    assert sampler.target_entropy == pytest.approx(0.5 * (math.log(3) + math.log(2) + math.log(4)))
    actions = torch.tensor([[2, 0, 3], [0, 1, 0]])
    np.testing.assert_array_equal(sampler._critic_actions(actions).numpy(), [[0, 0, 1, 1, 0, 0, 0, 0, 1], [1, 0, 0, 0, 1, 1, 0, 0, 0]])
    inputs = torch.randn(2, 2)
    dist = policy.distribution(inputs)
    logits = policy.net(inputs).detach()
    direct = sum(
        torch.log_softmax(chunk, -1).gather(-1, actions[:, d : d + 1])[:, 0] for d, chunk in enumerate(logits.split([3, 2, 4], -1))
    )
    torch.testing.assert_close(sampler._log_prob(dist, actions, actions), direct)  # no rescaling term for indices
    random_actions = sampler._random_actions()
    assert random_actions.shape == (1, 3) and env.action_space.contains(random_actions[0].numpy())
    batch = sampler.collect(policy)  # warm-up, one TD step, the REBEL batch of one-hot actions
    assert batch.data["raw_actions"].shape == (256 * 2, 1, 3) and sampler.buffer.state_dict()["actions"].shape[1:] == (9,)


@pytest.mark.parametrize("variant", ["mc", "critic"])
def test_reward_rises_on_a_multidiscrete_task(tmp_path, variant):
    options = {"mc": {"num_groups": 32, "horizon": 1, "value_bootstrap": False, "learning_rate": 3e-3, "eta": 0.1},
               "critic": {"num_groups": 256, "steps_per_iteration": 100, "learning_starts": 100, "hidden_sizes": [32, 32],
                          "critic_hidden_sizes": [32, 32], "learning_rate": 3e-3,
                          "critic_batch_size": 64, "updates_per_step": 0.5}}[variant]  # fmt: skip
    agent = Rebel(Tiny, variant=variant, seed=0, output_dir=str(tmp_path / "run"), eval_every=5, eval_episodes=2, **options, **FAST)
    start = agent.evaluate(episodes=4)["eval_return"]
    agent.learn(1000)
    final = agent.evaluate(episodes=4)["eval_return"]
    assert start < 10 and final >= 14, (start, final)  # 5 steps x 3 dimensions: 15 at best
    assert read_metrics(tmp_path / "run")[-1]["env_steps"] >= 1000


@pytest.mark.parametrize(
    ("observation_space", "action_space", "message"),
    [
        (gym.spaces.Text(5), None, "Tiny has a Text observation space Text(1, 5"),
        (gym.spaces.Dict({"g": gym.spaces.Graph(gym.spaces.Box(0, 1, (2,)), None)}), None, "Tiny has a Graph observation space Graph("),
        (gym.spaces.Sequence(gym.spaces.Discrete(2)), None, "Tiny has a Sequence observation space Sequence("),
        (None, gym.spaces.Dict({"a": gym.spaces.Discrete(2)}), "Tiny has action space Dict('a': Discrete(2)); rebel.control supports"),
        (None, gym.spaces.Tuple((gym.spaces.Discrete(2),)), "Tiny has action space Tuple(Discrete(2)); rebel.control supports"),
        (None, gym.spaces.MultiDiscrete([[2, 3]]), "MultiDiscrete actions must be 1-D and start at 0"),
    ],
    ids=["Text", "Graph-in-Dict", "Sequence", "Dict-action", "Tuple-action", "2-D-MultiDiscrete"],
)
def test_unsupported_spaces_are_refused_in_one_line_before_training(tmp_path, observation_space, action_space, message):
    def make():
        return Tiny(observation_space=observation_space, action_space=action_space)

    make.__name__ = "Tiny"
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        Rebel(make, output_dir=str(tmp_path / "run"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
