"""``rebel train diffusion``: REBEL on a Stable Diffusion pipeline.

Without ``--model`` it runs the embedded default: the coloured-shapes task of
:mod:`rebel_envs.diffusion_tasks` on a tiny pipeline warmed up in-process, rewarded by brightness
(a few minutes on a CPU; the grids in ``<run>/images`` show the shapes grow). With
``--model`` it fine-tunes a real pipeline:

    rebel train diffusion --model sd15 --reward compressibility --prompts animals \\
        --num-inference-steps 50 --prompts-per-iteration 16 --mixed-precision fp16
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebel.config import option

# Settings of the embedded task (a new run without --model); DiffusionConfig's defaults otherwise.
# Measured: fixed-seed brightness 0.128 -> 0.189 (+47%) in 20 iterations, about 2.5 minutes on one busy CPU core.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "iterations": 20,
    "prompts_per_iteration": 8,
    "num_generations": 4,
    "num_inference_steps": 10,
    "guidance_scale": 3.0,
    "eta": 1.0,
    "reward_normalization": "within_group",  # rewards in units of the batch's within-prompt spread: eta is in nats per unit
    "learning_rate": 2e-3,
    "epochs": 2,
    "minibatch_size": 16,  # 4 prompts x 4 images: 4 LoRA steps per iteration
    "eval_every": 5,  # a fixed-seed grid of every shape prompt in eval/ (and its brightness in the metrics)
}


@dataclass
class DiffusionSource:
    """What to train: the pipeline, the prompts and the reward (default: the embedded task)."""

    model: str | None = option(None, "Stable Diffusion folder (diffusers format) or hub id; none: the embedded tiny shapes pipeline")
    reward: str | None = option(
        None, "aesthetic | compressibility | incompressibility | brightness | module:function | file.py:function; none: brightness"
    )
    prompts: str | None = option(
        None, "'animals', or a text file with one prompt per line; none: the task's prompts (animals with --model)"
    )
    aesthetic_clip: str = option("openai/clip-vit-large-patch14", "CLIP ViT-L/14 folder or cached hub id of --reward aesthetic")
    aesthetic_head: str = option("sac+logos+ava1-l14-linearMSE.pth", "state-dict file of the LAION aesthetic MLP head")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rebel train diffusion``."""
    from rebel.diffusion.trainer import DiffusionConfig
    from rebel.hf import cli
    from rebel_envs.diffusion_tasks import ShapesTaskConfig

    cli.add_arguments(parser, "a Stable Diffusion pipeline", DiffusionConfig, DiffusionSource, ShapesTaskConfig, EMBEDDED_DEFAULTS)


def run(args: argparse.Namespace) -> int:
    """Build and train from the command line (or from a resumed run's ``config.yaml``)."""
    import torch

    from rebel.cli import start_options
    from rebel.diffusion.policy import PIPELINE_EXPECTED
    from rebel.diffusion.rewards import brightness
    from rebel.diffusion.sampler import prompt_source
    from rebel.diffusion.trainer import DiffusionConfig, DiffusionTrainer
    from rebel.hf.cli import resolve_model_run, reward_summary
    from rebel.hf.inputs import check_source
    from rebel.runs import claimed_run_folder
    from rebel_envs.diffusion_tasks import ShapesTaskConfig, shape_prompts

    config, source, task = resolve_model_run(args, "diffusion", DiffusionConfig, DiffusionSource, ShapesTaskConfig, EMBEDDED_DEFAULTS)

    embedded = source.model is None
    # the inputs are checked before any folder is made or anything loads
    check_source(source.model, "Stable Diffusion pipeline", PIPELINE_EXPECTED)
    prompts = prompt_source(source.prompts if source.prompts is not None else (shape_prompts() if embedded else "animals"))
    reward = reward_from_source(source) if source.reward is not None else brightness
    if embedded:
        torch.set_num_threads(min(2, torch.get_num_threads()))  # a ~1M-parameter model: more threads cost more than they give
    with claimed_run_folder(config.output_dir, resume=bool(args.resume), overwrite=args.overwrite):
        pipeline = source.model if not embedded else _embedded_pipeline(task, config, bool(args.resume))
        trainer = DiffusionTrainer(
            pipeline,
            reward,
            prompts,
            config,
            run_config={"source": dataclasses.asdict(source), "task": dataclasses.asdict(task)},
            eval_prompts=shape_prompts() if embedded and source.prompts is None else None,
        )
        evaluate = (lambda: _evaluate(trainer, shape_prompts(), reward)) if embedded else None
        before = evaluate() if evaluate else None
        rows = trainer.train(**start_options(args))
    if not trainer.accelerator.is_main_process or not rows or trainer.exit_code:
        return trainer.exit_code
    print(reward_summary(rows, 3, config.output_dir, digits=".4g"))
    if evaluate is not None and before is not None:
        print(f"fixed-seed evaluation (every prompt, 4 images each): reward {before:.4g} -> {evaluate():.4g}")
    print(
        f"image grids in {Path(config.output_dir) / 'images'}; trained weights in {Path(config.output_dir) / ('lora' if config.use_lora else 'model')}"
    )
    return 0


# ------------------------------------------------------------------ helpers


