"""The fixed-seed evaluation grid of a diffusion run: same prompts and noise each time, eval/ metrics."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rebel.diffusion import DiffusionConfig, DiffusionTrainer, brightness
from rebel.runs import read_metrics

PROMPTS = ["a red circle", "a blue square", "a green circle"]


def config(tmp_path, name, **kwargs):
    base = {"output_dir": str(tmp_path / name), "iterations": 3, "prompts_per_iteration": 2, "num_generations": 2, "num_inference_steps": 3,
            "guidance_scale": 2.0, "lora_rank": 2, "learning_rate": 1e-2, "progress": False, "plot": False, "report_to": "none",
            "log_images": 0, "eval_every": 2, "eval_prompts": 2, "eval_images_per_prompt": 2}  # fmt: skip
    return DiffusionConfig(**{**base, **kwargs})


def grid(run, iteration):
    return np.asarray(Image.open(run / "eval" / f"iter_{iteration:04d}.png"))


def test_eval_grid_uses_the_same_prompts_and_noise_every_time(tiny_pipe, tmp_path):
    # a learning rate too small to move float32 weights: an unchanged policy draws the same pictures at every evaluation
    frozen = DiffusionTrainer(tiny_pipe, brightness, PROMPTS, config(tmp_path, "frozen", learning_rate=1e-12))
    rows = frozen.trainer.train()
    assert ["eval/reward_mean" in r for r in rows] == [False, True, True]  # every 2 iterations, and at the end
    evaluator = frozen.trainer.callbacks[1]
    assert len(evaluator.prompts) == 2 and set(evaluator.prompts) <= set(PROMPTS)
    run = tmp_path / "frozen"
    assert np.array_equal(grid(run, 2), grid(run, 3)) and not (run / "eval" / "iter_0001.png").exists()
    assert rows[1]["eval/reward_mean"] == rows[2]["eval/reward_mean"]
    # the metric is the reward of those images: the direct computation
    texts = [p for p in evaluator.prompts for _ in range(2)]
    images = frozen.policy.sample(texts, torch.Generator().manual_seed(12_345))["images"]
    assert rows[-1]["eval/reward_mean"] == pytest.approx(sum(brightness(images, texts)) / 4)


def test_evaluation_leaves_training_alone(tiny_pipe, tmp_path):
    plain = DiffusionTrainer(tiny_pipe, brightness, PROMPTS, config(tmp_path, "plain", eval_every=0)).train()
    evaluated = DiffusionTrainer(tiny_pipe, brightness, PROMPTS, config(tmp_path, "eval", eval_every=1), eval_prompts=["a red circle"])
    rows = evaluated.train()
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k and not k.startswith("eval/")} for r in rs]
    assert strip(rows) == strip(plain)  # the evaluation draws from its own generator
    assert not (tmp_path / "plain" / "eval").exists()
    assert evaluated.trainer.callbacks[1].prompts == ["a red circle"]
    assert not np.array_equal(grid(tmp_path / "eval", 2), grid(tmp_path / "eval", 3))  # the policy moved: so did the pictures
    assert all(r["eval/reward_std"] >= 0 for r in read_metrics(tmp_path / "eval"))
    with pytest.raises(ValueError, match="eval_prompts must be a non-empty list of strings"):
        DiffusionTrainer(tiny_pipe, brightness, PROMPTS, config(tmp_path, "bad"), eval_prompts="a cat")
    with pytest.raises(ValueError, match="eval_every"):
        config(tmp_path, "bad", eval_every=-1)


def test_best_weights_and_rebel_eval_on_best_and_last(tiny_pipe, tmp_path, eval_best_and_last):
    from rebel.cli import main

    run = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["train", "diffusion", "--model", tiny_pipe, "--reward", "brightness", "--prompts", str(prompts), "--iterations", "3",
            "--prompts-per-iteration", "2", "--num-generations", "2", "--num-inference-steps", "3", "--guidance-scale", "2.0",
            "--lora-rank", "2", "--learning-rate", "0.05", "--log-images", "0", "--eval-every", "1", "--eval-prompts", "2",
            "--save-best", "--output-dir", str(run), "--no-progress", "--report-to", "none", "--no-plot"]  # fmt: skip
    assert main(args) == 0
    scores = [r["eval/reward_mean"] for r in read_metrics(run)]
    best = json.loads((run / "best" / "best.json").read_text())
    first_best = max(range(3), key=lambda k: (scores[k], -k))
    assert (best["iteration"], best["score"]) == (first_best + 1, scores[first_best]) and len(set(scores)) > 1
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "best" / "README.md")  # the best weights' card, with the evaluation that made them the best
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("eval/reward_mean", round(best["score"], 6))]

    results, before, after = eval_best_and_last(run)
    assert results["best"]["eval/reward_mean"] == pytest.approx(best["score"], abs=1e-6)  # the saved weights draw the recorded grid
    assert results["last"]["eval/reward_mean"] == pytest.approx(scores[-1], abs=1e-6)
    assert np.array_equal(np.asarray(Image.open(results["last"]["grid"])), grid(run, 3))
    assert {k: v for k, v in after.items() if k in before} == before
    assert len(set(after) - set(before)) == 4 and all(str(k).startswith("eval/") for k in set(after) - set(before))


def test_save_best_without_evaluations_is_refused():
    with pytest.raises(ValueError, match=r"^save_best=True keeps the model of the best evaluation, but eval_every=0 runs none"):
        DiffusionConfig(save_best=True, eval_every=0)
