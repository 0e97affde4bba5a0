import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rebel.cli import main
from rebel.runs import latest_checkpoint, read_metrics


def test_import_rebel_loads_torch_and_numpy_only():
    code = (
        "import sys, rebel\n"
        "heavy = {'accelerate', 'yaml', 'matplotlib', 'tensorboard', 'gymnasium', 'mujoco', 'transformers', 'peft',"
        " 'diffusers', 'datasets', 'envs', 'scipy', 'pandas'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "plot" in out
    with pytest.raises(SystemExit):
        main(["train", "tabular", "--help"])
    out = capsys.readouterr().out
    assert "--resume DIR" in out and "--eta FLOAT" in out and "(default: 60)" in out
    out = " ".join(out.split())
    assert "none: the whole batch (default: None)" in out  # where the help gives none, the None default is still shown
    assert "or none (as TRL's report_to) (default: ['tensorboard'])" in out  # a list default, made by its factory
    with pytest.raises(SystemExit):
        main(["train", "control", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "log pi_t (default 0.1) --tune-alpha" in out  # a variant-dependent default, stated once
    assert "critic: Q network sizes (default: [256, 256])" in out
    # the trainer options show each variant's default, the default variant first
    assert "policy (default: critic 2.0, trajectory 0.5, mc 0.3)" in out
    assert "(default: critic within_group, trajectory batch, mc within_group)" in out
    assert "(default: critic 4096, trajectory 8, mc 256)" in out


def tabular(tmp_path, name, *extra):
    return main(["train", "tabular", "--output-dir", str(tmp_path / name), "--no-progress", "--report-to", "none", *extra])


def test_train_tabular_learns_and_resume_continues_exactly(tmp_path, capsys):
    assert tabular(tmp_path, "straight", "--iterations", "8", "--checkpoint-every", "100") == 0
    assert "expected return" in capsys.readouterr().out
    rows = read_metrics(tmp_path / "straight")
    assert rows[-1]["expected_return"] > rows[0]["expected_return"] + 1.0
    assert tabular(tmp_path, "split", "--iterations", "4") == 0
    assert main(["train", "tabular", "--resume", str(tmp_path / "split"), "--iterations", "8", "--no-progress"]) == 0
    straight = torch.load(latest_checkpoint(tmp_path / "straight") / "trainer.pt", weights_only=False)["policy"]["logits"]
    split = torch.load(latest_checkpoint(tmp_path / "split") / "trainer.pt", weights_only=False)["policy"]["logits"]
    assert torch.equal(straight, split)


def test_bad_values_give_clear_errors(tmp_path, capsys):
    assert tabular(tmp_path, "bad", "--eta", "-1") == 2
    assert "eta must be a finite number > 0, got -1.0" in capsys.readouterr().err
    assert tabular(tmp_path, "bad2", "--env", "maze") == 2
    assert "env='maze' is not supported; expected 'mdp' or 'bandit'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tabular(tmp_path, "bad3", "--epochs", "two")
    assert "argument --epochs: invalid int value: 'two'" in capsys.readouterr().err
    assert main(["train", "tabular", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_plot_overlays_runs(tmp_path, capsys):
    for name in ("a", "b"):
        tabular(tmp_path, name, "--iterations", "3", "--no-plot")
    out = tmp_path / "cmp.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "expected_return", "--output", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    out.unlink()
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "nothing", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"rebel plot: error: --metric 'nothing' is not in the metrics of {tmp_path / 'a'}, {tmp_path / 'b'}; the runs have "
    )
    assert err.count("\n") == 1 and "expected_return, " in err and "iteration, " in err and not out.exists()
    assert main(["plot", str(tmp_path / "a"), "--x", "minutes", "--output", str(out)]) == 2
    assert "rebel plot: error: --x 'minutes' is not in the metrics of" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nowhere"), "--output", str(out)]) == 2
    assert capsys.readouterr().err == f"rebel plot: error: {tmp_path / 'nowhere'} has no metrics.jsonl rows to plot\n"


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    import rebel

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"rebel-rl {version('rebel-rl')}\n"
    assert rebel.__version__ == version("rebel-rl") and "__version__" in dir(rebel)


def test_a_failed_command_removes_only_what_it_made(tmp_path):
    from rebel.runs import claimed_run_folder as clean_up_on_failure

    fresh = tmp_path / "runs" / "new"  # its parent "runs" is made by the command too
    with pytest.raises(KeyboardInterrupt), clean_up_on_failure(fresh):
        (fresh / "base_model").mkdir(parents=True)
        (fresh / "base_model" / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert sorted(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    (old / "data").mkdir()
    with pytest.raises(ValueError, match="late"), clean_up_on_failure(old):
        (old / "checkpoints").mkdir()
        (old / "config.yaml").write_text("{}")
        (old / "data" / "x").write_text("")  # inside a folder that was there: kept with it
        raise ValueError("late")
    assert sorted(p.name for p in old.iterdir()) == ["data", "notes.txt"] and (old / "data" / "x").exists()  # and no .lock
    with pytest.raises(ValueError, match="after a checkpoint"), clean_up_on_failure(fresh):
        (fresh / "checkpoints" / "iter_000001").mkdir(parents=True)
        raise ValueError("after a checkpoint")
    assert (fresh / "checkpoints" / "iter_000001").is_dir()  # a run that can resume stays


def test_console_script_runs():
    script = Path(sys.executable).with_name("rebel")  # installed beside the interpreter
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "usage: rebel" in out.stdout


def test_the_reward_summary_compares_windows_that_do_not_overlap():
    from rebel.hf.cli import reward_summary

    rows = [{"iteration": i, "reward_mean": float(i)} for i in range(1, 5)]
    assert reward_summary(rows, 5, "runs/x") == "reward_mean 1.500 (iterations 1-2) -> 3.500 (iterations 3-4); run folder runs/x"
    many = [{"iteration": i, "reward_mean": float(i)} for i in range(1, 21)]
    assert reward_summary(many, 5, "r").startswith("reward_mean 3.000 (iterations 1-5) -> 18.000 (iterations 16-20)")
    assert reward_summary(rows[:1], 5, "r").startswith("reward_mean 1.000 (iterations 1-1) -> 1.000 (iterations 1-1)")
