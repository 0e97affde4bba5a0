"""The SB3-shaped agent: learning, budget, save/load, resume, errors, command line."""

import json
import re
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from rebel.cli import main
from rebel.control.agent import Rebel, resolve_config, run_config, settings_differences
from rebel.runs import read_metrics

FAST = {"progress": False, "report_to": "none", "plot": False}
# InvertedPendulum-v5 (MuJoCo): the trajectory variant balances it within ~20k steps
PENDULUM = {
    "eta": 0.1,
    "learning_rate": 1e-3,
    "epochs": 4,
    "minibatch_size": None,
    "reward_normalization": "none",
    "eval_every": 5,
    "eval_episodes": 3,
}


def test_trajectory_variant_learns_inverted_pendulum_within_the_budget(tmp_path):
    agent = Rebel("InvertedPendulum-v5", variant="trajectory", seed=0, output_dir=str(tmp_path / "run"), **PENDULUM, **FAST)
    agent.learn(25_000)
    rows = read_metrics(tmp_path / "run")
    evals = [r["eval_return"] for r in rows if "eval_return" in r]
    assert evals[0] < 100 and evals[-1] > 500
    assert "eval_return" in rows[-1]  # the final evaluation is in the last row
    assert all(r["start_log_ratio_max"] == 0.0 for r in rows)
    steps = [r["env_steps"] for r in rows]
    assert steps[-1] >= 25_000 and steps[-2] < 25_000  # the budget is overshot by at most one iteration
    assert agent.env_steps == steps[-1]


def test_mc_with_its_defaults_and_value_function_learns_cartpole(tmp_path):
    agent = Rebel("CartPole-v1", variant="mc", seed=0, output_dir=str(tmp_path / "run"), eval_every=2, eval_episodes=5, **FAST)
    assert agent.config.value_bootstrap and agent.config.horizon == 10
    assert agent.config.gamma == 0.993 and agent.config.value_epochs == 10  # the measured mc defaults (docs/control_tuning.md)
    agent.learn(100_000)
    rows = read_metrics(tmp_path / "run")
    evals = [r["eval_return"] for r in rows if "eval_return" in r]
    assert evals[0] < 200 and evals[-1] >= 475, evals  # 500 is the maximum
    assert rows[-1]["value_explained_variance"] > 0.5  # V fits the branch returns


def test_save_load_round_trip_and_predict(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    agent = Rebel(
        "Pendulum-v1",
        variant="trajectory",
        seed=3,
        output_dir=str(tmp_path / "run"),
        num_groups=2,
        segment_length=20,
        eval_episodes=1,
        **FAST,
    )
    agent.learn(200)
    obs = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    for path in (
        tmp_path / "run" / "model",
        agent.save(tmp_path / "agent.pt"),
        agent.save(tmp_path / "folder"),
    ):  # the run's own, a file, a folder
        loaded = Rebel.load(path, output_dir=str(tmp_path / "again"))
        assert np.array_equal(agent.predict(obs)[0], loaded.predict(obs)[0])
        for a, b in zip(agent.policy.state_dict().values(), loaded.policy.state_dict().values()):
            assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "run" / "model").iterdir()) == ["README.md", "agent.pt"]
    single, state = loaded.predict(obs[0])
    assert single.shape == (1,) and state is None
    assert loaded.evaluate(2) == agent.evaluate(2)
    with pytest.raises(ValueError, match="is not a rebel control agent"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        Rebel.load(tmp_path / "bad.pt")
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=f"^{run} is not a saved rebel control agent: {run / 'agent.pt'} does not exist"):
        Rebel.load(run)

    card = ModelCard.load(tmp_path / "run" / "model" / "README.md")
    last = read_metrics(tmp_path / "run")[-1]
    assert card.data.library_name == "rebel-rl" and card.data.tags == [
        "rebel-rl",
        "reinforcement-learning",
        "Pendulum-v1",
        "deep-reinforcement-learning",
    ]
    (result,) = card.data.eval_results
    assert (result.dataset_name, result.metric_type) == ("Pendulum-v1", "mean_reward")
    assert result.metric_value == f"{last['eval_return']:.2f} +/- {last['eval_return_std']:.2f}"
    assert "| variant | trajectory |" in card.text and "Rebel.load" in card.text
    best = ModelCard.load(agent.save(tmp_path / "best", results={"eval_return": 1.5, "eval_return_std": 0.25}) / "README.md")
    assert best.data.eval_results[0].metric_value == "1.50 +/- 0.25"  # what a best model's own evaluation gave
    record = json.loads((tmp_path / "run" / "best" / "best.json").read_text())  # the run's best/, written by the same save
    best = ModelCard.load(tmp_path / "run" / "best" / "README.md")
    assert best.data.eval_results[0].metric_value == f"{record['eval_return']:.2f} +/- {record['eval_return_std']:.2f}"

    pushed = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: pushed.append((repo_id, kw["private"], self.token)))
    upload = lambda self, **kw: pushed.append(sorted(p.name for p in Path(kw["folder_path"]).iterdir())) or "url"
    monkeypatch.setattr(HfApi, "upload_folder", upload)
    assert agent.push_to_hub("me/pendulum", private=False, token="hf_x") == "url"
    assert pushed == [("me/pendulum", False, "hf_x"), ["README.md", "agent.pt"]]


