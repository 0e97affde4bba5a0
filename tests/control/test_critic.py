"""The critic variant's sampler: replay transitions, TD-trained twin critics, Q-valued pairs."""

from typing import ClassVar

import gymnasium as gym
import numpy as np
import pytest
import torch

from rebel import Trainer, TrainerConfig
from rebel.control.critic import CriticSampler
from rebel.control.evaluation import evaluate
from rebel.control.policy import LOG_STD_RANGE, MLPPolicy
from rebel.runs import read_metrics

FAST = {"progress": False, "report_to": "none", "plot": False}
SMALL = {"critic_hidden_sizes": (16, 16), "critic_batch_size": 32, "num_states": 8}


def mlp_policy(probe, hidden_sizes=(32, 32), normalize_observations=False):
    """The policy the agent builds for the critic variant (SAC-like: relu, state-dependent std, raw observations)."""
    return MLPPolicy(
        probe.observation_space,
        probe.action_space,
        hidden_sizes,
        activation="relu",
        state_dependent_std=True,
        normalize_observations=normalize_observations,
    )


def make(env="Pendulum-v1", policy_seed=0, normalize_observations=False, **kwargs):
    torch.manual_seed(policy_seed)
    policy = mlp_policy(gym.make(env) if isinstance(env, str) else env(), normalize_observations=normalize_observations)
    return policy, CriticSampler(env, policy, **{"steps_per_iteration": 50, "learning_starts": 50, "seed": 1, **SMALL, **kwargs})


class Recorder(gym.Wrapper):
    """Keeps what every step returned, to check the buffer against."""

    log: ClassVar[list] = []

    def step(self, action):
        out = super().step(action)
        Recorder.log.append(out)
        return out


def test_transitions_keep_the_true_final_observation_and_tell_termination_from_truncation():
    Recorder.log = []
    policy, sampler = make(lambda: Recorder(gym.make("Pendulum-v1", max_episode_steps=20)), num_envs=1, learning_starts=30)
    sampler.collect(policy)  # 30 random steps, then 20 policy steps: episodes end (truncated) at steps 20 and 40
    buffer = sampler.buffer
    assert len(buffer) == 50 == len(Recorder.log)
    for i, (obs, reward, terminated, truncated, _) in enumerate(Recorder.log):
        assert np.array_equal(buffer.next_obs[i], obs.astype(np.float32)) and buffer.rewards[i] == np.float32(reward)
        assert buffer.terminated[i] == terminated == 0 and truncated == (i % 20 == 19)
    assert not np.array_equal(buffer.next_obs[19], buffer.obs[20])  # the next row starts a new episode
    assert np.array_equal(buffer.next_obs[18], buffer.obs[19])

    Recorder.log = []
    policy, sampler = make(lambda: Recorder(gym.make("CartPole-v1")), learning_starts=200, steps_per_iteration=200)
    sampler.collect(policy)  # random CartPole episodes terminate after ~20 steps
    ended = np.flatnonzero([terminated for _, _, terminated, _, _ in Recorder.log])
    assert len(ended) >= 3 and np.array_equal(np.flatnonzero(sampler.buffer.terminated), ended)
    for i in ended:
        assert np.array_equal(sampler.buffer.next_obs[i], Recorder.log[i][0])  # the terminal observation itself
    assert sampler.buffer.actions.dtype == np.int64 and set(sampler.buffer.actions[:200].tolist()) == {0, 1}


def test_the_rebel_batch_compares_actions_at_replay_states_by_their_q_values():
    policy, sampler = make(num_states=6, actions_per_state=3, learning_starts=100)
    warmup = sampler.collect(policy)
    assert torch.equal(warmup.reward, torch.zeros(18))  # no critic update yet: no signal
    assert "critic_loss" not in warmup.stats
    batch = sampler.collect(policy)
    assert batch.group.tolist() == [g for g in range(6) for _ in range(3)]
    assert batch.data["inputs"].shape == (18, 1, 3) and batch.data["raw_actions"].shape == (18, 1, 1) and batch.mask.all()
    inputs, raw = batch.data["inputs"][:, 0], batch.data["raw_actions"][:, 0]
    assert torch.equal(inputs[0], inputs[2]) and not torch.equal(raw[0], raw[1])  # one state, independent actions
    states = torch.as_tensor(sampler.buffer.obs[: len(sampler.buffer)])
    assert all((states == x).all(1).any() for x in inputs)  # every state comes from the replay buffer
    q1, q2 = sampler.critic.q(inputs, torch.tanh(raw))  # Pendulum's [-2, 2] torque, rescaled: tanh of the raw sample
    assert torch.allclose(batch.reward, torch.minimum(q1, q2), atol=1e-6)
    gaps = [abs(batch.reward[3 * g + i] - batch.reward[3 * g + j]).item() for g in range(6) for i in range(3) for j in range(3) if i != j]
    assert batch.stats["q_diff_abs"] == pytest.approx(np.mean(gaps), rel=1e-5)
    assert batch.stats["critic_updates"] == 50 and batch.counts == {"env_steps": 50.0}


