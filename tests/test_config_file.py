"""``rebel train NAME --config FILE``: a new run from a YAML file in config.yaml's format,
the options given on the command line over it; a bad file is one line naming the key and file."""

import argparse

import pytest
import yaml

from rebel.cli import main
from rebel.runs import read_config, read_metrics

QUIET = ["--no-progress", "--report-to", "none", "--no-plot"]


def same_settings(old, new):
    """The two runs' config.yaml, equal but for the run folder."""
    a, b = read_config(old), read_config(new)
    assert (a["trainer"].pop("output_dir"), b["trainer"].pop("output_dir")) == (str(old), str(new))
    assert a == b


def one_line(capsys, text):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err, err
    return err


def test_tabular_run_from_its_config_is_the_same_run(tmp_path, capsys):
    first = tmp_path / "first"
    settings = ["--iterations", "3", "--eta", "0.5", "--epochs", "2", "--num-states", "5", "--seed", "3", *QUIET]
    assert main(["train", "tabular", *settings, "--output-dir", str(first)]) == 0
    again = tmp_path / "again"
    assert main(["train", "tabular", "--config", str(first / "config.yaml"), "--output-dir", str(again)]) == 0
    same_settings(first, again)
    assert [r["expected_return"] for r in read_metrics(first)] == [r["expected_return"] for r in read_metrics(again)]
    # an option given on the command line overrides the file's
    other = tmp_path / "other"
    assert main(["train", "tabular", "--config", str(first / "config.yaml"), "--eta", "2", "--output-dir", str(other)]) == 0
    assert read_config(other)["trainer"]["eta"] == 2.0 and read_config(other)["trainer"]["epochs"] == 2
    # without --output-dir the file's folder is named, and it holds a run
    capsys.readouterr()
    assert main(["train", "tabular", "--config", str(first / "config.yaml")]) == 2
    one_line(capsys, "already holds a run")


