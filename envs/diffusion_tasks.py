"""A tiny Stable Diffusion pipeline that learns coloured shapes on a CPU in a minute or two.

The default task of ``rebel train diffusion``: prompts name a colour and a shape
(``"a red circle"``, ``"a blue square"``, ...); the pictures are 16x16 shapes of random
size and position on a black background. The starting pipeline is a complete
``StableDiffusionPipeline`` built from configs (a tiny UNet2DConditionModel, AutoencoderKL
and CLIPTextModel, a character-level CLIPTokenizer written in-process, a DDIM scheduler
with Stable Diffusion's schedule), trained in-process for a short while: the VAE as an
autoencoder of the pictures, then the UNet with the denoising loss (10% of the prompts
dropped for classifier-free guidance). It draws the right colour and shape at random
sizes: a non-trivial policy. The REBEL reward is the image's brightness, which grows with
the shape's area: the grids show the shapes grow.
"""

from __future__ import annotations

import json
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rebel.config import option
from rebel.console import quiet_saving, stage

COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.2, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("circle", "square")


@dataclass
class ShapesTaskConfig:
    """The embedded coloured-shapes task and its tiny starting pipeline."""

    image_size: int = option(16, "picture side in pixels (latents are half of it)")
    min_radius: int = option(2, "smallest half-size of a shape in pixels")
    max_radius: int = option(6, "largest half-size of a shape in pixels")
    task_seed: int = option(0, "seed of the pipeline's initialisation and its warm-up")
    vae_steps: int = option(300, "autoencoder warm-up steps of the tiny VAE")
    unet_steps: int = option(600, "denoising warm-up steps of the tiny UNet")
    pretrain_batch: int = option(32, "pictures per warm-up step")
    width: int = option(32, "channels of the UNet's first block (the second has twice as many)")

    def __post_init__(self) -> None:
        if not 1 <= self.min_radius <= self.max_radius or 2 * self.max_radius > self.image_size:
            raise ValueError(f"need 1 <= min_radius <= max_radius <= image_size / 2, got {self.min_radius}, {self.max_radius}")
        if self.image_size % 2:
            raise ValueError(f"image_size must be even (the VAE halves it), got {self.image_size}")


def shape_prompts() -> list[str]:
    """Every prompt of the task: ``"a <colour> <shape>"``."""
    return [f"a {color} {shape}" for color in COLORS for shape in SHAPES]


def draw_shapes(prompts: list[str], config: ShapesTaskConfig, generator: torch.Generator) -> torch.Tensor:
    """``[N, 3, S, S]`` pictures in [0, 1]: each prompt's shape in its colour, of random size
    and position, on black."""
    s = config.image_size
    out = torch.zeros(len(prompts), 3, s, s)
    ys, xs = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    for i, prompt in enumerate(prompts):
        _, color, shape = prompt.split()
        r = int(torch.randint(config.min_radius, config.max_radius + 1, (1,), generator=generator))
        cy, cx = (torch.randint(r, s - r + 1, (2,), generator=generator)).tolist()
        if shape == "circle":
            inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= r**2
        else:
            inside = ((ys - cy).abs() <= r) & ((xs - cx).abs() <= r)
        out[i] = inside.float() * torch.tensor(COLORS[color]).view(3, 1, 1)
    return out


def char_clip_tokenizer(max_length: int = 24) -> Any:
    """A character-level ``CLIPTokenizer`` (letters and ``</w>`` word ends, no merges), its
    vocabulary written to a temporary folder and loaded from there."""
    from transformers import CLIPTokenizer

    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=max_length)


def tiny_pipeline(image_size: int = 16, width: int = 32, seed: int = 0) -> Any:
    """A randomly initialised ``StableDiffusionPipeline`` of tiny components (about a million
    parameters): latents ``4 x image_size/2 x image_size/2``, Stable Diffusion's DDIM schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = char_clip_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(width, 2 * width),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=image_size,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def pretrain_shapes(pipe: Any, config: ShapesTaskConfig, progress: bool = False) -> dict[str, float]:
    """Warm the tiny pipeline up on the task's pictures: the VAE as an autoencoder, then the
    UNet with the denoising loss (with ``progress``, a bar and a timing line per stage).
    Returns the final losses."""
    generator = torch.Generator().manual_seed(config.task_seed)
    prompts = shape_prompts()
    vae, unet, scheduler = pipe.vae, pipe.unet, pipe.scheduler

    def batch() -> tuple[list[str], torch.Tensor]:
        chosen = [prompts[i] for i in torch.randint(len(prompts), (config.pretrain_batch,), generator=generator).tolist()]
        return chosen, draw_shapes(chosen, config, generator) * 2 - 1

    with torch.random.fork_rng():
        torch.manual_seed(config.task_seed)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
        vae_loss = torch.tensor(0.0)
        for _ in stage(config.vae_steps, "warm-up 1/2: autoencoder", progress):
            _, pictures = batch()
            posterior = vae.encode(pictures).latent_dist
            recon = vae.decode(posterior.sample()).sample
            vae_loss = torch.nn.functional.mse_loss(recon, pictures) + 1e-4 * posterior.kl().mean() / pictures[0].numel()
            optimizer.zero_grad()
            vae_loss.backward()
            optimizer.step()
        vae.requires_grad_(False).eval()
        with torch.no_grad():
            latents = torch.cat([vae.encode(batch()[1]).latent_dist.mode() for _ in range(8)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))

        text_encoder = pipe.text_encoder.requires_grad_(False).eval()
        with torch.no_grad():
            ids = pipe.tokenizer([*prompts, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
            embeds = text_encoder(ids.input_ids)[0]
        table = {p: embeds[i] for i, p in enumerate([*prompts, ""])}
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        unet_loss = torch.tensor(0.0)
        for _ in stage(config.unet_steps, "warm-up 2/2: denoiser", progress):
            chosen, pictures = batch()
            with torch.no_grad():
                x0 = vae.encode(pictures).latent_dist.mode() * vae.config.scaling_factor
            dropped = torch.rand(len(chosen), generator=generator) < 0.1
            cond = torch.stack([table["" if d else p] for p, d in zip(chosen, dropped.tolist())])
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(chosen),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            noisy = scheduler.add_noise(x0, noise, t)
            unet_loss = torch.nn.functional.mse_loss(unet(noisy, t, cond).sample, noise)
            optimizer.zero_grad()
            unet_loss.backward()
            optimizer.step()
        unet.eval()
    return {"vae_loss": vae_loss.item(), "unet_loss": unet_loss.item()}


def make_shapes_pipeline(config: ShapesTaskConfig, save_to: str | Path | None = None, progress: bool = False) -> Any:
    """The task's starting pipeline: :func:`tiny_pipeline`, warmed up by :func:`pretrain_shapes`
    (``progress``: its bars); saved with ``save_pretrained`` to ``save_to`` when given."""
    pipe = tiny_pipeline(config.image_size, config.width, config.task_seed)
    pretrain_shapes(pipe, config, progress)
    if save_to is not None:
        with quiet_saving():
            pipe.save_pretrained(str(save_to))
    return pipe
