"""The REBEL iteration: exact start, learning, metrics, run folder, checkpoints and resume."""

import dataclasses
import inspect
import json
import os
import signal

import pytest
import torch
import yaml

import rebel.trainer
from rebel import LOSSES, RolloutBatch, Sampler, Trainer, TrainerConfig, rebel_loss, register_loss
from rebel.runs import latest_checkpoint, read_metrics
from rebel_envs.tabular import TabularConfig, TabularSampler, make_tabular

FAST = {"progress": False, "report_to": "none", "plot": False}


def tabular_trainer(tmp_path, name="run", task=None, callbacks=(), **overrides):
    config = TrainerConfig(**{"output_dir": str(tmp_path / name), "learning_rate": 0.1, "epochs": 2, **FAST, **overrides})
    torch.manual_seed(config.seed)
    policy, sampler = make_tabular(task or TabularConfig(), seed=config.seed)
    return Trainer(policy, sampler, config, callbacks=callbacks)


def strip_times(rows):
    return [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k} for r in rows]


def test_log_ratio_is_exactly_zero_at_the_start_of_every_iteration(tmp_path):
    trainer = tabular_trainer(tmp_path, iterations=6, epochs=3, minibatch_size=20)
    rows = trainer.train()
    assert [r["start_log_ratio_max"] for r in rows] == [0.0] * 6
    assert all(r["log_ratio_max_abs"] > 0 for r in rows)  # and the update did move the policy


def test_a_single_update_takes_logp_old_from_its_own_forward(tmp_path):
    """One epoch of one minibatch: logp_old is the update's own forward, detached: one forward
    an iteration (stats_forward off), the same numbers a separate no-grad forward gives."""
    trainer = tabular_trainer(tmp_path, iterations=3, epochs=1, stats_forward=False)
    forward, calls, pairs = trainer.model.forward, [], []

    def recording(mb):
        out = forward(mb)
        calls.append(torch.is_grad_enabled())
        with torch.no_grad():
            pairs.append((out.detach().clone(), forward(mb)))  # what a separate scoring forward would give
        return out

    trainer.model.forward = recording
    rows = trainer.train()
    assert calls == [True] * 3 and [r["start_log_ratio_max"] for r in rows] == [0.0] * 3
    assert all(torch.equal(a, b) for a, b in pairs)
    several = tabular_trainer(tmp_path, "several", iterations=1, epochs=2, stats_forward=False)
    forward2, calls2 = several.model.forward, []
    several.model.forward = lambda mb: calls2.append(torch.is_grad_enabled()) or forward2(mb)
    several.train()
    assert calls2 == [False, True, True]  # several updates: score pi_t first, then one forward per update


def test_rebel_learns_the_tabular_mdp(tmp_path):
    rows = tabular_trainer(tmp_path, iterations=30).train()
    optimal = rows[0]["optimal_return"]
    assert rows[0]["expected_return"] < 0.5 * optimal
    assert rows[-1]["expected_return"] > 0.9 * optimal


@pytest.mark.parametrize("loss", ["rloo", "ppo_clip"])
def test_baseline_losses_run_through_the_same_trainer_and_learn(tmp_path, loss):
    rows = tabular_trainer(tmp_path, loss=loss, iterations=30, learning_rate=0.2).train()
    assert rows[-1]["expected_return"] > rows[0]["expected_return"] + 1.0


@pytest.fixture
def register():
    """register_loss for a test: its losses leave the (global) registry afterwards."""
    names = []

    def add(name, **kwargs):
        names.append(name)
        return register_loss(name, **kwargs)

    yield add
    for name in names:
        LOSSES.pop(name, None)


@pytest.mark.parametrize("needs_step_logp_old", [False, True])
def test_a_registered_loss_trains_through_the_trainer(tmp_path, register, needs_step_logp_old):
    calls = []

    @register("rebel_x2", needs_step_logp_old=needs_step_logp_old)
    def rebel_x2(mb, logp, step_logp, config):
        calls.append((mb.step_logp_old, step_logp.detach(), logp.detach(), mb.logp_old, config))
        return 2 * rebel_loss(logp, mb.logp_old, mb.reward, mb.group, eta=config.eta, pairs=config.pairs)

    mine = tabular_trainer(tmp_path, "mine", loss="rebel_x2", iterations=2, epochs=1, eta=0.5)
    rows = mine.train()
    reference = tabular_trainer(tmp_path, "rebel", loss="rebel", iterations=1, epochs=1, eta=0.5).train()
    assert len(calls) == 2  # one minibatch per iteration
    assert rows[0]["loss"] == pytest.approx(2 * reference[0]["loss"], rel=1e-6)  # same batch, same theta_t
    for step_logp_old, step_logp, logp, logp_old, config in calls:
        assert config is mine.config
        assert torch.equal(logp, logp_old)  # each call is an iteration's first: theta = theta_t
        if needs_step_logp_old:
            assert torch.equal(step_logp_old, step_logp)
            assert step_logp_old.shape == step_logp.shape
        else:
            assert step_logp_old is None


