"""``DiffusionConfig`` and ``DiffusionTrainer``: REBEL for Stable Diffusion, DDPO-style front end.

    trainer = DiffusionTrainer(pipeline="sd15", reward_fn=jpeg_compressibility, prompts="animals",
                               config=DiffusionConfig(output_dir="runs/sd"))
    trainer.train()

builds a :class:`DiffusionPolicy` and a :class:`DiffusionSampler` and runs :class:`rebel.Trainer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rebel.config import option
from rebel.losses import LOSSES
from rebel.diffusion.policy import LOG_PROB_REDUCTIONS, DiffusionPolicy
from rebel.diffusion.rewards import RewardFunc, to_uint8
from rebel.diffusion.sampler import DiffusionSampler


@dataclass
class DiffusionConfig:
    """Settings of a REBEL run on a Stable Diffusion pipeline (maps onto ``TrainerConfig``)."""

    output_dir: str = option("runs/diffusion", "run folder: config, metrics, image grids, checkpoints, trained LoRA")
    iterations: int = option(100, "REBEL iterations (sample, then regress)")
    prompts_per_iteration: int = option(8, "prompts per iteration and process")
    num_generations: int = option(2, "images per prompt (>= 2; one group per prompt)")
    num_inference_steps: int = option(50, "DDIM steps of a trajectory")
    guidance_scale: float = option(5.0, "classifier-free guidance weight (<= 1: none)")
    ddim_eta: float = option(1.0, "DDIM noise scale, > 0 (a stochastic policy); not REBEL's eta")
    log_prob_reduction: str = option(
        "sum", "sum | mean: each step's log-density over the latent's dimensions (mean is DDPO's convention: log-ratios / D)"
    )
    timestep_fraction: float = option(1.0, "share of each chain's steps trained, chosen at random per image (1: all, exact)")
    resolution: int | None = option(None, "image side in pixels; none: the pipeline's default")
    sample_batch_size: int | None = option(None, "images per sampling pass; none: all at once")
    eta: float = option(1.0, "REBEL step size; 1/eta weighs the KL to the previous policy")
    loss: str = option("rebel", f"{' | '.join(LOSSES)} (ppo_clip with per-prompt advantages is DDPO's loss)")
    pairs: str = option("all", "pairs of a group regressed: all | adjacent | best_worst")
    clip_range: float = option(0.2, "per-step ratio clipping of the ppo_clip loss (DDPO: 1e-4 with log_prob_reduction mean)")
    learning_rate: float = option(3e-4, "AdamW learning rate")
    lr_schedule: str = option("constant", "constant | linear | cosine")
    warmup_iterations: int = option(0, "iterations of linear learning-rate warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float | None = option(1.0, "gradient-norm clipping; none to disable")
    epochs: int = option(1, "passes over each iteration's images")
    minibatch_size: int | None = option(None, "images per optimizer step (whole groups); none: the whole batch")
    reward_normalization: str = option(
        "none",
        "none | batch | within_group (minus the prompt's mean, over the batch's within-prompt RMS) | per_context (running statistics per prompt)",
    )
    seed: int = option(0, "random seed (each process adds its rank)")
    use_lora: bool = option(True, "train a LoRA adapter on the UNet's attention (otherwise the whole UNet)")
    lora_rank: int = option(4, "LoRA rank")
    lora_alpha: int | None = option(None, "LoRA alpha; none: the rank")
    mixed_precision: str = option("no", "no | bf16 | fp16: autocast of sampling and training (GPU)")
    gradient_checkpointing: bool = option(False, "recompute UNet activations in the backward pass")
    log_images: int = option(16, "images in the grid written per iteration (images/iter_NNNN.png, TensorBoard); 0: none")
    checkpoint_every: int = option(10, "iterations between checkpoints")
    keep_checkpoints: int = option(2, "checkpoints kept on disk")
    stats_forward: bool = option(True, "one extra forward after each update for kl and explained_variance")
    tensorboard: bool = option(True, "write TensorBoard events")
    plot: bool = option(True, "draw curves.png at the end")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (REBEL compares images of a prompt), got {self.num_generations}")
        if not self.ddim_eta > 0:
            raise ValueError(f"ddim_eta must be > 0 (deterministic DDIM has no log-probability), got {self.ddim_eta}")
        if self.log_prob_reduction not in LOG_PROB_REDUCTIONS:
            raise ValueError(
                f"log_prob_reduction={self.log_prob_reduction!r} is not supported; expected {' or '.join(LOG_PROB_REDUCTIONS)}"
            )
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        for name in ("num_inference_steps", "prompts_per_iteration", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.trainer_config()  # validates the shared fields

    def trainer_config(self) -> Any:
        """The :class:`rebel.TrainerConfig` of these settings."""
        from rebel.trainer import TrainerConfig

        return TrainerConfig.from_settings(self)


class DiffusionTrainer:
    """REBEL for a Stable Diffusion pipeline.

    Args:
        pipeline: a ``StableDiffusionPipeline`` object, a folder in diffusers format or a hub id.
        reward_fn: ``fn(images, prompts, **kwargs) -> list[float]`` (images ``[B, 3, H, W]`` in
            [0, 1]), or a list of them (summed with ``reward_weights``).
        prompts: a list of prompts, a text file, ``"animals"`` (default) or ``fn(rng) -> str``.
        config: the run's settings.
        callbacks: ``fn(trainer, metrics)`` after each iteration (see :class:`rebel.Trainer`).
        pipeline_kwargs: more ``from_pretrained`` arguments (``torch_dtype``, ``variant``, ...).
    """

    def __init__(
        self,
        pipeline: Any,
        reward_fn: RewardFunc | Sequence[RewardFunc],
        prompts: Any = None,
        config: DiffusionConfig | None = None,
        *,
        reward_weights: Sequence[float] | None = None,
        callbacks: Sequence[Any] = (),
        pipeline_kwargs: dict[str, Any] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        from rebel.trainer import Trainer

        self.config = config = config or DiffusionConfig()
        self.policy = DiffusionPolicy(
            pipeline,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            ddim_eta=config.ddim_eta,
            log_prob_reduction=config.log_prob_reduction,
            lora_rank=config.lora_rank if config.use_lora else None,
            lora_alpha=config.lora_alpha,
            resolution=config.resolution,
            sample_precision=config.mixed_precision,
            gradient_checkpointing=config.gradient_checkpointing,
            pipeline_kwargs=pipeline_kwargs,
        )
        self.sampler = DiffusionSampler(
            prompts,
            reward_fn,
            reward_weights=reward_weights,
            num_generations=config.num_generations,
            prompts_per_iteration=config.prompts_per_iteration,
            timestep_fraction=config.timestep_fraction,
            sample_batch_size=config.sample_batch_size,
        )
        self.image_logger = ImageGridLogger(self.sampler, config.log_images)
        self.trainer = Trainer(
            self.policy,
            self.sampler,
            config.trainer_config(),
            run_config={"adapter": "diffusion", "diffusion": dataclasses.asdict(config), **(run_config or {})},
            callbacks=[self.image_logger, *callbacks],
        )

    @property
    def unet(self) -> Any:
        return self.trainer.policy.unet  # type: ignore[attr-defined]

    def pipeline(self) -> Any:
        """A ``StableDiffusionPipeline`` with the trained UNet."""
        return self.trainer.policy.pipeline()  # type: ignore[attr-defined]

    def train(self, resume: bool = False) -> list[dict[str, Any]]:
        """Run the REBEL iterations (``resume=True`` continues the run in ``output_dir``), then
        save what was trained; returns this call's metric rows."""
        rows = self.trainer.train(resume=resume)
        self.save_model()
        return rows

    def save_model(self, path: str | Path | None = None) -> Path:
        """Write the LoRA (diffusers format: ``pipeline.load_lora_weights(path)``) or, without
        LoRA, the UNet (``path/unet``); default ``<run>/lora`` or ``<run>/model``."""
        default = "lora" if self.config.use_lora else "model"
        path = Path(path) if path is not None else Path(self.config.output_dir) / default
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.trainer.policy.save_pretrained(path)  # type: ignore[attr-defined]
        accelerator.wait_for_everyone()
        return path


