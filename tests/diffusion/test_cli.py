"""``rebel train diffusion``: the embedded task end to end (shortened), resume, errors."""

from rebel.cli import main
from rebel.runs import read_metrics

QUICK = [
    "--image-size", "8", "--min-radius", "1", "--max-radius", "3", "--width", "8",
    "--vae-steps", "3", "--unet-steps", "3", "--pretrain-batch", "4",
    "--iterations", "1", "--prompts-per-iteration", "2", "--num-generations", "2",
    "--num-inference-steps", "2", "--no-progress", "--no-plot", "--no-tensorboard",
]  # fmt: skip


def test_embedded_run_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "diffusion", *QUICK, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fixed-seed evaluation" in printed and "reward_mean" in printed
    assert (out / "base_pipeline" / "model_index.json").is_file()
    assert (out / "images" / "iter_0001.png").is_file() and (out / "lora").is_dir()
    assert main(["train", "diffusion", "--resume", str(out), "--iterations", "2"]) == 0
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2]
    assert main(["train", "diffusion", *QUICK, "--output-dir", str(out)]) == 2  # a run is already there


def test_unknown_reward_and_missing_model_are_clear_errors(tmp_path, capsys):
    assert main(["train", "diffusion", "--model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "a")]) == 2
    assert "diffusers format" in capsys.readouterr().err
    assert main(["train", "diffusion", *QUICK, "--reward", "sharpness", "--output-dir", str(tmp_path / "b")]) == 2
    assert "--reward sharpness" in capsys.readouterr().err