def test_a_registered_name_is_a_valid_choice_until_it_is_removed(register):
    register("mine")(lambda mb, logp, step_logp, config: logp.sum())
    assert TrainerConfig(loss="mine").loss == "mine"
    with pytest.raises(ValueError, match="^loss='ppo' is not supported; expected one of rebel, rloo, ppo_clip, mine$"):
        TrainerConfig(loss="ppo")
    LOSSES.pop("mine")
    with pytest.raises(ValueError, match="^loss='mine' is not supported; expected one of rebel, rloo, ppo_clip$"):
        TrainerConfig(loss="mine")


def test_the_trainer_names_no_particular_loss():
    code = [line for line in inspect.getsource(rebel.trainer).splitlines() if "option(" not in line]  # help texts may name one
    for name in ("ppo_clip", "rloo", "rebel_loss", "group_advantage", "loss =="):
        assert not [line for line in code if name in line], name
    help_text = next(f.metadata["help"] for f in dataclasses.fields(TrainerConfig) if f.name == "loss")
    assert help_text.startswith("rebel | rloo | ppo_clip ")


def test_metrics_rows_hold_the_documented_keys(tmp_path):
    rows = tabular_trainer(tmp_path, iterations=2).train()
    keys = {
        "iteration", "samples", "env_steps", "learning_rate", "loss", "reward_mean", "reward_std", "explained_variance",
        "log_ratio_mean", "log_ratio_std", "log_ratio_max_abs", "kl", "grad_norm", "samples_per_second",
        "iteration_time", "collect_time", "wall_time", "env_steps_per_second", "start_log_ratio_max", "episode_return",
    }  # fmt: skip
    assert keys <= set(rows[0])
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[1]["samples"] == 2 * 32 * 4  # cumulative
    assert rows[0]["kl"] >= 0 and rows[0]["explained_variance"] <= 1
    assert read_metrics(tmp_path / "run") == rows


def test_run_folder_layout(tmp_path):
    trainer = tabular_trainer(tmp_path, iterations=5, checkpoint_every=2, keep_checkpoints=2, report_to=["tensorboard"], plot=True)
    trainer.train()
    run = tmp_path / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["iterations"] == 5 and config["trainer"]["eta"] == 1.0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert (run / "curves.png").stat().st_size > 1000
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["iter_000004", "iter_000005", "latest"]  # no leftovers of the atomic writes
    assert latest_checkpoint(run).name == "iter_000005"
    state = torch.load(run / "checkpoints/iter_000005/trainer.pt", weights_only=False)
    assert {"policy", "optimizer", "scheduler", "normalizer", "iteration"} <= set(state)


def test_a_deepspeed_checkpoint_resumes_only_under_deepspeed(tmp_path):
    tabular_trainer(tmp_path, iterations=1).train()
    checkpoint = latest_checkpoint(tmp_path / "run")
    state = torch.load(checkpoint / "trainer.pt", weights_only=False)
    for key in ("policy", "optimizer"):  # DeepSpeed keeps these in its own files
        del state[key]
    torch.save({**state, "deepspeed": True}, checkpoint / "trainer.pt")
    with pytest.raises(ValueError, match=r"iter_000001 was written with DeepSpeed; resume it under the same accelerate config"):
        tabular_trainer(tmp_path, iterations=2).train(resume=True)