def test_with_alpha_the_reward_is_the_soft_q_of_the_sampled_action():
    """log pi in SAC's units: the density of the critic's action tanh(u) in [-1, 1], not of
    Pendulum's torque 2 tanh(u) in [-2, 2] (which is lower by log 2)."""
    alpha = 0.3
    policy, sampler = make(num_states=5, actions_per_state=2, learning_starts=100, alpha=alpha)
    first = sampler.collect(policy)
    assert torch.equal(first.reward, torch.zeros(10)) and first.entropy_weight == 0.0  # no critic yet: no entropy term either
    batch = sampler.collect(policy)
    assert batch.entropy_weight == alpha  # the trainer's normalisation divides by at least eta * alpha
    inputs, raw = batch.data["inputs"][:, 0], batch.data["raw_actions"][:, 0]
    q = torch.minimum(*sampler.critic.q(inputs, torch.tanh(raw)))
    mean, log_std = policy.net(inputs).split(1, dim=-1)
    dist = torch.distributions.Normal(mean, log_std.clamp(*LOG_STD_RANGE).exp())
    squashed = torch.distributions.TransformedDistribution(dist, [torch.distributions.TanhTransform()])
    logp = squashed.log_prob(torch.tanh(raw)).sum(-1)
    assert sampler.log_action_scale == pytest.approx(np.log(2.0))
    assert torch.allclose(batch.reward, q - alpha * logp, atol=1e-4)
    assert batch.stats["entropy"] == pytest.approx(-logp.mean().item(), rel=1e-4)
    assert batch.stats["q_mean"] == pytest.approx(q.mean().item(), rel=1e-5)


@pytest.mark.parametrize(("target_entropy", "direction"), [(10.0, 1), (-10.0, -1)])
def test_tuned_alpha_moves_towards_the_target_entropy(target_entropy, direction):
    """SAC's temperature loss -log(alpha) (log pi + target): one Adam step per TD update, each
    of size lr in log alpha while the entropy stays on one side of the target."""
    policy, sampler = make(learning_starts=100, alpha=0.1, tune_alpha=True, target_entropy=target_entropy, critic_lr=1e-3)
    assert sampler.collect(policy).stats.get("alpha") is None  # warm-up: no TD update, no alpha step
    stats = sampler.collect(policy).stats
    assert sampler.critic_updates == 50
    assert np.log(stats["alpha"] / 0.1) == pytest.approx(direction * 50 * 1e-3, rel=0.02)
    assert -2.0 < stats["next_entropy"] < 3.0  # -log pi of a' ~ pi(.|s'): a fresh squashed Gaussian on [-2, 2]
    assert sampler.alpha == stats["alpha"]


def test_tuned_alpha_stays_below_max_alpha():
    policy, sampler = make(learning_starts=50, alpha=0.5, tune_alpha=True, target_entropy=10.0, max_alpha=0.6, critic_lr=1e-2)
    for _ in range(3):
        stats = sampler.collect(policy).stats
    assert stats["alpha"] == pytest.approx(0.6)


def test_env_steps_and_updates_are_counted():
    policy, sampler = make(num_envs=3, steps_per_iteration=10, learning_starts=20, updates_per_step=0.25, critic_batch_size=8)
    rows = [sampler.collect(policy) for _ in range(4)]
    assert [b.counts["env_steps"] for b in rows] == [12.0] * 4  # rounded up to whole vector steps
    assert sampler.total_steps == 48 and len(sampler.buffer) == 48
    assert [b.stats.get("critic_updates", 0) for b in rows] == [0, 3, 3, 3]  # 0.25 * 12 per iteration once 20 are held
    assert sampler.critic_updates == 9


