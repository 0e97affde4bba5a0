"""``rebel train text``: the embedded default, resume, and user models, prompts and rewards."""

import json

import pytest
import torch

from rebel.cli import main
from rebel.runs import latest_checkpoint, read_config, read_metrics

QUIET = ["--no-progress", "--no-tensorboard", "--no-plot"]


def test_help_lists_the_text_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "text", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--model",
        "--dataset",
        "--reward",
        "--num-generations",
        "--max-new-tokens",
        "--eta",
        "--use-lora",
        "--kl-coef",
        "--resume DIR",
    ):
        assert option in out
    assert "(default: 1e-06)" not in out and "(default: 0.001)" in out  # the embedded task's learning rate


def test_embedded_task_trains_and_resumes_exactly(tmp_path, capsys):
    small = ["--pretrain-steps", "20", "--num-prompts", "64", "--prompts-per-iteration", "4", "--checkpoint-every", "100", *QUIET]
    assert main(["train", "text", "--output-dir", str(tmp_path / "straight"), "--iterations", "4", *small]) == 0
    out = capsys.readouterr().out
    assert "reward_mean" in out and "held-out prompts" in out and "model saved to" in out
    assert main(["train", "text", "--output-dir", str(tmp_path / "split"), "--iterations", "2", *small]) == 0
    assert (tmp_path / "split" / "base_model" / "config.json").is_file()
    assert main(["train", "text", "--resume", str(tmp_path / "split"), "--iterations", "4", "--no-progress"]) == 0
    straight, split = (
        torch.load(latest_checkpoint(tmp_path / d) / "trainer.pt", weights_only=False)["policy"] for d in ("straight", "split")
    )
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    assert [r["iteration"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4]
    assert main(["train", "text", "--output-dir", str(tmp_path / "split"), *small]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_user_model_dataset_and_reward(tiny_lm, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{k}{k}:", "target": str(k)}) + "\n" for k in range(10)))
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(
        "def starts_right(prompts, completions, target, **kw):\n    return [float(c[:1] == t) for c, t in zip(completions, target)]\n"
    )
    args = [
        "train",
        "text",
        "--model",
        tiny_lm,
        "--dataset",
        str(prompts),
        "--reward",
        f"{rewards}:starts_right",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    assert main([*args, "--iterations", "2", "--max-new-tokens", "4", *QUIET]) == 0
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and "rewards/starts_right" in rows[0]
    config = read_config(tmp_path / "run")
    assert config["source"]["model"] == tiny_lm and config["trainer"]["learning_rate"] == 1e-6  # TextConfig's defaults with --model
    assert config["text"]["max_new_tokens"] == 4 and config["trainer"]["iterations"] == 2
    assert main(["train", "text", "--model", tiny_lm, "--dataset", str(prompts), "--output-dir", str(tmp_path / "x"), *QUIET]) == 2
    assert "--dataset needs --reward" in capsys.readouterr().err
    assert main(["train", "text", "--model", tiny_lm, "--reward", "os.path:nothing_here", "--output-dir", str(tmp_path / "y"), *QUIET]) == 2
    assert "os.path has no function 'nothing_here'" in capsys.readouterr().err
