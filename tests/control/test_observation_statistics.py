"""Every control sampler keeps the policy's observation statistics fixed for a whole iteration:
an iteration's observations enter them at the start of the next collect
(rebel.control.rollouts.PendingObservations)."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

import rebel.control.trajectory
from rebel import Trainer, TrainerConfig
from rebel.control.critic import CriticSampler
from rebel.control.mc import MonteCarloSampler
from rebel.control.policy import MLPPolicy
from rebel.control.rollouts import PendingObservations
from rebel.control.trajectory import TrajectorySampler

FAST = {"progress": False, "report_to": "none", "plot": False}
SPACE = gym.make("Pendulum-v1").observation_space


def mc(policy, monkeypatch):
    """The branched states are the walkers' current observations, one row per action."""
    sampler = MonteCarloSampler("Pendulum-v1", policy, num_states=4, horizon=5)
    return sampler, lambda batch: (sampler.walkers.obs.repeat(2, axis=0), batch.data["inputs"][:, 0])


def trajectory(policy, monkeypatch):
    """The batch's inputs are its rollouts' observations (``raw_observations`` lists them step by step)."""
    sampler = TrajectorySampler("Pendulum-v1", policy, num_groups=2, group_size=2, segment_length=5)
    outs = []
    rollout = rebel.control.trajectory.rollout
    monkeypatch.setattr(rebel.control.trajectory, "rollout", lambda *args: outs.append(rollout(*args)) or outs[-1])
    return sampler, lambda batch: (outs[-1].raw_observations, batch.data["inputs"].transpose(0, 1)[batch.mask.T])


def critic(policy, monkeypatch):
    """Warm-up over iterations 1 and half of 2; the REBEL batch's states are the buffer's last sample."""
    options = {"steps_per_iteration": 50, "learning_starts": 75, "updates_per_step": 0.2, "critic_batch_size": 16, "num_states": 2}
    sampler = CriticSampler("Pendulum-v1", policy, critic_hidden_sizes=(16, 16), **options)
    drawn = []
    sample = sampler.buffer.sample
    sampler.buffer.sample = lambda *args: drawn.append(sample(*args)) or drawn[-1]
    return sampler, lambda batch: (drawn[-1].obs.repeat(2, axis=0), batch.data["inputs"][:, 0])


@pytest.mark.parametrize(
    ("make", "pending"),
    [(mc, None), (trajectory, [4 * 5] * 4), (critic, [50, 25, 0, 0])],
    ids=["mc", "trajectory", "critic"],
)
def test_observation_statistics_stay_fixed_from_the_batch_through_the_update(tmp_path, monkeypatch, make, pending):
    """pi_t samples the batch, scores it and is updated under one normalisation: after the
    update the policy, applied to the batch's states, sees the batch's inputs, so the policy
    the regression fitted is the one evaluated and saved. Each iteration's statistics are
    exactly the observations the earlier iterations held back."""
    torch.manual_seed(0)
    policy = MLPPolicy(SPACE, gym.make("Pendulum-v1").action_space)
    sampler, batch_states = make(policy, monkeypatch)
    seen = []
    collect = sampler.collect

    def recorded(policy):
        batch = collect(policy)
        states, inputs = batch_states(batch)
        signal = bool(batch.reward.abs().max() > 0)  # the critic's rewards are 0 until its first update
        held = sampler.pending.observations()
        seen.append({"states": states, "inputs": inputs, "pi_t": copy.deepcopy(policy), "held": held, "signal": signal})
        return batch

    def check(trainer, metrics):
        now, it = trainer.policy, seen[-1]
        for name in ("obs_mean", "obs_var", "obs_count"):
            assert torch.equal(getattr(now, name), getattr(it["pi_t"], name)), name
        assert torch.equal(now.net[0].weight, it["pi_t"].net[0].weight) != it["signal"]  # the update moved the parameters
        assert torch.equal(now.preprocess(it["states"]), it["inputs"])
        assert metrics["start_log_ratio_max"] == 0.0  # the batch is scored as the pi_t that sampled it

    sampler.collect = recorded
    config = TrainerConfig(output_dir=str(tmp_path / "run"), iterations=4, epochs=2, minibatch_size=4, **FAST)
    Trainer(policy, sampler, config, callbacks=[check]).train()
    assert sum(it["signal"] for it in seen) >= 3
    if pending is not None:
        assert [len(it["held"]) for it in seen] == pending
    assert seen[0]["pi_t"].obs_count == 0  # the first iteration samples with the initial statistics
    for t in range(1, 4):
        earlier = np.concatenate([it["held"] for it in seen[:t]]).astype(np.float64)
        pi_t = seen[t]["pi_t"]
        assert pi_t.obs_count == len(earlier) > 0
        np.testing.assert_allclose(pi_t.obs_mean.numpy(), earlier.mean(0), rtol=1e-9)
        np.testing.assert_allclose(pi_t.obs_var.numpy(), earlier.var(0), rtol=1e-9)


def test_held_observations_survive_a_checkpoint_and_enter_in_one_update():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(size=(n, 3)).astype(np.float32) for n in (5, 1, 7)]
    everything = np.concatenate(chunks)
    pending = PendingObservations(SPACE)
    for chunk in chunks:
        pending.add(chunk)
    chunks[0][:] = 0.0  # held as copies
    resumed = PendingObservations(SPACE)
    resumed.load_state_dict(pending.state_dict())
    straight, after_resume, by_hand = (MLPPolicy(SPACE, gym.spaces.Discrete(2)) for _ in range(3))
    pending.apply(straight)
    resumed.apply(after_resume)
    by_hand.update_observation_stats(everything)
    for name in ("obs_mean", "obs_var", "obs_count"):
        assert torch.equal(getattr(straight, name), getattr(by_hand, name)), name
        assert torch.equal(getattr(after_resume, name), getattr(by_hand, name)), name
    assert straight.obs_count == 13 and pending.observations().shape == (0, 3)  # applied once, then dropped
    old = PendingObservations(SPACE)
    old.load_state_dict({})  # a checkpoint from before the statistics waited holds none
    assert old.observations().shape == (0, 3)
