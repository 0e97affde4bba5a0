"""Evaluation during training: eval_dataset, evaluation rewards, greedy and sampled, eval/ metrics."""

import json
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from rebel.cli import main
from rebel.runs import read_metrics
from rebel.text import TextConfig, TextTrainer
from rebel_envs.text_tasks import sorted_digits_reward, sorting_dataset

FAST = {"progress": False, "report_to": "none", "plot": False}
TRAIN, HELD_OUT = sorting_dataset(64, seed=0), sorting_dataset(12, seed=99)


def exact(prompts, completions, answer, **columns):
    """An evaluation-only reward: 1 for the exactly sorted digits."""
    return [float(c == a) for c, a in zip(completions, answer)]


def config(tmp_path, name, **overrides):
    values = {"output_dir": str(tmp_path / name), "iterations": 3, "prompts_per_iteration": 4, "num_generations": 2, "max_new_tokens": 8,
              "learning_rate": 1e-3, "checkpoint_every": 100, **FAST, **overrides}  # fmt: skip
    return TextConfig(**values)


def greedy_completions(model, tokenizer, records, max_new_tokens=8):
    """Each prompt alone (no padding) through plain greedy ``generate``."""
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    out = []
    model.eval()
    for record in records:
        ids = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1] :]
        out.append(tokens)
    return out


def test_eval_metrics_are_computed_on_the_eval_set_with_the_eval_reward(sorting_lm, tmp_path):
    trainer = TextTrainer(
        sorting_lm, sorted_digits_reward, TRAIN, config(tmp_path, "run", eval_every=2, eval_generation="both"),
        eval_dataset=HELD_OUT, eval_reward_funcs=[exact, sorted_digits_reward],
    )  # fmt: skip
    rows = trainer.train()
    assert [any(k.startswith("eval/") for k in r) for r in rows] == [False, True, True]  # every 2 iterations, and at the end
    row = rows[-1]
    # the direct computation: greedy completions of the final policy, scored with the evaluation rewards
    tokens = greedy_completions(trainer.model, trainer.tokenizer, HELD_OUT)
    eos = set(trainer.policy.eos_token_ids)
    texts, lengths = [], []
    for t in tokens:
        t = t.tolist()
        end = next((i for i, x in enumerate(t) if x in eos), None)
        texts.append(trainer.tokenizer.decode(t if end is None else t[:end], skip_special_tokens=True))
        lengths.append(len(t) if end is None else end + 1)
    answers = [r["answer"] for r in HELD_OUT]
    exact_scores, sorted_scores = exact([], texts, answers), sorted_digits_reward([], texts, answers)
    assert row["eval/greedy/rewards/exact"] == pytest.approx(sum(exact_scores) / 12)
    assert row["eval/greedy/rewards/sorted_digits_reward"] == pytest.approx(sum(sorted_scores) / 12)
    assert row["eval/greedy/reward_mean"] == pytest.approx(sum(map(sum, zip(exact_scores, sorted_scores))) / 12)
    assert row["eval/greedy/completion_length"] == pytest.approx(sum(lengths) / 12)
    assert 0 < row["eval/greedy/rewards/exact"] < 1  # the checks above compare something
    assert row["eval/sampled/reward_mean"] != row["eval/greedy/reward_mean"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "eval_completions.jsonl").read_text().splitlines()]
    assert {(r["iteration"], r["mode"]) for r in logged} == {(2, "greedy"), (2, "sampled"), (3, "greedy"), (3, "sampled")}
    assert [r["completion"] for r in logged if r["iteration"] == 3 and r["mode"] == "greedy"] == texts[:8]


def test_evaluation_leaves_training_alone_and_samples_the_same_draws(sorting_lm, tmp_path):
    plain = TextTrainer(sorting_lm, sorted_digits_reward, TRAIN, config(tmp_path, "plain")).train()
    evaluated = TextTrainer(
        sorting_lm, sorted_digits_reward, TRAIN, config(tmp_path, "eval", eval_every=1, eval_generation="sampled"), eval_dataset=HELD_OUT
    )
    rows = evaluated.train()
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k and not k.startswith("eval/")} for r in rs]
    assert strip(rows) == strip(plain)  # the training RNG is untouched
    assert "eval/rewards/sorted_digits_reward" in rows[0]  # the training reward by default
    evaluator = evaluated.trainer.callbacks[1]
    again = evaluator.evaluate(evaluated.trainer, 3)  # same policy, same seed: same draws
    assert again == {k: v for k, v in rows[-1].items() if k.startswith("eval/")}