@pytest.mark.parametrize(
    ("variant", "extra"),
    [
        ("trajectory", {"segment_length": 25}),
        ("trajectory", {"segment_length": 25, "value_bootstrap": True, "eval_every": 1}),
        ("mc", {"horizon": 10, "value_bootstrap": True, "value_epochs": 2, "eval_every": 1}),
    ],
    ids=["trajectory", "trajectory-with-value", "mc-with-value"],
)
def test_resume_of_a_control_run_is_bit_identical(tmp_path, variant, extra):
    options = {"num_groups": 2, "eval_every": 2, "eval_episodes": 1, "epochs": 2, "minibatch_size": 2, **FAST, **extra}
    straight = Rebel("Hopper-v5", variant=variant, seed=1, output_dir=str(tmp_path / "a"), total_steps=1000, **options)
    straight.learn()
    first = Rebel("Hopper-v5", variant=variant, seed=1, output_dir=str(tmp_path / "b"), total_steps=1000, **options)
    first.learn(500)
    resumed = Rebel.from_run(tmp_path / "b")
    resumed.learn(resume=True)
    for a, b in zip(straight.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.config == run_config(tmp_path / "b")  # what a resume trains with
    fresh = resolve_config("Hopper-v5", variant, 1, str(tmp_path / "b"), total_steps=1000, **{**options, "eta": 0.25})
    assert settings_differences(run_config(tmp_path / "b"), fresh, ignore=["budget"]) == {"eta": (resumed.config.eta, 0.25)}
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k} for r in rows]
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))


def test_env_objects_and_bad_inputs(tmp_path):
    agent = Rebel(gym.make("CartPole-v1"), output_dir=str(tmp_path / "r"), **FAST)
    assert agent.config.env == "CartPole-v1" and agent.policy.discrete
    with pytest.raises(ValueError, match="cannot make environment 'HalfCheetah-v99'.*did you mean HalfCheetah-v5"):
        Rebel("HalfCheetah-v99")
    with pytest.raises(ValueError, match="variant='ppo' is not supported; expected one of trajectory, mc, critic"):
        Rebel("CartPole-v1", variant="ppo")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['hidden'\]"):
        Rebel("CartPole-v1", hidden=[3])
    with pytest.raises(ValueError, match="supports Box \\(continuous\\), Discrete, MultiDiscrete and MultiBinary actions"):
        Rebel(_DictActionEnv)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        agent.learn(0)
    with pytest.raises(ValueError, match=r"alpha \* eta must be <= 1 .* got alpha=0.5 and eta=4.0"):
        Rebel("Pendulum-v1", variant="critic", alpha=0.5, eta=4.0, tune_alpha=False)
    with pytest.raises(
        ValueError, match="value_bootstrap applies to the mc and trajectory variants .critic learns Q by TD., got variant=.critic."
    ):
        Rebel("Pendulum-v1", variant="critic", value_bootstrap=True)
    with pytest.raises(ValueError, match="reward_normalization='per_context' is not supported; expected one of none, batch, within_group"):
        Rebel("Pendulum-v1", reward_normalization="per_context")


def test_a_classic_control_video_renders_with_the_control_extras_pygame(tmp_path):
    import pygame  # noqa: F401 - the control (and test) extra installs it: gymnasium[classic-control]
    from PIL import Image

    agent = Rebel("CartPole-v1", variant="trajectory", output_dir=str(tmp_path / "api"), **FAST)
    gif = agent.record_video(str(tmp_path / "eval.gif"))
    with Image.open(gif) as image:
        assert image.n_frames > 5 and image.size == (600, 400)  # CartPole's own frame size, rendered by pygame