@pytest.mark.parametrize(
    "overrides", [{}, {"minibatch_size": 24, "epochs": 3, "reward_normalization": "per_context", "lr_schedule": "cosine"}]
)
def test_resume_is_bit_identical(tmp_path, overrides):
    """2N iterations straight == N, stop, resume, N more."""
    n = 4
    straight = tabular_trainer(tmp_path, "straight", iterations=2 * n, checkpoint_every=100, **overrides)
    rows_straight = straight.train()

    def stop_at_n(trainer, metrics):
        if trainer.iteration == n:
            trainer.request_stop()

    first = tabular_trainer(tmp_path, "split", iterations=2 * n, checkpoint_every=100, callbacks=[stop_at_n], **overrides)
    rows_first = first.train()
    assert len(rows_first) == n
    second = tabular_trainer(tmp_path, "split", iterations=2 * n, checkpoint_every=100, **overrides)
    with torch.no_grad():
        second.policy.logits.normal_()  # whatever the fresh policy holds is replaced by the checkpoint
    rows_second = second.train(resume=True)
    assert torch.equal(second.policy.logits, straight.policy.logits)
    assert strip_times(rows_first + rows_second) == strip_times(rows_straight)
    assert strip_times(read_metrics(tmp_path / "split")) == strip_times(rows_straight)
    for a, b in zip(second.optimizer.state_dict()["state"].values(), straight.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path):
    straight = tabular_trainer(tmp_path, "straight", iterations=6, checkpoint_every=100)
    straight.train()

    def interrupt(trainer, metrics):
        if trainer.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a user's Ctrl-C in the middle of the run

    handler = signal.getsignal(signal.SIGINT)
    rows = tabular_trainer(tmp_path, "split", iterations=6, checkpoint_every=100, callbacks=[interrupt]).train()
    assert len(rows) == 2 and latest_checkpoint(tmp_path / "split").name == "iter_000002"
    assert signal.getsignal(signal.SIGINT) is handler  # handler restored
    resumed = tabular_trainer(tmp_path, "split", iterations=6, checkpoint_every=100)
    resumed.train(resume=True)
    assert torch.equal(resumed.policy.logits, straight.policy.logits)


class FailingSampler(TabularSampler):
    def __init__(self, *args, fail_at, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.fail_at = 0, fail_at

    def collect(self, policy):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("reward server went away")
        return super().collect(policy)


def test_a_crash_during_collection_keeps_the_last_iterations_parameters(tmp_path):
    policy, sampler = make_tabular(TabularConfig())
    sampler = FailingSampler(sampler.mdp, fail_at=4)
    trainer = Trainer(policy, sampler, TrainerConfig(output_dir=str(tmp_path / "run"), iterations=10, checkpoint_every=100, **FAST))
    with pytest.raises(RuntimeError, match="reward server went away"):
        trainer.train()
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "iter_000003"
    saved = torch.load(checkpoint / "trainer.pt", weights_only=False)["policy"]["logits"]
    assert torch.equal(saved, trainer.policy.logits.detach())


def test_existing_run_and_missing_checkpoint_are_clear_errors(tmp_path):
    tabular_trainer(tmp_path, iterations=1).train()
    with pytest.raises(FileExistsError, match="already holds a run; resume it"):
        tabular_trainer(tmp_path, iterations=2).train()
    with pytest.raises(FileNotFoundError, match="cannot resume: .* holds no checkpoint"):
        tabular_trainer(tmp_path, "empty", iterations=2).train(resume=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eta": 0}, "eta must be a finite number > 0, got 0"),
        ({"loss": "ppo"}, "loss='ppo' is not supported; expected one of rebel, rloo, ppo_clip"),
        ({"pairs": "some"}, "pairs='some' is not supported"),
        ({"iterations": 0}, "iterations must be an integer >= 1, got 0"),
        ({"minibatch_size": 0}, "minibatch_size must be an integer >= 1, got 0"),
        ({"learning_rate": -1.0}, "learning_rate must be a finite number > 0"),
        ({"reward_normalization": "z"}, "reward_normalization='z' is not supported"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8' is not supported"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**overrides)


def test_learning_rate_schedules(tmp_path):
    rows = tabular_trainer(tmp_path, iterations=4, lr_schedule="linear", learning_rate=0.1).train()
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.1, 0.075, 0.05, 0.025])  # the rate each iteration used
    rows = tabular_trainer(tmp_path, "warm", iterations=4, warmup_iterations=2, learning_rate=0.1).train()
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.05, 0.1, 0.1, 0.1])
    assert rows[0]["iteration"] == 1


def test_batch_reward_normalisation_rescales_the_target(tmp_path):
    seen = []

    class Spy(Sampler):
        def collect(self, policy):
            batch = RolloutBatch(
                group=torch.tensor([0, 0, 1, 1]),
                reward=torch.tensor([1.0, 3.0, 5.0, 11.0]),
                mask=torch.ones(4, 1, dtype=torch.bool),
                data={"states": torch.zeros(4, 1, dtype=torch.long), "actions": torch.tensor([[0], [1], [0], [1]])},
            )
            seen.append(batch)
            return batch

    policy, _ = make_tabular(TabularConfig(env="bandit", num_actions=2))
    config = TrainerConfig(output_dir=str(tmp_path / "r"), iterations=1, reward_normalization="batch", **FAST)
    row = Trainer(policy, Spy(), config).train()[0]
    reward = torch.tensor([1.0, 3.0, 5.0, 11.0])
    target = (reward - reward.mean()) / reward.std(unbiased=False)
    # one epoch, one minibatch: the logged loss is the loss at theta_t, mean of squared normalised differences
    assert row["loss"] == pytest.approx((((target[0] - target[1]) ** 2 + (target[2] - target[3]) ** 2) / 2).item(), rel=1e-5)
    assert row["reward_mean"] == pytest.approx(5.0)  # metrics report the raw reward


