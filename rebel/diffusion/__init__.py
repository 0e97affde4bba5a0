"""Stable Diffusion with REBEL (diffusers, peft): denoising steps are the steps.

* :func:`ddim_step_with_log_prob`: a stochastic DDIM step and its log-density.
* :class:`DiffusionPolicy`: the UNet of a ``StableDiffusionPipeline`` as a :class:`rebel.Policy`.
* :class:`DiffusionSampler`: groups of images per prompt, scored by reward functions.
* :class:`DiffusionConfig`, :class:`DiffusionTrainer`: the DDPO-like front end.
* Rewards: :func:`jpeg_compressibility`, :func:`jpeg_incompressibility`, :class:`AestheticScorer`.

diffusers, transformers and peft load when a pipeline is built or a step is taken.
"""

from rebel.diffusion.policy import DiffusionPolicy, load_pipeline
from rebel.diffusion.rewards import (
    AestheticHead,
    AestheticScorer,
    brightness,
    call_reward,
    jpeg_compressibility,
    jpeg_incompressibility,
    jpeg_size_kb,
)
from rebel.diffusion.sampler import ANIMALS, DiffusionSampler, prompt_source
from rebel.diffusion.step import ddim_step_mean_std, ddim_step_with_log_prob, gaussian_log_prob
from rebel.diffusion.trainer import DiffusionConfig, DiffusionTrainer, ImageGridLogger, image_grid
from rebel.hf.inputs import RewardFunctionError

__all__ = [
    "ANIMALS",
    "AestheticHead",
    "AestheticScorer",
    "DiffusionConfig",
    "DiffusionPolicy",
    "DiffusionSampler",
    "DiffusionTrainer",
    "ImageGridLogger",
    "RewardFunctionError",
    "brightness",
    "call_reward",
    "ddim_step_mean_std",
    "ddim_step_with_log_prob",
    "gaussian_log_prob",
    "image_grid",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "load_pipeline",
    "prompt_source",
]
