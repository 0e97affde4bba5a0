"""``rebel train text``: the embedded default, resume, and user models, prompts and rewards."""

import json
import sys

import pytest
import torch

from rebel.cli import main
from rebel.runs import latest_checkpoint, read_config, read_metrics

QUIET = ["--no-progress", "--report-to", "none", "--no-plot"]


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
    assert main(["train", "text", "--model", tiny_lm, "--reward", "os.path:nothing_here", "--output-dir", str(tmp_path / "y"), *QUIET]) == 2
    assert "os.path has no function 'nothing_here'" in capsys.readouterr().err


def one_line_error(capsys, message: str) -> None:
    """stderr ends with the command's one error line, which holds ``message``; no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("rebel train text: error: ") and message in err.splitlines()[-1], err


BAD_INPUTS = {
    "model": "error: model '{tmp}/nowhere' does not exist; expected a model folder or a hub id (org/name)",
    "unloadable": "error: cannot load the model '{tmp}/empty_model' (",  # a folder without a model: the load itself fails
    "empty": "error: --dataset {tmp}/empty.jsonl is empty; expected prompts in a 'prompt' column",
    "broken": "error: --dataset {tmp}/broken.jsonl: cannot read it (ArrowInvalid: JSON parse error",
    "missing": "error: --dataset {tmp}/missing.jsonl does not exist; expected a .json, .jsonl, .csv, .parquet file",
    "no_prompt": "error: --dataset {tmp}/no_prompt.jsonl: the dataset needs a 'prompt' column; it has ['question']",
    "no_reward": "error: --dataset {tmp}/prompts.jsonl needs --reward",
    "no_module": "error: --reward no_such_module:score: cannot import no_such_module (ModuleNotFoundError: No module named",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_refused_before_the_model_is_built(tmp_path, capsys, case):
    """The embedded task would warm up its model into <run>/base_model first: a check that
    comes too late leaves that folder behind (and takes a minute)."""
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "12:", \n')
    (tmp_path / "no_prompt.jsonl").write_text('{"question": "12:"}\n')
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "12:"}\n')
    (tmp_path / "empty_model").mkdir()
    reward = ["--reward", "os.path:join"]
    given = {
        "model": ["--model", str(tmp_path / "nowhere")],
        "unloadable": ["--model", str(tmp_path / "empty_model"), "--dataset", str(tmp_path / "prompts.jsonl"), *reward],
        "empty": ["--dataset", str(tmp_path / "empty.jsonl"), *reward],
        "broken": ["--dataset", str(tmp_path / "broken.jsonl"), *reward],
        "missing": ["--dataset", str(tmp_path / "missing.jsonl"), *reward],
        "no_prompt": ["--dataset", str(tmp_path / "no_prompt.jsonl"), *reward],
        "no_reward": ["--dataset", str(tmp_path / "prompts.jsonl")],
        "no_module": ["--reward", "no_such_module:score"],
    }[case]
    assert main(["train", "text", *given, "--output-dir", str(tmp_path / "run"), *QUIET]) == 2
    one_line_error(capsys, BAD_INPUTS[case].format(tmp=tmp_path))
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_later_leaves_no_half_made_folder(tiny_lm, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{k}{k}:"}) + "\n" for k in range(4)))
    (tmp_path / "words.py").write_text("def words(prompts, completions, **kw):\n    return ['good' for _ in completions]\n")
    (tmp_path / "flags.py").write_text("def flags(prompts, completions, **kw):\n    return [len(c) > 1 for c in completions]\n")
    args = ["train", "text", "--model", tiny_lm, "--dataset", str(prompts), "--max-new-tokens", "2", *QUIET]
    assert main([*args, "--reward", f"{tmp_path / 'words.py'}:words", "--output-dir", str(tmp_path / "runs" / "a")]) == 2
    one_line_error(capsys, "error: reward function 'words' returned a str ('good'); expected one float per completion")
    assert not (tmp_path / "runs").exists()  # the run folder and the parent the command made
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main([*args, "--reward", f"{tmp_path / 'flags.py'}:flags", "--output-dir", str(kept)]) == 2
    one_line_error(capsys, "error: reward function 'flags' returned a bool (True); expected one float per completion")
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]  # a folder that was there keeps what it held

    def warm_up_fails(task, save_to, progress):
        (save_to / "config.json").parent.mkdir(parents=True)
        (save_to / "config.json").write_text("{}")
        raise ValueError("warm-up diverged")

    monkeypatch.setattr("rebel_envs.text_tasks.make_sorting_model", warm_up_fails)
    assert main(["train", "text", "--output-dir", str(tmp_path / "embedded"), *QUIET]) == 2
    one_line_error(capsys, "error: warm-up diverged")
    assert not (tmp_path / "embedded").exists()  # no half-made base_model


def test_the_api_refuses_the_same_inputs_with_the_same_text(tmp_path):
    from rebel.text import TextTrainer

    def score(prompts, completions, **kw):
        return [0.0] * len(completions)

    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"^model '{nowhere}' does not exist; expected a model folder or a hub id"):
        TextTrainer(nowhere, score, ["12:"])
    with pytest.raises(ValueError, match=r"^the dataset needs a 'prompt' column; it has \['question'\]$"):
        TextTrainer(nowhere, score, __import__("datasets").Dataset.from_list([{"question": "12:"}]))  # before the model
    with pytest.raises(FileNotFoundError, match=f"^reward model '{nowhere}' does not exist"):
        TextTrainer(nowhere, [score, nowhere], ["12:"])


def test_an_embedded_lora_run_saves_an_adapter_that_transformers_loads_with_its_card(tmp_path, monkeypatch, capsys):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    argv = ["train", "text", "--output-dir", str(tmp_path / "run"), "--iterations", "1", "--pretrain-steps", "20", "--num-prompts", "16",
            "--prompts-per-iteration", "2", "--use-lora", "--lora-r", "2", *QUIET]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["/venv/bin/rebel", *argv])
    assert main(argv) == 0
    folder = tmp_path / "run" / "model"
    assert (folder / "adapter_config.json").is_file() and not (tmp_path / "run" / "model_merged").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)  # its base: the run's base_model/, named in adapter_config.json
    assert type(model).__name__ == "GPT2LMHeadModel" and model.peft_config["default"].base_model_name_or_path == str(
        tmp_path / "run" / "base_model"
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and f"```bash\nrebel {' '.join(argv)}\n```" in card.text
