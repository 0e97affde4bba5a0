"""The DDIM step as a Gaussian policy step: density, draws, errors."""

import math

import pytest
import torch

from rebel.diffusion import ddim_step_mean_std, ddim_step_with_log_prob


def scheduler(steps=10, **config):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, **config)
    s.set_timesteps(steps)
    return s


def reference(s, model_output, t, sample, eta, prev_sample):
    """Independent: the mean from diffusers' own step with zero noise, the std from its
    variance, the density from torch.distributions.Normal."""
    mean = s.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)).prev_sample
    prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
    std = eta * s._get_variance(t, prev_t) ** 0.5
    return torch.distributions.Normal(mean, std).log_prob(prev_sample).flatten(1).sum(1)


@pytest.mark.parametrize(
    "config",
    [
        {"prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False},
        {"prediction_type": "epsilon", "clip_sample": True, "set_alpha_to_one": True},
        {"prediction_type": "v_prediction", "clip_sample": False, "set_alpha_to_one": False},
    ],
)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_prob_matches_an_independent_gaussian(config, eta):
    s = scheduler(**config)
    g = torch.Generator().manual_seed(0)
    steps = s.timesteps.tolist() if not config["set_alpha_to_one"] else s.timesteps[:-1].tolist()  # last step: sigma = 0
    for t in steps:
        sample = torch.randn(3, 4, 5, 5, generator=g)
        out = torch.randn(3, 4, 5, 5, generator=g)
        prev = torch.randn(3, 4, 5, 5, generator=g) * 0.3 + sample * 0.9
        returned, logp = ddim_step_with_log_prob(s, out, t, sample, eta, prev_sample=prev)
        assert returned is prev and logp.shape == (3,)
        torch.testing.assert_close(logp, reference(s, out, t, sample, eta, prev), rtol=1e-4, atol=1e-3)


def test_log_prob_sums_over_latent_dimensions():
    s = scheduler()
    t = int(s.timesteps[3])
    sample, out = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mean, std = ddim_step_mean_std(s, out, t, sample, 1.0)
    _, logp = ddim_step_with_log_prob(s, out, t, sample, 1.0, prev_sample=mean)
    # at the mean, each of the 36 dimensions contributes -log(std) - log(2 pi)/2
    expected = 36 * (-std.flatten()[0].log() - 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(logp, expected.expand(2), rtol=1e-5, atol=1e-4)


def test_draws_have_the_step_mean_and_std():
    s = scheduler()
    t = int(s.timesteps[2])
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 2, 2, generator=g).expand(20_000, -1, -1, -1)
    out = torch.randn(1, 4, 2, 2, generator=g).expand(20_000, -1, -1, -1)
    draws, logp = ddim_step_with_log_prob(s, out, t, sample, 1.0, generator=g)
    mean, std = ddim_step_mean_std(s, out[:1], t, sample[:1], 1.0)
    assert std.item() > 0.05
    torch.testing.assert_close(draws.mean(0), mean[0], atol=4 * std.item() / math.sqrt(20_000), rtol=0)
    torch.testing.assert_close(draws.std(0), std.expand_as(mean)[0], atol=0.03 * std.item(), rtol=0)
    # the draws' log-probabilities: -(D/2) (1 + log(2 pi sigma^2)) on average (a Gaussian's negative entropy)
    d = 16
    assert logp.mean().item() == pytest.approx(-0.5 * d * (1 + math.log(2 * math.pi * std.item() ** 2)), abs=0.1)


def test_draw_is_diffusers_step_with_the_same_generator():
    s = scheduler()
    t = int(s.timesteps[4])
    sample, out = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ours, _ = ddim_step_with_log_prob(s, out, t, sample, 1.0, generator=torch.Generator().manual_seed(5))
    theirs = s.step(out, t, sample, eta=1.0, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps():
    s = scheduler()
    ts = s.timesteps[[1, 6]]
    sample, out, prev = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    _, both = ddim_step_with_log_prob(s, out, ts, sample, 1.0, prev_sample=prev)
    for k in range(2):
        _, one = ddim_step_with_log_prob(s, out[k : k + 1], int(ts[k]), sample[k : k + 1], 1.0, prev_sample=prev[k : k + 1])
        torch.testing.assert_close(both[k : k + 1], one)


@pytest.mark.parametrize("eta", [0.0, -1.0, float("nan")])
def test_eta_must_be_positive(eta):
    s = scheduler()
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="must be > 0"):
        ddim_step_with_log_prob(s, x, int(s.timesteps[0]), x, eta)


def test_zero_variance_last_step_is_an_error():
    s = scheduler(set_alpha_to_one=True)
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        ddim_step_with_log_prob(s, x, int(s.timesteps[-1]), x, 1.0)


def test_gradient_flows_to_the_model_output():
    s = scheduler()
    out = torch.randn(2, 4, 3, 3, requires_grad=True)
    x, prev = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    _, logp = ddim_step_with_log_prob(s, out, int(s.timesteps[2]), x, 1.0, prev_sample=prev)
    logp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
