"""The diffusion policy: chains, per-step log-probs, trained steps, LoRA save/load."""

import pytest
import torch

from rebel import RolloutBatch
from rebel.diffusion import DiffusionPolicy, DiffusionSampler, brightness, ddim_step_with_log_prob


def make(tiny_pipe, **kwargs):
    torch.manual_seed(0)
    return DiffusionPolicy(tiny_pipe, **{"num_inference_steps": 4, "guidance_scale": 2.0, "lora_rank": 2, **kwargs})


def test_chain_is_stored_per_sample_and_scored_step_by_step(tiny_pipe):
    policy = make(tiny_pipe)
    sampler = DiffusionSampler(["a red circle", "a blue square"], brightness, prompts_per_iteration=2, num_generations=2)
    sampler.seed(0)
    batch = sampler.collect(policy)
    lat = batch.data["latents"]
    assert lat.shape == (4, 5, 4, 4, 4) and batch.data["timesteps"].shape == (4, 4)
    assert batch.data["prompt_embeds"].shape[0] == batch.data["negative_prompt_embeds"].shape[0] == 4
    assert batch.group.tolist() == [0, 0, 1, 1] and batch.context[0] == batch.context[1]
    assert batch.mask.all()
    with torch.no_grad():
        steps = policy.step_log_probs(batch)
        # step h by hand: the guided UNet output at x_h scores x_{h+1}
        h = 2
        t = batch.data["timesteps"][:, h]
        cond, uncond = batch.data["prompt_embeds"], batch.data["negative_prompt_embeds"]
        e_u = policy.unet(lat[:, h], t, uncond).sample
        e_c = policy.unet(lat[:, h], t, cond).sample
        guided = e_u + 2.0 * (e_c - e_u)
        _, expected = ddim_step_with_log_prob(policy.scheduler, guided, t, lat[:, h], 1.0, prev_sample=lat[:, h + 1])
    torch.testing.assert_close(steps[:, h], expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(policy.log_prob(batch), steps.sum(1))
    # the draws were made with the policy's own step: their log-density is that of a Gaussian draw
    assert steps.shape == (4, 4) and torch.isfinite(steps).all()


def test_mean_reduction_divides_each_step_by_the_latent_size(tiny_pipe):
    """DDPO's convention: the step log-density averaged over the latent's D = 4*4*4 dimensions."""
    summed, averaged = make(tiny_pipe), make(tiny_pipe, log_prob_reduction="mean")
    sampler = DiffusionSampler(["a red circle"], brightness, prompts_per_iteration=2, num_generations=2)
    sampler.seed(0)
    batch = sampler.collect(summed)
    with torch.no_grad():
        torch.testing.assert_close(averaged.step_log_probs(batch), summed.step_log_probs(batch) / 64)
    with pytest.raises(ValueError, match="log_prob_reduction='median' is not supported; expected one of sum, mean"):
        make(tiny_pipe, log_prob_reduction="median")


def test_timestep_fraction_trains_a_random_subset_of_steps(tiny_pipe):
    policy = make(tiny_pipe)
    sampler = DiffusionSampler(["a red circle"], brightness, prompts_per_iteration=3, timestep_fraction=0.5)
    sampler.seed(0)
    batch = sampler.collect(policy)
    assert batch.mask.sum(1).tolist() == [2] * 6
    assert len({tuple(row.tolist()) for row in batch.mask}) > 1  # chosen per sample
    with torch.no_grad():
        steps = policy.step_log_probs(batch)
    assert (steps[~batch.mask] == 0).all() and (steps[batch.mask] != 0).all()


def test_sampling_is_reproducible_from_the_sampler_state(tiny_pipe):
    policy = make(tiny_pipe)
    sampler = DiffusionSampler("animals", brightness, prompts_per_iteration=2)
    sampler.seed(3)
    state = sampler.state_dict()
    first = sampler.collect(policy)
    sampler.load_state_dict(state)
    again = sampler.collect(policy)
    assert first.context == again.context
    assert torch.equal(first.data["latents"], again.data["latents"])


def test_lora_round_trip_through_diffusers(tiny_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    policy = make(tiny_pipe)
    with torch.no_grad():  # a trained adapter: LoRA's B matrices start at zero
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    policy.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([500, 300]), torch.randn(2, 24, 32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe)
    with torch.no_grad():
        base = pipe.unet(x, t, c).sample
        pipe.load_lora_weights(str(tmp_path / "lora"))
        loaded = pipe.unet(x, t, c).sample
        trained = policy.unet(x, t, c).sample
    assert (base - trained).abs().max() > 1e-3
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


def test_full_finetuning_saves_the_unet(tiny_pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    policy = make(tiny_pipe, lora_rank=None)
    assert all(p.requires_grad for p in policy.unet.parameters())
    assert not any(p.requires_grad for p in policy.vae.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    policy.save_pretrained(tmp_path / "model")
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "model" / "unet"))
    x, t, c = torch.randn(1, 4, 4, 4), torch.tensor([400]), torch.randn(1, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, c).sample, policy.unet(x, t, c).sample)


def test_missing_pipeline_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusers format"):
        DiffusionPolicy(str(tmp_path / "nowhere"))


def test_deterministic_ddim_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="ddim_eta must be > 0"):
        make(tiny_pipe, ddim_eta=0.0)


def test_zero_variance_last_step_is_not_trained(tiny_pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    policy = make(pipe)
    sampler = DiffusionSampler(["a red circle"], brightness, prompts_per_iteration=1)
    batch = sampler.collect(policy)
    assert batch.mask[:, :-1].all() and not batch.mask[:, -1].any()
    assert isinstance(batch, RolloutBatch)
