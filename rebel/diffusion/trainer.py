"""``DiffusionConfig`` and ``DiffusionTrainer``: REBEL for Stable Diffusion, DDPO-style front end.

    trainer = DiffusionTrainer(pipeline="sd15", reward_fn=jpeg_compressibility, prompts="animals",
                               config=DiffusionConfig(output_dir="runs/sd"))
    trainer.train()

builds a :class:`DiffusionPolicy` and a :class:`DiffusionSampler` and runs :class:`rebel.Trainer`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rebel.config import check_group_size, check_int, check_save_best, option, pick, with_defaults
from rebel.diffusion.policy import LOG_PROB_REDUCTIONS, DiffusionPolicy
from rebel.diffusion.rewards import RewardFunc, to_uint8
from rebel.diffusion.sampler import DiffusionSampler
from rebel.hf.trainer import PretrainedTrainer
from rebel.hub import CardInfo, card_settings, describe_rewards, hub_base_model
from rebel.runs import EVAL_FOLDER, publish_best, read_best
from rebel.trainer import TrainerConfig

# DiffusionConfig fields a model card lists beside the REBEL settings
CARD_SETTINGS = (
    "num_generations",
    "prompts_per_iteration",
    "num_inference_steps",
    "guidance_scale",
    "ddim_eta",
    "use_lora",
    "lora_rank",
    "resolution",
)
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
    save_images: bool = option(False, "also write every image of an iteration to images/iter_NNNN/KKK.png (listed in images.jsonl)")
    eval_every: int = option(
        10, "iterations between fixed-seed evaluation grids (eval/iter_NNNN.png, eval/reward_mean), and one at the end; 0: none"
    )
    eval_prompts: int = option(4, "prompts of the evaluation grid, drawn once from the prompts with eval_seed (or given to the trainer)")
    eval_images_per_prompt: int = option(2, "images per evaluation prompt")
    save_best: bool = option(False, "keep the LoRA (or UNet) of the best eval/reward_mean so far in RUN/best/")
    eval_seed: int = option(
        12_345, "seed of the evaluation's prompts and initial noise: the same pictures each time for an unchanged policy"
    )

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
        for name in ("num_inference_steps", "prompts_per_iteration", "lora_rank", "eval_prompts", "eval_images_per_prompt"):
            check_int(name, getattr(self, name))
        check_int("eval_every", self.eval_every, minimum=0)
        check_save_best(self.save_best, self.eval_every)
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
        eval_prompts: the prompts of the evaluation grid (default: ``config.eval_prompts`` drawn
            from ``prompts`` with ``config.eval_seed``); see :class:`EvaluationGrid`.
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
        eval_prompts: Sequence[str] | None = None,
    ) -> None:
        config = config or DiffusionConfig()
        # what the model card names: the base pipeline (a folder or hub id) and the prompts
        self.base_model = str(pipeline) if isinstance(pipeline, (str, Path)) else getattr(pipeline, "name_or_path", None) or None
        self.prompts_name = prompts if isinstance(prompts, str) else "prompts"
        # the sampler first: its checks of the prompts and rewards are cheap, the pipeline is not
        sampler = DiffusionSampler(prompts, reward_fn, reward_weights=reward_weights, **pick(config, SAMPLER_SETTINGS))
        if eval_prompts is None:
            eval_prompts = default_eval_prompts(sampler, config)
        elif isinstance(eval_prompts, str) or not eval_prompts or not all(isinstance(p, str) for p in eval_prompts):
            raise ValueError("eval_prompts must be a non-empty list of strings")
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
        keep_best = self._keep_best if config.save_best else None
        loggers = [
            ImageGridLogger(sampler, config.log_images, save_all=config.save_images),
            EvaluationGrid(sampler, list(eval_prompts), config, keep_best),
        ]
        super().__init__(policy, sampler, config, callbacks=[*loggers, *callbacks], run_config=run_config)

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

    def card_info(self) -> CardInfo:
        """The card of the saved LoRA (diffusers' ``load_lora_weights``) or UNet."""
        lora = bool(self.config.use_lora)  # type: ignore[attr-defined]
        base = self.base_model or "pipeline"
        pipe = f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\n'
        load = (
            'pipe.load_lora_weights(".")  # this folder, or its repo id on the Hub'
            if lora
            else ('pipe.unet = UNet2DConditionModel.from_pretrained(".", subfolder="unet")  # this folder, or its repo id on the Hub')
        )
        return CardInfo(
            title=f"{Path(base).name} trained with REBEL" + (" (LoRA)" if lora else ""),
            library_name="diffusers",
            task="text-to-image",
            dataset=self.prompts_name,
            settings=card_settings(self.config, CARD_SETTINGS),
            reward=describe_rewards(self.sampler.reward_fns, self.sampler.reward_weights),  # type: ignore[attr-defined]
            usage="from diffusers import StableDiffusionPipeline, UNet2DConditionModel\n\n" + pipe + load,
            base_model=hub_base_model(self.base_model),
            start=f"`{base}`" if self.base_model else "a pipeline built in-process",
            tags=("text-to-image", "diffusers", "stable-diffusion", *(("lora",) if lora else ())),
            extra={"pipeline_tag": "text-to-image"},
        )

    def _keep_best(self, iteration: int, score: float) -> None:
        """Save the LoRA (or UNet) into ``RUN/best/`` when ``score`` beats the one recorded
        there (main process; a resumed run keeps the best of the runs before)."""
        run = self.trainer.run.path
        best = read_best(run)
        if best is None or score > best["score"]:
            record = {"iteration": iteration, "metric": "eval/reward_mean", "score": score}

            def write(folder: Path) -> None:
                self.trainer.policy.save_pretrained(folder)  # type: ignore[attr-defined]
                self.write_card(folder, results={"iteration": iteration, "eval/reward_mean": score})

            publish_best(run, write, record)


class ImageGridLogger:
    """Trainer callback: a grid of the iteration's first ``count`` images (one row per prompt
    group, each tile captioned with its prompt and reward) in ``images/iter_NNNN.png`` and
    the trackers (captioned with each row's prompt and rewards), and the prompts and rewards in ``images.jsonl``; with ``save_all``, every
    image of the iteration in ``images/iter_NNNN/KKK.png`` too. Only the main process's
    samples are drawn."""

    def __init__(self, sampler: DiffusionSampler, count: int, tile: int = 96, save_all: bool = False) -> None:
        self.sampler, self.count, self.tile, self.save_all = sampler, count, tile, save_all

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        samples = self.sampler.last_samples
        if (self.count <= 0 and not self.save_all) or not samples or not trainer.accelerator.is_main_process:
            return
        iteration = int(metrics["iteration"])
        prompts, rewards = samples["prompts"], samples["rewards"]
        n = min(max(self.count, 0), len(prompts))
        rows: list[dict[str, Any]] = [
            {"iteration": iteration, "index": k, "prompt": p, "reward": r} for k, (p, r) in enumerate(zip(prompts, rewards))
        ]
        folder = trainer.run.path / "images"
        folder.mkdir(parents=True, exist_ok=True)
        if n:
            name = f"images/iter_{iteration:04d}.png"
            grid, caption = captioned_grid(samples["images"][:n], prompts[:n], rewards[:n], self.sampler.num_generations, self.tile)
            grid.save(trainer.run.path / name)
            trainer.run.log_image("samples", _array(grid), iteration, caption=caption)
            for row in rows[:n]:
                row["file"] = name
        if self.save_all:
            from PIL import Image

            (folder / f"iter_{iteration:04d}").mkdir(exist_ok=True)
            for row, array in zip(rows, to_uint8(samples["images"])):
                row["image"] = f"images/iter_{iteration:04d}/{row['index']:03d}.png"
                Image.fromarray(array).save(trainer.run.path / row["image"])
        trainer.run.append_jsonl("images.jsonl", rows if self.save_all else rows[:n])


def grid_caption(prompts: Sequence[str], rewards: Sequence[float], columns: int) -> str:
    """One line per row of an :func:`image_grid`: its prompt and its images' rewards."""
    rows = range(0, len(prompts), columns)
    return "\n".join(f"{prompts[k]}: " + ", ".join(f"{r:.3g}" for r in rewards[k : k + columns]) for k in rows)


def captioned_grid(images: torch.Tensor, prompts: Sequence[str], rewards: Sequence[float], columns: int, tile: int = 96) -> tuple[Any, str]:
    """An :func:`image_grid` whose tiles carry their prompt and reward, and its caption for the
    trackers (:func:`grid_caption`)."""
    return image_grid(images, grid_captions(prompts, rewards), columns, tile), grid_caption(prompts, rewards, columns)


def default_eval_prompts(sampler: DiffusionSampler, config: DiffusionConfig) -> list[str]:
    """``config.eval_prompts`` prompts drawn from the sampler's prompts with ``eval_seed``."""
    rng = random.Random(config.eval_seed)
    return [sampler.prompt_fn(rng) for _ in range(config.eval_prompts)]


class EvaluationGrid:
    """Trainer callback: every ``eval_every`` iterations (and in the run's last one) the same
    ``eval_images_per_prompt`` images of each evaluation prompt, from the same initial noise
    (``eval_seed``), so the pictures of one run compare across iterations: a grid in
    ``eval/iter_NNNN.png`` (one row per prompt, each tile captioned with its prompt and reward) and
    the trackers, ``eval/reward_mean`` and ``eval/reward_std`` (and ``eval/rewards/<function>``
    with several) in the iteration's metrics. Drawn by the main process; the training RNG is
    not touched. ``keep_best(iteration, eval/reward_mean)`` is called after each evaluation."""

    def __init__(
        self, sampler: DiffusionSampler, prompts: list[str], config: DiffusionConfig, keep_best: Callable[[int, float], None] | None = None
    ) -> None:
        self.sampler, self.prompts, self.config, self.keep_best = sampler, prompts, config, keep_best
        self.texts = [p for p in prompts for _ in range(config.eval_images_per_prompt)]  # the grid's rows, prompt by prompt

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        every = self.config.eval_every
        if not every or not (trainer.finishing or trainer.iteration % every == 0) or not trainer.accelerator.is_main_process:
            return
        iteration = int(metrics["iteration"])
        grid, caption, values = self._evaluation(trainer.policy)
        metrics.update(values)
        folder = trainer.run.path / EVAL_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"iter_{iteration:04d}.png")
        trainer.run.log_image("eval", _array(grid), iteration, caption=caption)
        if self.keep_best is not None:
            self.keep_best(iteration, values["eval/reward_mean"])

    def grid(self, policy: DiffusionPolicy) -> tuple[Any, dict[str, float]]:
        """The evaluation's grid (a PIL image) and ``eval/`` metrics of ``policy``."""
        grid, _, values = self._evaluation(policy)
        return grid, values

    def _evaluation(self, policy: DiffusionPolicy) -> tuple[Any, str, dict[str, float]]:
        images, reward, scores = self.evaluate(policy)
        values = {"eval/reward_mean": reward.mean().item(), "eval/reward_std": reward.std(unbiased=False).item()}
        if len(scores) > 1:
            values.update({f"eval/rewards/{name}": v.mean().item() for name, v in scores.items()})
        grid, caption = captioned_grid(images, self.texts, reward.tolist(), self.config.eval_images_per_prompt)
        return grid, caption, values

    @torch.no_grad()
    def evaluate(self, policy: DiffusionPolicy) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(images, rewards, each reward function's)`` of the evaluation prompts, drawn
        from a generator seeded with ``eval_seed`` (in chunks of ``sample_batch_size``)."""
        texts = self.texts
        generator = torch.Generator().manual_seed(self.config.eval_seed)
        size = self.config.sample_batch_size or len(texts)
        images = torch.cat([policy.sample(texts[s : s + size], generator)["images"] for s in range(0, len(texts), size)])
        reward, scores = self.sampler.score(images, texts)
        return images, reward, scores


def grid_captions(prompts: Sequence[str], rewards: Sequence[float]) -> list[str]:
    """The caption of each tile of a grid: its prompt, then ``reward R`` on a line of its own."""
    return [f"{p}\nreward {r:.3g}" for p, r in zip(prompts, rewards)]


def image_grid(
    images: torch.Tensor, captions: Sequence[str], columns: int, tile: int = 96, *, font_size: int = 11, max_lines: int = 4
) -> Any:
    """A PIL image: ``images`` (``[N, 3, H, W]`` in [0, 1]) as ``columns``-wide rows of tiles
    scaled to at least ``tile`` pixels, each with its caption underneath (its lines wrapped
    to the tile's width, at most ``max_lines`` of them, in PIL's default font at ``font_size``)."""
    from PIL import Image, ImageDraw, ImageFont

    arrays = to_uint8(images)
    h, w = arrays.shape[1:3]
    scale = max(1, -(-tile // max(h, w)))
    th, tw = h * scale, w * scale
    font = ImageFont.load_default(size=font_size)
    wrapped = [_wrap(text, font, tw - 4, max_lines) for text in captions]
    line_height = font_size + 3
    caption = line_height * max((len(lines) for lines in wrapped), default=0) + 4
    rows = -(-len(arrays) // columns)
    grid = Image.new("RGB", (columns * tw, rows * (th + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (array, lines) in enumerate(zip(arrays, wrapped)):
        x, y = (k % columns) * tw, (k // columns) * (th + caption)
        grid.paste(Image.fromarray(array).resize((tw, th), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + th + 2 + j * line_height), line, fill="black", font=font)
    return grid


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """``text``'s lines broken between words to fit ``width`` pixels, at most ``max_lines``:
    the last line of a multi-line caption (the reward) is kept, the lines before it are cut
    short with an ellipsis (a word wider than ``width`` is cut too)."""
    paragraphs = [_wrap_words(part, font, width) for part in text.split("\n")]
    kept = paragraphs.pop() if len(paragraphs) > 1 else []
    lines = [line for part in paragraphs for line in part]
    room = max(1, max_lines - len(kept))
    if len(lines) > room:
        lines = [*lines[: room - 1], lines[room - 1] + " ..."]
    return [_fit(line, font, width) for line in [*lines, *kept]][:max_lines]


def _wrap_words(text: str, font: Any, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [*lines, line]


def _fit(line: str, font: Any, width: int) -> str:
    """``line`` cut (with an ellipsis) to ``width`` pixels."""
    if font.getlength(line) <= width:
        return line
    while line and font.getlength(line + "...") > width:
        line = line[:-1]
    return line + "..."


def _array(image: Any) -> Any:
    import numpy as np

    return np.asarray(image)