def test_a_partial_file_keeps_the_command_defaults(tmp_path):
    (tmp_path / "mine.yaml").write_text("trainer:\n  eta: 0.25\ntabular:\n  horizon: 5\n")
    assert (
        main(
            ["train", "tabular", "--config", str(tmp_path / "mine.yaml"), "--iterations", "1", "--output-dir", str(tmp_path / "r"), *QUIET]
        )
        == 0
    )
    config = read_config(tmp_path / "r")
    assert (config["trainer"]["eta"], config["tabular"]["horizon"]) == (0.25, 5)
    assert (config["trainer"]["learning_rate"], config["trainer"]["epochs"]) == (0.1, 4)  # rebel train tabular's defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trainer:\n  etaa: 1.0\n", "unknown key trainer.etaa (not a TrainerConfig setting)"),
        ("tabular:\n  horizon: 5\n  colour: red\n", "unknown key tabular.colour (not a TabularConfig setting)"),
        ("trainer: {}\ntext:\n  max_new_tokens: 4\n", "unknown section 'text'; expected adapter, trainer, tabular"),
        ("adapter: diffusion\ntrainer: {}\n", "adapter 'diffusion', not 'tabular': it configures rebel train diffusion"),
        ("trainer: [1, 2]\n", "section 'trainer' must be a mapping of settings"),
        ("trainer:\n  eta: [\n", "line 3: malformed YAML"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_key_and_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "tabular", "--config", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = one_line(capsys, message)
    assert err.startswith(f"rebel train tabular: error: --config {path}")
    assert not (tmp_path / "run").exists()


def test_missing_file_and_resume_are_refused(tmp_path, capsys):
    assert main(["train", "tabular", "--config", str(tmp_path / "none.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    one_line(capsys, f"error: --config {tmp_path / 'none.yaml'} does not exist")
    assert main(["train", "tabular", "--config", "a.yaml", "--resume", str(tmp_path)]) == 2
    one_line(capsys, "--config a.yaml conflicts with --resume")
    assert not (tmp_path / "run").exists()


def test_text_run_from_its_config(tmp_path):
    first = tmp_path / "first"
    small = ["--pretrain-steps", "5", "--num-prompts", "16", "--prompts-per-iteration", "2", "--iterations", "1", "--max-new-tokens", "6"]
    assert main(["train", "text", *small, "--kl-coef", "0.05", "--lora-r", "0", *QUIET, "--output-dir", str(first)]) == 0
    again = tmp_path / "again"
    assert main(["train", "text", "--config", str(first / "config.yaml"), "--output-dir", str(again)]) == 0
    same_settings(first, again)
    assert read_config(again)["text"]["max_new_tokens"] == 6 and read_config(again)["task"]["pretrain_steps"] == 5


def test_diffusion_config_reproduces_the_settings(tmp_path):
    """What ``rebel train diffusion`` resolves (and the trainer writes to config.yaml), resolved
    again from that file: the same (the pipeline's warm-up is not run)."""
    from rebel.diffusion.cli import EMBEDDED_DEFAULTS

    given = ["--vae-steps", "7", "--num-inference-steps", "3", "--save-images", "--eta", "0.3", "--output-dir", str(tmp_path / "a")]
    config, source, task = _diffusion(given)
    written = {
        "adapter": "diffusion",
        "diffusion": config.adapter_settings(),
        "source": vars(source),
        "task": vars(task),
        "trainer": config.trainer_settings(),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    again = _diffusion(["--config", str(tmp_path / "config.yaml"), "--output-dir", str(tmp_path / "b")])
    assert again[0].adapter_settings() == config.adapter_settings() and (vars(again[1]), vars(again[2])) == (vars(source), vars(task))
    assert {**again[0].trainer_settings(), "output_dir": None} == {**config.trainer_settings(), "output_dir": None}
    assert (config.iterations, config.eta, task.vae_steps, config.save_images) == (EMBEDDED_DEFAULTS["iterations"], 0.3, 7, True)
    # a file naming a model: the embedded defaults do not apply (DiffusionConfig's own do)
    (tmp_path / "sd.yaml").write_text("source:\n  model: some/model\n")
    assert _diffusion(["--config", str(tmp_path / "sd.yaml")])[0].iterations != EMBEDDED_DEFAULTS["iterations"]


def _diffusion(argv):
    from rebel.diffusion.cli import EMBEDDED_DEFAULTS, DiffusionSource, add_arguments
    from rebel.diffusion.trainer import DiffusionConfig
    from rebel.hf.cli import resolve_model_run
    from rebel_envs.diffusion_tasks import ShapesTaskConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--resume", default=None)
    add_arguments(parser)
    return resolve_model_run(parser.parse_args(argv), "diffusion", DiffusionConfig, DiffusionSource, ShapesTaskConfig, EMBEDDED_DEFAULTS)


def test_control_run_from_its_config(tmp_path, capsys):
    first = tmp_path / "first"
    args = ["--env", "CartPole-v1", "--variant", "trajectory", "--total-steps", "600", "--group-size", "2", "--num-groups", "2"]
    args += ["--eval-every", "0", "--eval-episodes", "1", "--seed", "4", "--hidden-sizes", "16", "16", *QUIET]
    assert main(["train", "control", *args, "--output-dir", str(first)]) == 0
    again = tmp_path / "again"
    assert main(["train", "control", "--config", str(first / "config.yaml"), "--output-dir", str(again)]) == 0
    same_settings(first, again)
    other = tmp_path / "other"
    assert main(["train", "control", "--config", str(first / "config.yaml"), "--seed", "5", "--output-dir", str(other)]) == 0
    assert read_config(other)["trainer"]["seed"] == 5 and read_config(other)["control"]["hidden_sizes"] == [16, 16]
    (tmp_path / "bad.yaml").write_text("control:\n  envv: CartPole-v1\n")
    capsys.readouterr()
    assert main(["train", "control", "--config", str(tmp_path / "bad.yaml"), "--output-dir", str(tmp_path / "bad")]) == 2
    one_line(capsys, f"--config {tmp_path / 'bad.yaml'}: unknown key control.envv (not a ControlConfig setting)")
