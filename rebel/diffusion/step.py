"""One stochastic DDIM step as a policy step: its Gaussian, a draw from it, its log-density.

With DDIM noise ``eta > 0`` a denoising step is a Gaussian transition

    x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I)
    sigma_t  = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mu       = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps_hat

(``a`` = ``alphas_cumprod``; ``x0_hat`` and ``eps_hat`` come from the model output), which is
what ``DDIMScheduler.step`` samples. Here the density is exposed too, so that the chain
x_T -> ... -> x_0 is a trajectory whose log-probability is the sum of its steps'.

**Summed, not averaged, over latent dimensions.** ``log_prob`` is the log-density of the
whole latent: the sum over its D dimensions. The trajectory log-probability is the sum over
steps and dimensions, and REBEL regresses the *difference of log-ratios* onto the
*difference of rewards*, so the scale of Delta is part of the objective: eta multiplies it.
ddpo-pytorch (and TRL's DDPO) average over dimensions, which divides every log-ratio by D
(16384 for Stable Diffusion's 4x64x64 latents). For PPO's clipped ratio that is a choice of
trust region; for REBEL it would silently multiply the effective step size eta by D.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim_step_with_log_prob(
    scheduler: Any,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step from ``sample`` (x_t) with its log-density.

    Args:
        scheduler: a ``DDIMScheduler`` with ``set_timesteps`` already called.
        model_output: the (guided) model prediction at x_t, shaped like ``sample``
            (noise for ``prediction_type="epsilon"``, v for ``"v_prediction"``, x_0 for ``"sample"``).
        timestep: t, an int or a ``[B]`` tensor (one per sample).
        sample: x_t, ``[B, ...]``.
        eta: the DDIM noise scale; must be > 0 (eta = 0 is deterministic DDIM: no density).
        prev_sample: x_{t-1} to score; ``None`` draws one.
        generator: the random generator of the draw.

    Returns:
        ``(prev_sample, log_prob)``: x_{t-1} (the given one, or the draw) and ``[B]``
        ``log N(x_{t-1}; mu, sigma_t^2 I)`` summed over all non-batch dimensions, in float32.

    The predicted x_0 is clipped to ``clip_sample_range`` when the scheduler's
    ``clip_sample`` is set (or thresholded when ``thresholding`` is), exactly as
    ``DDIMScheduler.step`` does; clipping moves the mean only, so the density stays an exact
    Gaussian (with a zero gradient through clipped entries). The last step lands on
    ``final_alpha_cumprod`` (1 with ``set_alpha_to_one=True``, where sigma = 0 and the step
    is deterministic: a ``ValueError``; use :func:`ddim_step_mean_std` to take such a step).
    """
    mean, std = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    if bool((std <= 0).any()):
        raise ValueError(
            "the DDIM step has zero variance (sigma_t = 0): it is deterministic and has no log-density. "
            "This happens at the last step when the scheduler has set_alpha_to_one=True; leave such steps untrained"
        )
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device, dtype=mean.dtype)
        prev_sample = (mean + std * noise.to(mean.device)).to(sample.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def ddim_step_mean_std(scheduler: Any, model_output: Tensor, timestep: int | Tensor, sample: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """The mean ``[B, ...]`` and standard deviation (broadcastable ``[B, 1, ...]``) of the
    DDIM transition x_t -> x_{t-1}, in float32. ``eta`` must be > 0."""
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise ValueError(
            f"ddim_eta must be > 0 for a stochastic policy (eta = 0 is deterministic DDIM, which has no log-probability), got {eta!r}"
        )
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before taking steps")
    config = scheduler.config
    prediction = config.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction!r} is not supported; expected one of {', '.join(PREDICTION_TYPES)}")
    b = sample.shape[0]
    x = sample.float()
    out = model_output.float()
    device = x.device
    t = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(b)
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
    shape = (b,) + (1,) * (x.dim() - 1)
    a_t = alphas[t].reshape(shape)
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final).reshape(shape)

    if prediction == "epsilon":
        x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
        eps = out
    elif prediction == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    else:
        x0 = out
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    if config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def gaussian_log_prob(value: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``[B]`` log-density of ``value`` under N(mean, std^2 I), summed over non-batch dimensions (float32)."""
    value, mean = value.float(), mean.float()
    std = std.float().expand_as(mean)
    logp = -((value - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).sum(1)