@pytest.mark.parametrize(("entropy_weight", "divisor"), [(0.0, None), (0.1, 0.2)])
def test_a_soft_rewards_normalised_scale_is_at_least_eta_alpha(tmp_path, entropy_weight, divisor):
    """With ``batch.entropy_weight = alpha`` the trainer divides by max(spread, eta * alpha)."""
    reward = torch.tensor([1.0, 1.1, 5.0, 5.06])  # within-group spread 0.041, below eta * alpha = 0.2

    class Spy(Sampler):
        def collect(self, policy):
            return RolloutBatch(
                group=torch.tensor([0, 0, 1, 1]),
                reward=reward,
                mask=torch.ones(4, 1, dtype=torch.bool),
                data={"states": torch.zeros(4, 1, dtype=torch.long), "actions": torch.tensor([[0], [1], [0], [1]])},
                entropy_weight=entropy_weight,
            )

    policy, _ = make_tabular(TabularConfig(env="bandit", num_actions=2))
    config = TrainerConfig(output_dir=str(tmp_path / "r"), iterations=1, eta=2.0, reward_normalization="within_group", **FAST)
    row = Trainer(policy, Spy(), config).train()[0]
    centred = torch.tensor([-0.05, 0.05, -0.03, 0.03])
    target = centred / (divisor or centred.pow(2).mean().sqrt().item())
    assert row["loss"] == pytest.approx((((target[1] - target[0]) ** 2 + (target[3] - target[2]) ** 2) / 2).item(), rel=1e-4)


def test_policy_and_sampler_types_are_checked(tmp_path):
    policy, sampler = make_tabular(TabularConfig())
    with pytest.raises(TypeError, match="policy must be a rebel.Policy, got Linear"):
        Trainer(torch.nn.Linear(2, 2), sampler, TrainerConfig(output_dir=str(tmp_path)))
    with pytest.raises(TypeError, match="sampler must be a rebel.Sampler, got list"):
        Trainer(policy, [], TrainerConfig(output_dir=str(tmp_path)))


def test_budget_stops_within_one_iteration_and_drives_the_schedule(tmp_path):
    rows = tabular_trainer(tmp_path, iterations=1000, budget=3000, lr_schedule="linear", learning_rate=0.1).train()
    steps = [r["env_steps"] for r in rows]
    assert steps[-1] >= 3000 and steps[-2] < 3000  # never more than one iteration past the budget
    assert rows[1]["learning_rate"] == pytest.approx(0.1 * (1 - steps[0] / 3000))  # progress = env_steps / budget


def test_a_second_train_call_continues_in_process(tmp_path):
    trainer = tabular_trainer(tmp_path, iterations=2)
    trainer.train()
    trainer.config.iterations = 4
    rows = trainer.train()
    assert [r["iteration"] for r in rows] == [3, 4]
    assert [r["iteration"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_sampler_stats_may_not_overwrite_trainer_metrics(tmp_path):
    policy, sampler = make_tabular(TabularConfig())
    collect = sampler.collect

    def clashing(policy):
        batch = collect(policy)
        batch.stats["kl"] = 123.0
        return batch

    sampler.collect = clashing
    trainer = Trainer(policy, sampler, TrainerConfig(output_dir=str(tmp_path / "r"), iterations=1, **FAST))
    with pytest.raises(ValueError, match=r"the sampler's stats \['kl'\] would overwrite the trainer's metrics"):
        trainer.train()


def test_resume_trims_every_per_iteration_log(tmp_path):
    def log_extra(trainer, metrics):
        trainer.run.append_jsonl("extra.jsonl", [{"iteration": trainer.iteration, "x": 1}])
        if trainer.iteration == 3:
            trainer.request_stop()

    tabular_trainer(tmp_path, iterations=6, checkpoint_every=2, callbacks=[log_extra]).train()
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_000003").rename(run / "checkpoints" / "gone")  # as if the run died before writing it
    (run / "checkpoints" / "latest").write_text("iter_000002\n")
    tabular_trainer(tmp_path, iterations=2).train(resume=True)
    assert [r["iteration"] for r in read_metrics(run)] == [1, 2]
    assert [json.loads(line)["iteration"] for line in (run / "extra.jsonl").read_text().splitlines()] == [1, 2]