def _embedded_pipeline(task: Any, config: Any, resume: bool) -> str:
    """Folder of the task's warmed-up pipeline, made once and kept in ``<run>/base_pipeline``
    so that a resumed run starts from the same weights."""
    from rebel_envs.diffusion_tasks import make_shapes_pipeline

    base = Path(config.output_dir) / "base_pipeline"
    if not (base / "model_index.json").is_file():
        if resume:
            raise FileNotFoundError(f"{base} is missing: the resumed run's starting pipeline is gone")
        base.parent.mkdir(parents=True, exist_ok=True)
        print(
            f"warming up the tiny shapes pipeline: {task.vae_steps} autoencoder steps, then {task.unet_steps} denoising steps", flush=True
        )
        make_shapes_pipeline(task, save_to=base, progress=config.progress)
    return str(base)


def _evaluate(trainer: Any, prompts: list[str], reward: Any, per_prompt: int = 4, seed: int = 12_345) -> float:
    """Mean reward of ``per_prompt`` images of every prompt, drawn with a fixed seed."""
    import torch

    from rebel.diffusion.rewards import call_reward

    texts = [p for p in prompts for _ in range(per_prompt)]
    images = trainer.policy.sample(texts, torch.Generator().manual_seed(seed))["images"]
    return call_reward(reward, images, texts).mean().item()


def reward_from_source(source: DiffusionSource) -> Any:
    """The reward named by ``--reward``: a built-in name, ``module:function`` or ``file.py:function``."""
    from rebel.diffusion.rewards import REWARDS, AestheticScorer

    spec = source.reward.strip() if source.reward else ""
    if spec == "aesthetic":
        return AestheticScorer(source.aesthetic_clip, source.aesthetic_head)
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"--reward {spec}: expected aesthetic, {', '.join(REWARDS)}, module:function or file.py:function")
    from rebel.hf.cli import load_function

    return load_function(spec)


# ------------------------------------------------------------------ rebel eval


def evaluate_run(args: argparse.Namespace) -> None:
    """``rebel eval RUN_DIR [--model last|best|PATH] [--output FILE]``: the run's fixed-seed
    evaluation grid (its prompts, reward and ``eval_seed``) of its final weights (``last``:
    RUN/lora or RUN/model), its best (RUN/best, with ``save_best``) or a saved folder. Reads the
    run without its lock; writes a new JSON file and its grid (a PNG beside it) only."""
    import json

    from rebel.config import from_dict, pick
    from rebel.diffusion.policy import DiffusionPolicy
    from rebel.diffusion.rewards import brightness
    from rebel.diffusion.sampler import DiffusionSampler, prompt_source
    from rebel.diffusion.trainer import SAMPLER_SETTINGS, DiffusionConfig, EvaluationGrid, default_eval_prompts
    from rebel.runs import BEST_FOLDER, check_eval_output, new_eval_path, read_best, read_config
    from rebel_envs.diffusion_tasks import shape_prompts

    run, saved = Path(args.run_dir), read_config(args.run_dir)
    source = from_dict(DiffusionSource, saved.get("source", {}))
    config = from_dict(
        DiffusionConfig,
        {**saved.get("trainer", {}), **saved.get("diffusion", {}), "output_dir": str(run), "progress": False, "report_to": "none"},
    )
    folder = {"last": run / ("lora" if config.use_lora else "model"), "best": run / BEST_FOLDER}.get(args.model, Path(args.model))
    if not folder.is_dir():
        what = {"last": "final weights (written when a run ends)", "best": "best weights (runs with --save-best)"}
        raise FileNotFoundError(
            f"{run} has no {what.get(args.model, 'weights folder')} at {folder}; expected --model last, best or a saved folder"
        )
    out = Path(args.output) if args.output else None
    if out is not None:
        check_eval_output(run, out)
    embedded = source.model is None
    reward = reward_from_source(source) if source.reward is not None else brightness
    sampler = DiffusionSampler(
        prompt_source(source.prompts if source.prompts is not None else (shape_prompts() if embedded else "animals")),
        reward,
        **pick(config, SAMPLER_SETTINGS),
    )
    prompts = shape_prompts() if embedded and source.prompts is None else default_eval_prompts(sampler, config)
    policy = DiffusionPolicy(
        _saved_pipeline(str(run / "base_pipeline") if embedded else str(source.model), folder),
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        ddim_eta=config.ddim_eta,
        log_prob_reduction=config.log_prob_reduction,
        lora_rank=None,  # the saved weights are in the UNet already
        resolution=config.resolution,
        sample_precision=config.mixed_precision,
    )
    grid, metrics = EvaluationGrid(sampler, prompts, config).grid(policy)
    result: dict[str, Any] = {"run": str(run), "model": args.model, "folder": str(folder), "prompts": prompts, **metrics}
    if args.model == "best":
        result["best"] = read_best(run)
    out = out or new_eval_path(run, args.model if args.model in ("last", "best") else folder.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out.with_suffix(".png"))
    result["grid"] = str(out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({**result, "output": str(out)}))


def _saved_pipeline(base: str, folder: Path) -> Any:
    """The base pipeline with the saved weights: a LoRA (``load_lora_weights``) or a UNet (``folder/unet``)."""
    from diffusers import UNet2DConditionModel

    from rebel.diffusion.policy import load_pipeline

    pipe = load_pipeline(base)
    if (folder / "unet").is_dir():
        pipe.unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    else:
        pipe.load_lora_weights(str(folder))
    return pipe
