"""A Stable Diffusion UNet as a REBEL policy: denoising steps are the steps.

A trajectory is one DDIM chain x_T -> x_{T-1} -> ... -> x_0 for a prompt. ``batch.data``
holds, per sample:

* ``latents`` ``[B, T + 1, C, H, W]``: x_T (the initial noise), ..., x_0 (decoded into the image);
* ``timesteps`` ``[B, T]``: the scheduler timestep of each step;
* ``prompt_embeds`` and ``negative_prompt_embeds`` ``[B, L, D]``: the text conditioning and
  the unconditional embedding of classifier-free guidance.

Step ``h`` moves x_h (``latents[:, h]``) to x_{h+1} (``latents[:, h + 1]``); its log-probability
recomputes the guided UNet output at x_h and scores the stored x_{h+1} with
:func:`~rebel.diffusion.ddim_step_with_log_prob`. ``batch.mask`` ``[B, T]`` marks the trained
steps (``timestep_fraction`` of them, chosen per sample at random, as in DDPO); the
trajectory log-probability is the sum over those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rebel.batch import RolloutBatch
from rebel.config import check_choice, check_int
from rebel.diffusion.step import ddim_step_mean_std, ddim_step_with_log_prob
from rebel.hf.inputs import load_pretrained
from rebel.policy import Policy

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LOG_PROB_REDUCTIONS = ("sum", "mean")
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PIPELINE_EXPECTED = (
    "a folder in diffusers format or a hub id (org/name) reachable from this machine "
    "(download it first, e.g. `huggingface-cli download runwayml/stable-diffusion-v1-5 --local-dir sd15`)"
)


class DiffusionPolicy(Policy):
    """REBEL policy over the components of a ``StableDiffusionPipeline``.

    Args:
        pipeline: a ``StableDiffusionPipeline`` object, or its folder / hub id.
        num_inference_steps: DDIM steps of a trajectory (T).
        guidance_scale: classifier-free guidance weight (<= 1: no guidance, one UNet pass).
        ddim_eta: DDIM noise scale (> 0: a stochastic policy).
        log_prob_reduction: ``sum`` (default: the log-density of the whole latent) or ``mean``
            over the latent's D dimensions (ddpo-pytorch's convention: every log-ratio / D).
        lora_rank: train a LoRA adapter of this rank on the UNet's attention projections;
            ``None``: fine-tune the whole UNet.
        lora_alpha: LoRA scaling numerator (default: ``lora_rank``).
        resolution: image side in pixels (default: the UNet's ``sample_size`` times the VAE's factor).
        sample_precision: ``no | bf16 | fp16``: autocast dtype of sampling (scoring follows the trainer's).
        gradient_checkpointing: recompute UNet activations in the backward pass.
        pipeline_kwargs: passed to ``from_pretrained``.

    The VAE and the text encoder are frozen; all modules stay in eval mode (no dropout), so
    scoring and training are one computation.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        ddim_eta: float = 1.0,
        log_prob_reduction: str = "sum",
        lora_rank: int | None = 4,
        lora_alpha: int | None = None,
        resolution: int | None = None,
        sample_precision: str = "no",
        gradient_checkpointing: bool = False,
        pipeline_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from diffusers import DDIMScheduler

        check_int("num_inference_steps", num_inference_steps)
        if not ddim_eta > 0:
            raise ValueError(f"ddim_eta must be > 0 (a deterministic DDIM chain has no log-probability), got {ddim_eta}")
        check_choice("log_prob_reduction", log_prob_reduction, LOG_PROB_REDUCTIONS)
        check_choice("sample_precision", sample_precision, tuple(AUTOCAST))
        pipe = load_pipeline(pipeline, pipeline_kwargs)
        self.source = pipeline if isinstance(pipeline, (str, Path)) else getattr(pipe, "name_or_path", None)
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.num_inference_steps = num_inference_steps
        self.scheduler.set_timesteps(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.ddim_eta = float(ddim_eta)
        self.log_prob_reduction = log_prob_reduction
        self.sample_precision = sample_precision
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = resolution or self.unet.config.sample_size * self.vae_scale_factor
        if self.resolution % self.vae_scale_factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae_scale_factor}")
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.lora_rank = lora_rank
        if lora_rank is not None:
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS),
                lora_dropout=0.0,
            )
            self.unet.add_adapter(config)
        else:
            self.unet.requires_grad_(True)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self._negative: Tensor | None = None
        self.train(True)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> DiffusionPolicy:
        """Every module stays in eval mode: no dropout, so scoring equals training."""
        super().train(mode)
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    # --------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """``[B, L, D]`` text-encoder hidden states of the prompts (padded to the tokenizer's length)."""
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return self.text_encoder(tok.input_ids.to(self.device))[0]

    def negative_embeds(self, batch_size: int) -> Tensor:
        """The empty prompt's embedding (classifier-free guidance's unconditional input), repeated."""
        if self._negative is None or self._negative.device != self.device:
            self._negative = self.encode_prompts([""])
        return self._negative.expand(batch_size, -1, -1)

    # ------------------------------------------------------------ the model
    def guided_output(self, latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor, negative_embeds: Tensor) -> Tensor:
        """The UNet prediction at ``latents`` with classifier-free guidance:
        ``uncond + guidance_scale * (cond - uncond)`` (one conditional pass when guidance_scale <= 1)."""
        dtype = self.unet.dtype
        if self.guidance_scale <= 1.0:
            return self.unet(latents.to(dtype), timesteps, prompt_embeds.to(dtype)).sample
        both = self.unet(
            torch.cat([latents, latents]).to(dtype),
            torch.cat([timesteps, timesteps]),
            torch.cat([negative_embeds, prompt_embeds]).to(dtype),
        ).sample
        uncond, cond = both.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def step_log_probs(self, batch: RolloutBatch) -> Tensor:
        """``[B, T]`` log pi(x_{h+1} | x_h, prompt) of the trained steps (0 elsewhere)."""
        latents, timesteps = batch.data["latents"], batch.data["timesteps"]
        cond, uncond = batch.data["prompt_embeds"], batch.data["negative_prompt_embeds"]
        mask = batch.mask
        out = torch.zeros(mask.shape, device=latents.device, dtype=torch.float32)
        for h in torch.nonzero(mask.any(0)).flatten().tolist():
            rows = torch.nonzero(mask[:, h]).flatten()
            x, t = latents[rows, h], timesteps[rows, h]
            model_output = self.guided_output(x, t, cond[rows], uncond[rows])
            _, logp = ddim_step_with_log_prob(self.scheduler, model_output, t, x, self.ddim_eta, prev_sample=latents[rows, h + 1])
            if self.log_prob_reduction == "mean":
                logp = logp / x[0].numel()
            out = out.index_put((rows, torch.full_like(rows, h)), logp)
        return out

    # -------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], generator: torch.Generator) -> dict[str, Tensor]:
        """Run the DDIM chain for each prompt. Returns ``latents`` ``[B, T+1, C, H, W]``,
        ``timesteps`` ``[B, T]``, ``prompt_embeds``, ``negative_prompt_embeds``, ``stochastic``
        ``[T]`` (steps with sigma > 0; a zero-variance last step is not a policy step) and
        ``images`` ``[B, 3, H, W]`` in [0, 1] (float32, CPU). Noise comes from ``generator``
        (CPU), so a run is reproducible on any device."""
        device, b = self.device, len(prompts)
        cond = self.encode_prompts(prompts)
        uncond = self.negative_embeds(b)
        self.scheduler.set_timesteps(self.num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        x = torch.randn((b, *self.latent_shape), generator=generator).to(device) * self.scheduler.init_noise_sigma
        chain, stochastic = [x], []
        with self.autocast():
            for t in timesteps:
                t_batch = t.expand(b)
                model_output = self.guided_output(x, t_batch, cond, uncond).float()
                mean, std = ddim_step_mean_std(self.scheduler, model_output, t_batch, x, self.ddim_eta)
                noise = torch.randn(mean.shape, generator=generator).to(device)
                x = mean + std * noise
                chain.append(x)
                stochastic.append(bool((std > 0).all()))
        return {
            "latents": torch.stack(chain, 1),
            "timesteps": timesteps.expand(b, -1).clone(),
            "prompt_embeds": cond,
            "negative_prompt_embeds": uncond.clone(),
            "stochastic": torch.tensor(stochastic),
            "images": self.decode(x),
        }

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``[B, 3, H, W]`` images in [0, 1] (float32, CPU) from final latents."""
        vae = self.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        dtype = AUTOCAST[self.sample_precision]
        if dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=dtype):
                yield

    # ---------------------------------------------------------------- saving
    def pipeline(self) -> Any:
        """A ``StableDiffusionPipeline`` over the policy's components (trained UNet, DDIM scheduler)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pretrained(self, path: str | Path) -> Path:
        """Save what was trained: with LoRA the adapter as diffusers LoRA weights
        (``pipeline.load_lora_weights(path)`` loads it back); otherwise the UNet (``path/unet``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.lora_rank is None:
            self.unet.save_pretrained(str(path / "unet"))
            return path
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        StableDiffusionPipeline.save_lora_weights(save_directory=str(path), unet_lora_layers=layers, safe_serialization=True)
        return path


def load_pipeline(pipeline: Any, kwargs: dict[str, Any] | None = None) -> Any:
    """A ``StableDiffusionPipeline`` from an object, a folder or a hub id (a clear error when
    the weights are not on this machine)."""
    if not isinstance(pipeline, (str, Path)):
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipeline, name, None) is None:
                raise ValueError(f"the pipeline has no {name}; REBEL needs a StableDiffusionPipeline's components")
        return pipeline
    from diffusers import StableDiffusionPipeline

    kwargs = {"safety_checker": None, "requires_safety_checker": False, **(kwargs or {})}
    pipe = load_pretrained(StableDiffusionPipeline.from_pretrained, pipeline, "Stable Diffusion pipeline", PIPELINE_EXPECTED, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