class ImageGridLogger:
    """Trainer callback: a grid of the iteration's first images (one row per prompt group,
    each tile captioned with its reward) in ``images/iter_NNNN.png`` and TensorBoard, and the
    prompts and rewards in ``images.jsonl``. Only the main process's samples are drawn."""

    def __init__(self, sampler: DiffusionSampler, count: int, tile: int = 96) -> None:
        self.sampler, self.count, self.tile = sampler, count, tile

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        samples = self.sampler.last_samples
        if self.count <= 0 or not samples or not trainer.accelerator.is_main_process:
            return
        iteration = int(metrics["iteration"])
        n = min(self.count, len(samples["prompts"]))
        images, prompts, rewards = samples["images"][:n], samples["prompts"][:n], samples["rewards"][:n]
        grid = image_grid(images, [f"{r:.3g}" for r in rewards], columns=self.sampler.num_generations, tile=self.tile)
        folder = trainer.run.path / "images"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"iter_{iteration:04d}.png"
        grid.save(folder / name)
        trainer.run.log_image("samples", _array(grid), iteration)
        trainer.run.append_jsonl(
            "images.jsonl",
            [
                {"iteration": iteration, "file": f"images/{name}", "index": k, "prompt": p, "reward": r}
                for k, (p, r) in enumerate(zip(prompts, rewards))
            ],
        )


def image_grid(images: torch.Tensor, captions: Sequence[str], columns: int, tile: int = 96) -> Any:
    """A PIL image: ``images`` (``[N, 3, H, W]`` in [0, 1]) as ``columns``-wide rows of tiles
    scaled to at least ``tile`` pixels, each with its caption underneath."""
    from PIL import Image, ImageDraw

    arrays = to_uint8(images)
    h, w = arrays.shape[1:3]
    scale = max(1, -(-tile // max(h, w)))
    th, tw, caption = h * scale, w * scale, 14
    rows = -(-len(arrays) // columns)
    grid = Image.new("RGB", (columns * tw, rows * (th + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (array, text) in enumerate(zip(arrays, captions)):
        x, y = (k % columns) * tw, (k // columns) * (th + caption)
        grid.paste(Image.fromarray(array).resize((tw, th), Image.NEAREST), (x, y))
        draw.text((x + 2, y + th + 1), text, fill="black")
    return grid


def _array(image: Any) -> Any:
    import numpy as np

    return np.asarray(image)