def test_a_video_without_pygame_is_refused_before_the_run_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pygame", None)  # as where the control extra's pygame is not installed
    message = "cannot render environment 'CartPole-v1': pygame is not installed; install it with pip install 'rebel-rl[control]'"
    agent = Rebel("CartPole-v1", variant="trajectory", output_dir=str(tmp_path / "api"), video=True, **FAST)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        agent.learn(100)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        agent.record_video(str(tmp_path / "eval.gif"))  # what rebel eval --video calls
    args = ["--env", "CartPole-v1", "--variant", "trajectory", "--video", "--total-steps", "100", "--output-dir", str(tmp_path / "cli")]
    assert main(["train", "control", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"rebel train control: error: {message}\n"
    assert sorted(tmp_path.iterdir()) == []


class _DictActionEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.Dict({"a": gym.spaces.Discrete(2)})


def test_command_line_train_eval_and_resume(tmp_path, capsys):
    run = tmp_path / "cli"
    args = [
        "train",
        "control",
        "--env",
        "CartPole-v1",
        "--variant",
        "trajectory",
        "--total-steps",
        "1500",
        "--seed",
        "2",
        "--output-dir",
        str(run),
        "--num-groups",
        "2",
        "--eval-every",
        "0",
        "--eval-episodes",
        "2",
        "--no-progress",
        "--report-to",
        "none",
    ]
    assert main(args) == 0
    assert "CartPole-v1 (trajectory)" in capsys.readouterr().out
    config = (run / "config.yaml").read_text()
    assert "variant: trajectory" in config and "budget: 1500.0" in config
    assert main(["train", "control", "--resume", str(run), "--total-steps", "3000", "--no-progress"]) == 0
    assert read_metrics(run)[-1]["env_steps"] >= 3000
    assert main(["eval", str(run), "--episodes", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["episodes"] == 2 and result["eval_return"] > 0 and result["model"] == "last"
    assert json.loads(Path(result["output"]).read_text())["eval_return"] == result["eval_return"]
    assert main(["train", "control", "--env", "NoSuchEnv-v0", "--output-dir", str(tmp_path / "x")]) == 2
    assert "cannot make environment 'NoSuchEnv-v0'" in capsys.readouterr().err


def test_critic_is_the_default_variant(tmp_path):
    agent = Rebel("Pendulum-v1", output_dir=str(tmp_path / "r"), **FAST)
    assert agent.config.variant == "critic" and agent.config.num_groups == 4096
    assert agent.config.eta == 2.0 and agent.config.reward_normalization == "within_group"
    assert not agent.policy.normalize_observations and agent.policy.state_dependent_std


def test_critic_keeps_a_fixed_alpha_by_default_and_tunes_it_within_one_over_eta_on_request(tmp_path):
    agent = Rebel("Hopper-v5", seed=0, output_dir=str(tmp_path / "run"), **FAST)
    sampler = agent._make_sampler()
    assert (agent.config.alpha, agent.config.tune_alpha) == (0.1, False)
    assert (sampler.alpha, sampler.tune_alpha) == (0.1, False)
    tuned = Rebel("Hopper-v5", seed=0, alpha=0.2, tune_alpha=True, output_dir=str(tmp_path / "tuned"), **FAST)._make_sampler()
    assert (tuned.alpha, tuned.tune_alpha, tuned.target_entropy, tuned.max_alpha) == (0.2, True, -3.0, 0.5)  # 3 action dims, eta 2
    steep = Rebel(
        "Hopper-v5", seed=0, eta=10.0, tune_alpha=True, target_entropy=-1.0, output_dir=str(tmp_path / "steep"), **FAST
    )._make_sampler()
    assert (steep.alpha, steep.max_alpha, steep.target_entropy) == (0.1, 0.1, -1.0)  # the start is capped at 1 / eta too
    with pytest.raises(ValueError, match=r"alpha \* eta must be <= 1 .* got alpha=0.1 and eta=20.0"):
        Rebel("Hopper-v5", seed=0, eta=20.0, output_dir=str(tmp_path / "too-steep"), **FAST)  # the fixed default too
    assert Rebel("Hopper-v5", variant="mc", output_dir=str(tmp_path / "mc"), **FAST).config.tune_alpha is False
    control = agent.config.adapter_settings()
    del control["tune_alpha"]  # a config written before the option existed
    old = Rebel._from_configs({**control, "alpha": 0.0}, agent.config.trainer_settings(), None, {})
    assert (old.config.alpha, old.config.tune_alpha) == (0.0, False)  # so that such a run resumes as it started
    control["tune_alpha"] = True  # a run saved while tuning was the default resumes tuned
    was_tuned = Rebel._from_configs({**control, "alpha": 0.2}, agent.config.trainer_settings(), None, {})
    assert (was_tuned.config.alpha, was_tuned.config.tune_alpha) == (0.2, True)


def test_value_hidden_sizes_shape_the_value_network_and_bad_sizes_are_refused(tmp_path):
    def value_layer_sizes(**options):
        agent = Rebel("Pendulum-v1", variant="mc", seed=0, output_dir=str(tmp_path / "run"), **options, **FAST)
        return [layer.out_features for layer in agent._make_value_function().net if isinstance(layer, torch.nn.Linear)]

    assert value_layer_sizes() == [64, 64, 1]  # the policy's sizes
    assert value_layer_sizes(value_hidden_sizes=[32, 16]) == [32, 16, 1]
    assert value_layer_sizes(hidden_sizes=[8]) == [8, 1]
    with pytest.raises(ValueError, match=r"value_hidden_sizes must be a non-empty list of sizes >= 1, got \[64, 0\]"):
        Rebel("Pendulum-v1", variant="mc", value_hidden_sizes=[64, 0])


def test_value_targets_are_normalised_by_default_but_not_in_runs_saved_before_the_option(tmp_path):
    agent = Rebel("Pendulum-v1", variant="mc", seed=0, output_dir=str(tmp_path / "run"), **FAST)
    assert agent._make_value_function().normalize_targets is True
    off = Rebel("Pendulum-v1", variant="mc", seed=0, value_normalize_targets=False, output_dir=str(tmp_path / "off"), **FAST)
    assert off._make_value_function().normalize_targets is False
    control = agent.config.adapter_settings()
    del control["value_normalize_targets"]  # a config written before the option existed
    old = Rebel._from_configs(control, agent.config.trainer_settings(), None, {})
    assert old.config.value_normalize_targets is False  # so that such a run resumes as it started


def test_state_stride_reaches_the_mc_sampler_and_a_bad_one_is_refused(tmp_path):
    def sampler(**options):
        return Rebel("Pendulum-v1", variant="mc", seed=0, output_dir=str(tmp_path / "run"), **options, **FAST)._make_sampler()

    assert sampler().state_stride == 10  # the default, and what runs saved before the option used
    assert sampler(state_stride=30).state_stride == 30
    with pytest.raises(ValueError, match="state_stride must be an integer >= 1, got 0"):
        sampler(state_stride=0)


def test_learning_starts_is_chosen_per_env_and_an_explicit_value_wins():
    assert resolve_config("HalfCheetah-v5").learning_starts == 20_000  # docs/control_tuning.md: upright on 5 of 5 seeds
    assert resolve_config("Hopper-v5").learning_starts == 5000
    assert resolve_config("HalfCheetah-v5", learning_starts=1000).learning_starts == 1000


def test_a_long_run_says_up_front_roughly_how_long_it_takes():
    from rebel.control.cli import duration_note

    note = duration_note("HalfCheetah-v5", "critic", 1_000_000)
    assert note is not None and note.startswith("HalfCheetah-v5 (critic): 1000000 env steps, roughly 2.5 h on one CPU core")
    assert duration_note("Hopper-v5", "mc", 3_000_000).startswith("Hopper-v5 (mc): 3000000 env steps, roughly 17 min on one CPU core")
    assert duration_note("InvertedPendulum-v5", "trajectory", 100_000) is None  # the embedded default: about 2 minutes


def test_a_bare_control_command_trains_the_embedded_default(tmp_path, capsys):
    run = tmp_path / "bare"
    assert main(["train", "control", "--total-steps", "1000", "--output-dir", str(run), "--no-progress", "--report-to", "none"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rebel train control: no --env, so the embedded default: InvertedPendulum-v5 (trajectory), 1000 env steps\n")
    config = (run / "config.yaml").read_text()
    assert "env: InvertedPendulum-v5" in config and "variant: trajectory" in config and "eval_every: 5" in config
    assert "roughly" not in out  # a short run prints no duration note