def test_bad_eval_inputs(sorting_lm, tmp_path):
    with pytest.raises(ValueError, match="eval_dataset is empty"):
        TextTrainer(sorting_lm, sorted_digits_reward, TRAIN, config(tmp_path, "a"), eval_dataset=[])
    with pytest.raises(ValueError, match="eval_reward_funcs needs an eval_dataset"):
        TextTrainer(sorting_lm, sorted_digits_reward, TRAIN, config(tmp_path, "b"), eval_reward_funcs=[exact])
    with pytest.raises(ValueError, match="eval_generation='beam' is not supported"):
        config(tmp_path, "c", eval_generation="beam")
    with pytest.raises(ValueError, match="eval_every"):
        config(tmp_path, "d", eval_every=-1)
    with pytest.raises(ValueError, match=r"^save_best=True keeps the model of the best eval/reward_mean, which needs an eval_dataset"):
        TextTrainer(sorting_lm, sorted_digits_reward, TRAIN, config(tmp_path, "e", save_best=True))
    with pytest.raises(ValueError, match=r"^save_best=True keeps the model of the best evaluation, but eval_every=0 runs none"):
        TextConfig(save_best=True, eval_every=0)
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_command_line_eval_dataset_and_reward(tiny_lm, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{k}{k}:", "target": str(k)}) + "\n" for k in range(10)))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": f"{k}:", "target": str(k)}) + "\n" for k in range(5)))
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(
        "def starts_right(prompts, completions, target, **kw):\n    return [float(c[:1] == t) for c, t in zip(completions, target)]\n"
        "def short(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n"
    )
    args = ["train", "text", "--model", tiny_lm, "--dataset", str(prompts), "--reward", f"{rewards}:starts_right", "--iterations", "2",
            "--max-new-tokens", "4", "--no-progress", "--report-to", "none", "--no-plot"]  # fmt: skip
    run = tmp_path / "run"
    given = ["--eval-dataset", str(held_out), "--eval-reward", f"{rewards}:short", "--eval-every", "1", "--output-dir", str(run)]
    assert main([*args, *given]) == 0
    rows = read_metrics(run)
    assert all("eval/rewards/short" in r and "eval/rewards/starts_right" not in r for r in rows)
    assert rows[-1]["eval/reward_mean"] == rows[-1]["eval/rewards/short"] <= 0
    assert main([*args, "--eval-reward", f"{rewards}:short", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--eval-reward" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*args, "--eval-dataset", str(tmp_path / "none.jsonl"), "--output-dir", str(tmp_path / "y")]) == 2
    assert "--eval-dataset" in capsys.readouterr().err


def test_the_embedded_default_shows_eval_metrics(tmp_path):
    small = [
        "--pretrain-steps",
        "20",
        "--num-prompts",
        "64",
        "--prompts-per-iteration",
        "4",
        "--no-progress",
        "--report-to",
        "none",
        "--no-plot",
    ]
    assert main(["train", "text", "--output-dir", str(tmp_path / "run"), "--iterations", "2", *small]) == 0
    row = read_metrics(tmp_path / "run")[-1]
    assert 0 <= row["eval/reward_mean"] <= 1 and row["eval/rewards/sorted_digits_reward"] == row["eval/reward_mean"]


def test_best_model_and_rebel_eval_on_best_and_last(tiny_lm, tmp_path, capsys, eval_best_and_last, kept_best):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{k}{k}:"}) + "\n" for k in range(10)))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": f"{k}:"}) + "\n" for k in range(6)))
    rewards = tmp_path / "digit_rewards.py"
    rewards.write_text("def digits(prompts, completions, **kw):\n    return [sum(ch.isdigit() for ch in c) / 4 for c in completions]\n")
    run = tmp_path / "run"
    args = ["train", "text", "--model", tiny_lm, "--dataset", str(prompts), "--reward", f"{rewards}:digits", "--eval-dataset",
            str(held_out), "--eval-every", "1", "--save-best", "--iterations", "5", "--learning-rate", "0.03", "--max-new-tokens", "4",
            "--output-dir", str(run), "--no-progress", "--report-to", "none", "--no-plot"]  # fmt: skip
    assert main(args) == 0
    rows, best = read_metrics(run), kept_best(run, "eval/reward_mean")
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "best" / "README.md")  # the best model's card, with the evaluation that made it the best
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("eval/reward_mean", round(best["score"], 6))]

    results, before, after = eval_best_and_last(run)
    assert results["best"]["eval/reward_mean"] == best["score"]  # the saved best model evaluates to its recorded score
    assert results["last"]["eval/reward_mean"] == rows[-1]["eval/reward_mean"]  # the final model, to the last evaluation's
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(str(k) for k in set(after) - set(before)) == sorted(str(Path(r["output"]).relative_to(run)) for r in results.values())
    assert main(["eval", str(run), "--model", "best", "--output", str(run / "config.yaml")]) == 2
    assert "is one of the run's own files" in capsys.readouterr().err
