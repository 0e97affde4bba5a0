"""``DiffusionConfig`` and ``DiffusionTrainer``: REBEL for Stable Diffusion, DDPO-style front end.

    trainer = DiffusionTrainer(pipeline="sd15", reward_fn=jpeg_compressibility, prompts="animals",
                               config=DiffusionConfig(output_dir="runs/sd"))
    trainer.train()

builds a :class:`DiffusionPolicy` and a :class:`DiffusionSampler` and runs :class:`rebel.Trainer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rebel.config import check_group_size, check_int, option, pick, with_defaults
from rebel.diffusion.policy import LOG_PROB_REDUCTIONS, DiffusionPolicy
from rebel.diffusion.rewards import RewardFunc, to_uint8
from rebel.diffusion.sampler import DiffusionSampler
from rebel.hf.trainer import PretrainedTrainer
from rebel.trainer import TrainerConfig

# DiffusionConfig fields that DiffusionSampler takes under the same names
SAMPLER_SETTINGS = ("num_generations", "prompts_per_iteration", "timestep_fraction", "sample_batch_size")


@dataclass
class DiffusionConfig(with_defaults(TrainerConfig, output_dir="runs/diffusion")):  # type: ignore[misc]
    """Settings of a REBEL run on a Stable Diffusion pipeline: every :class:`~rebel.TrainerConfig`
    setting (``loss="ppo_clip"`` with per-prompt advantages is DDPO's loss; DDPO's ``clip_range``
    is 1e-4 with ``log_prob_reduction="mean"``) and the diffusion adapter's own."""

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
    use_lora: bool = option(True, "train a LoRA adapter on the UNet's attention (otherwise the whole UNet)")
    lora_rank: int = option(4, "LoRA rank")
    lora_alpha: int | None = option(None, "LoRA alpha; none: the rank")
    gradient_checkpointing: bool = option(False, "recompute UNet activations in the backward pass")
    log_images: int = option(16, "images in the grid written per iteration (images/iter_NNNN.png, the trackers); 0: none")

    def __post_init__(self) -> None:
        check_group_size("num_generations", self.num_generations)
        if not self.ddim_eta > 0:
            raise ValueError(f"ddim_eta must be > 0 (deterministic DDIM has no log-probability), got {self.ddim_eta}")
        if self.log_prob_reduction not in LOG_PROB_REDUCTIONS:
            raise ValueError(
                f"log_prob_reduction={self.log_prob_reduction!r} is not supported; expected {' or '.join(LOG_PROB_REDUCTIONS)}"
            )
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        for name in ("num_inference_steps", "prompts_per_iteration", "lora_rank"):
            check_int(name, getattr(self, name))
        super().__post_init__()


class DiffusionTrainer(PretrainedTrainer):
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

    adapter = "diffusion"

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
        config = config or DiffusionConfig()
        # the sampler first: its checks of the prompts and rewards are cheap, the pipeline is not
        sampler = DiffusionSampler(prompts, reward_fn, reward_weights=reward_weights, **pick(config, SAMPLER_SETTINGS))
        policy = DiffusionPolicy(
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
        logger = ImageGridLogger(sampler, config.log_images)
        super().__init__(policy, sampler, config, callbacks=[logger, *callbacks], run_config=run_config)

    @property
    def unet(self) -> Any:
        return self.trainer.policy.unet  # type: ignore[attr-defined]

    def pipeline(self) -> Any:
        """A ``StableDiffusionPipeline`` with the trained UNet."""
        return self.trainer.policy.pipeline()  # type: ignore[attr-defined]

    def model_folder(self) -> str:
        return "lora" if self.config.use_lora else "model"  # type: ignore[attr-defined]

    def _save(self, path: Path) -> None:
        """The LoRA (diffusers format: ``pipeline.load_lora_weights(path)``) or, without LoRA,
        the UNet (``path/unet``)."""
        self.trainer.policy.save_pretrained(path)  # type: ignore[attr-defined]


class ImageGridLogger:
    """Trainer callback: a grid of the iteration's first images (one row per prompt group,
    each tile captioned with its reward) in ``images/iter_NNNN.png`` and the trackers (with
    the prompts and rewards as its caption), and the prompts and rewards in ``images.jsonl``.
    Only the main process's samples are drawn."""

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
        trainer.run.log_image("samples", _array(grid), iteration, caption=grid_caption(prompts, rewards, self.sampler.num_generations))
        trainer.run.append_jsonl(
            "images.jsonl",
            [
                {"iteration": iteration, "file": f"images/{name}", "index": k, "prompt": p, "reward": r}
                for k, (p, r) in enumerate(zip(prompts, rewards))
            ],
        )


def grid_caption(prompts: Sequence[str], rewards: Sequence[float], columns: int) -> str:
    """One line per row of an :func:`image_grid`: its prompt and its images' rewards."""
    rows = range(0, len(prompts), columns)
    return "\n".join(f"{prompts[k]}: " + ", ".join(f"{r:.3g}" for r in rewards[k : k + columns]) for k in rows)


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