@pytest.mark.parametrize("normalization", ["none", "within_group"])
def test_critic_variant_learns_pendulum(tmp_path, normalization):
    """10k env steps, ~25 s of CPU: a random Pendulum policy scores about -1450 here, these
    settings about -190 without reward normalisation (seeds 0, 1, 2: -191, -187, -187) and
    about -215 with ``within_group``, the agent's default (-218, -218, -213)."""
    torch.manual_seed(0)
    policy = mlp_policy(gym.make("Pendulum-v1"), hidden_sizes=(64, 64))
    sampler = CriticSampler(
        "Pendulum-v1", policy, steps_per_iteration=200, learning_starts=1000, critic_hidden_sizes=(64, 64), num_states=4096, seed=0
    )
    config = TrainerConfig(
        output_dir=str(tmp_path / "run"), iterations=None, budget=10_000, eta=2.0, learning_rate=1e-3, epochs=4, minibatch_size=1024,
        reward_normalization=normalization, **FAST,
    )  # fmt: skip
    before = evaluate(policy, "Pendulum-v1", episodes=5, seed=123)["eval_return"]
    rows = Trainer(policy, sampler, config).train()
    after = evaluate(policy, "Pendulum-v1", episodes=5, seed=123)["eval_return"]
    assert rows[-1]["env_steps"] == 10_000
    assert all(r["start_log_ratio_max"] == 0.0 for r in rows)
    assert before < -1000 and after > -600, (before, after)


# The normalising policy's warm-up ends in iteration 3: the checkpoint holds 20 observations
# that enter the statistics at the start of iteration 4.
@pytest.mark.parametrize(
    "extra",
    [{}, {"alpha": 0.1, "tune_alpha": True}, {"learning_starts": 100, "normalize_observations": True}],
    ids=["no-entropy", "tuned-alpha", "normalised-warm-up-across-the-checkpoint"],
)
def test_resume_is_bit_identical(tmp_path, extra):
    """N + N iterations with a checkpoint in between == 2N straight (the buffer wraps around)."""
    n = 3
    options = {"num_envs": 2, "steps_per_iteration": 40, "learning_starts": 60, "buffer_size": 100, "updates_per_step": 0.5, **extra}

    def trainer(name, callbacks=()):
        policy, sampler = make(**options)
        config = TrainerConfig(output_dir=str(tmp_path / name), iterations=2 * n, checkpoint_every=100, epochs=2, minibatch_size=4, **FAST)
        return Trainer(policy, sampler, config, callbacks=callbacks)

    straight = trainer("straight")
    straight.train()

    def stop_at_n(t, metrics):
        if t.iteration == n:
            t.request_stop()

    assert len(trainer("split", [stop_at_n]).train()) == n
    resumed = trainer("split")
    resumed.train(resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k} for r in rows]
    assert strip(read_metrics(tmp_path / "split")) == strip(read_metrics(tmp_path / "straight"))
    for a, b in zip(resumed.policy.state_dict().values(), straight.policy.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.sampler.critic.state_dict().values(), straight.sampler.critic.state_dict().values()):
        assert torch.equal(a, b)
    assert np.array_equal(resumed.sampler.buffer.obs, straight.sampler.buffer.obs)
    assert np.array_equal(resumed.sampler.obs, straight.sampler.obs)
    assert resumed.sampler.alpha == straight.sampler.alpha
    assert straight.policy.obs_count == (100 if "normalize_observations" in extra else 0)  # the whole warm-up


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"actions_per_state": 1}, "actions_per_state must be an integer >= 2"),
        ({"steps_per_iteration": 0}, "steps_per_iteration must be an integer >= 1"),
        ({"num_envs": 0}, "num_envs must be"),
        ({"learning_starts": -1}, "learning_starts must be an integer >= 0"),
        ({"buffer_size": 0}, "buffer_size must be"),
        ({"critic_batch_size": 0}, "critic_batch_size must be"),
        ({"num_states": 0}, "num_states must be"),
        ({"updates_per_step": -1.0}, "updates_per_step must be"),
        ({"critic_lr": 0.0}, "critic_lr must be"),
        ({"gamma": 1.5}, "gamma must be in"),
        ({"tau": 0.0}, "tau must be in"),
        ({"alpha": -0.1}, "alpha must be"),
        ({"critic_hidden_sizes": ()}, "critic_hidden_sizes must be"),
        ({"tune_alpha": True}, r"tune_alpha needs a starting alpha > 0, got alpha=0.0"),
        ({"max_alpha": 0.0}, "max_alpha must be > 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_a_policy_for_other_spaces_is_refused():
    policy, _ = make("CartPole-v1")
    with pytest.raises(ValueError, match="the policy was built for spaces"):
        CriticSampler("Pendulum-v1", policy)
