"""``rebel train diffusion``: the embedded task end to end (shortened), resume, errors."""

import pytest

from rebel.cli import main
from rebel.runs import read_metrics

QUICK = [
    "--image-size", "8", "--min-radius", "1", "--max-radius", "3", "--width", "8",
    "--vae-steps", "3", "--unet-steps", "3", "--pretrain-batch", "4",
    "--iterations", "1", "--prompts-per-iteration", "2", "--num-generations", "2",
    "--num-inference-steps", "2", "--no-progress", "--no-plot", "--report-to", "none",
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


def one_line_error(capsys, message: str) -> None:
    """stderr ends with the command's one error line, which holds ``message``; no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("rebel train diffusion: error: ") and message in err.splitlines()[-1], err


def test_bad_inputs_are_refused_before_the_pipeline_warms_up(tmp_path, capsys):
    """Without --model the embedded pipeline would warm up into <run>/base_pipeline first."""
    nowhere = tmp_path / "nowhere"
    assert main(["train", "diffusion", "--model", str(nowhere), "--output-dir", str(tmp_path / "a")]) == 2
    one_line_error(capsys, f"error: Stable Diffusion pipeline '{nowhere}' does not exist; expected a folder in diffusers format")
    assert main(["train", "diffusion", *QUICK, "--reward", "sharpness", "--output-dir", str(tmp_path / "b")]) == 2
    one_line_error(capsys, "error: --reward sharpness: expected aesthetic, compressibility")
    (tmp_path / "prompts.txt").write_text("\n  \n")
    assert main(["train", "diffusion", *QUICK, "--prompts", str(tmp_path / "prompts.txt"), "--output-dir", str(tmp_path / "c")]) == 2
    one_line_error(capsys, f"error: prompt file '{tmp_path / 'prompts.txt'}' holds no prompts")
    assert main(["train", "diffusion", *QUICK, "--prompts", str(nowhere), "--output-dir", str(tmp_path / "d")]) == 2
    one_line_error(capsys, f"error: prompt file '{nowhere}' does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_a_run_that_fails_later_leaves_no_half_made_folder(tiny_pipe, tmp_path, capsys, monkeypatch):
    (tmp_path / "flags.py").write_text("def bright(images, prompts):\n    return [bool(i.mean() > 0.5) for i in images]\n")
    reward = ["--reward", f"{tmp_path / 'flags.py'}:bright"]
    assert main(["train", "diffusion", "--model", tiny_pipe, *QUICK, *reward, "--output-dir", str(tmp_path / "runs" / "a")]) == 2
    one_line_error(capsys, "error: reward function 'bright' returned a bool (")
    assert not (tmp_path / "runs").exists()

    def warm_up_fails(task, save_to, progress):
        save_to.mkdir(parents=True)
        (save_to / "model_index.json").write_text("{}")
        raise ValueError("warm-up diverged")

    monkeypatch.setattr("rebel_envs.diffusion_tasks.make_shapes_pipeline", warm_up_fails)
    assert main(["train", "diffusion", *QUICK, "--output-dir", str(tmp_path / "embedded")]) == 2
    one_line_error(capsys, "error: warm-up diverged")
    assert not (tmp_path / "embedded").exists()  # no half-made base_pipeline


def test_the_api_refuses_the_same_inputs_with_the_same_text(tmp_path):
    from rebel.diffusion import DiffusionTrainer, brightness

    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"^Stable Diffusion pipeline '{nowhere}' does not exist; expected a folder in diffusers"):
        DiffusionTrainer(str(nowhere), brightness, "animals")
    (tmp_path / "prompts.txt").write_text("")
    with pytest.raises(ValueError, match=f"^prompt file '{tmp_path / 'prompts.txt'}' holds no prompts$"):
        DiffusionTrainer(str(nowhere), brightness, str(tmp_path / "prompts.txt"))  # before the pipeline
