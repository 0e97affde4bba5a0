"""Tests for rebel.control.distributions against torch.distributions references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

pytest.importorskip("gymnasium")  # importing rebel.control also loads the gymnasium adapter

from rebel.control.distributions import (
    ATANH_EPS,
    ActionDistribution,
    Categorical,
    ClippedGaussian,
    SquashedGaussian,
)

BOUNDS = {
    "unbounded": (None, None),
    "scalar": (-2.0, 2.0),
    "per_dim": ([-1.0, 0.0, -3.0], [1.0, 0.5, 1.0]),
}


def _params(dtype: torch.dtype, batch: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, 3, generator=g, dtype=dtype)
    log_std = torch.empty(batch, 3, dtype=dtype).uniform_(-1.5, 0.5, generator=g)
    return mean, log_std


def _loc_scale(low: object, high: object, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if low is None:
        return torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    lo = torch.as_tensor(low, dtype=dtype).expand(3)
    hi = torch.as_tensor(high, dtype=dtype).expand(3)
    return (hi + lo) / 2, (hi - lo) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bounds", list(BOUNDS))
def test_squashed_log_prob_matches_torch(dtype: torch.dtype, bounds: str) -> None:
    low, high = BOUNDS[bounds]
    mean, log_std = _params(dtype)
    dist = SquashedGaussian(mean, log_std, low, high)
    action, pre_tanh = dist.sample(torch.Generator().manual_seed(1))
    loc, scale = _loc_scale(low, high, dtype)
    tanh, affine = TanhTransform(cache_size=1), AffineTransform(loc, scale, cache_size=1)
    torch_action = affine(tanh(pre_tanh))  # the cache lets torch invert back to pre_tanh exactly
    torch.testing.assert_close(action, torch_action)
    reference = TransformedDistribution(Normal(mean, log_std.exp()), [tanh, affine])
    expected = reference.log_prob(torch_action).sum(-1)
    ours = dist.log_prob(action, pre_tanh)
    assert ours.shape == (256,)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ours, expected, atol=tol, rtol=tol)


def test_squashed_log_prob_from_action_matches_torch_inverse() -> None:
    # Without pre_tanh both we and torch invert tanh; compare in float64, where that is accurate.
    mean, log_std = _params(torch.float64)
    low, high = BOUNDS["per_dim"]
    dist = SquashedGaussian(mean, log_std, low, high)
    action, pre_tanh = dist.sample(torch.Generator().manual_seed(1))
    loc, scale = _loc_scale(low, high, torch.float64)
    reference = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(cache_size=1), AffineTransform(loc, scale)])
    expected = reference.log_prob(action.clone()).sum(-1)
    torch.testing.assert_close(dist.log_prob(action), expected, atol=1e-6, rtol=1e-8)
    torch.testing.assert_close(dist.log_prob(action), dist.log_prob(action, pre_tanh), atol=1e-6, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squashed_log_prob_near_bounds_uses_pre_tanh(dtype: torch.dtype) -> None:
    # |u| up to 12: tanh(u) rounds to +-1 in float32, so only the pre_tanh path is exact.
    pre_tanh = torch.linspace(-12.0, 12.0, 3 * 41, dtype=dtype).reshape(41, 3)
    mean = (pre_tanh * 0.9).requires_grad_()
    log_std = torch.full_like(pre_tanh, -0.5, requires_grad=True)
    loc, scale = _loc_scale(*BOUNDS["per_dim"], dtype)
    dist = SquashedGaussian(mean, log_std, *BOUNDS["per_dim"])

    tanh, affine = TanhTransform(cache_size=1), AffineTransform(loc, scale, cache_size=1)
    action = affine(tanh(pre_tanh))  # caches u -> y -> a so torch inverts exactly
    reference = TransformedDistribution(Normal(mean, log_std.exp()), [tanh, affine])
    expected = reference.log_prob(action).sum(-1)

    ours = dist.log_prob(action, pre_tanh)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(dist.mode(), loc + scale * torch.tanh(mean))

    ours.sum().backward()  # the stable form keeps gradients finite at saturation
    assert mean.grad is not None and log_std.grad is not None
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_std.grad).all()

    # From the action alone the inverse is clamped: finite, and exact away from the bounds.
    from_action = dist.log_prob(action)
    assert torch.isfinite(from_action).all()
    inner = pre_tanh.abs().amax(-1) < 3.0
    torch.testing.assert_close(from_action[inner], expected[inner], atol=1e-3, rtol=1e-4)


def test_squashed_atanh_clamp_is_documented_epsilon() -> None:
    dist = SquashedGaussian(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    at_bound = dist.log_prob(torch.ones(1, dtype=torch.float64))
    u = math.atanh(1.0 - ATANH_EPS)
    expected = -0.5 * u * u - 0.5 * math.log(2 * math.pi) - math.log(1.0 - math.tanh(u) ** 2)
    assert at_bound.item() == pytest.approx(expected, rel=1e-9)


def test_squashed_sample_statistics() -> None:
    mean = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)
    log_std = torch.tensor([-1.0, -0.5, 0.0], dtype=torch.float64)
    low, high = BOUNDS["per_dim"]
    n = 200_000
    dist = SquashedGaussian(mean.expand(n, 3), log_std, low, high)
    action, pre_tanh = dist.sample(torch.Generator().manual_seed(0))
    assert action.shape == pre_tanh.shape == (n, 3)
    std = log_std.exp()
    assert torch.all((pre_tanh.mean(0) - mean).abs() < 5 * std / math.sqrt(n))
    torch.testing.assert_close(pre_tanh.std(0), std, rtol=0.01, atol=0)
    assert torch.all(action >= torch.tensor(low)) and torch.all(action <= torch.tensor(high))

    # E[loc + scale * tanh(u)] by Gauss-Hermite quadrature.
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    loc, scale = _loc_scale(low, high, torch.float64)
    exact = [
        loc[i].item() + scale[i].item() * float(np.sum(weights * np.tanh(mean[i].item() + std[i].item() * nodes)) / math.sqrt(2 * math.pi))
        for i in range(3)
    ]
    torch.testing.assert_close(action.mean(0), torch.tensor(exact, dtype=torch.float64), atol=5e-3, rtol=0)

    again, _ = dist.sample(torch.Generator().manual_seed(0))
    assert torch.equal(again, action)  # reproducible with an explicit generator


def test_squashed_gradients_flow_to_mean_and_log_std() -> None:
    mean = torch.randn(8, 2, requires_grad=True)
    log_std = torch.full((2,), -0.3, requires_grad=True)  # state-independent log_std broadcasts
    dist = SquashedGaussian(mean, log_std, -1.0, 3.0)
    assert dist.shape == (8, 2)
    action, pre_tanh = dist.sample(torch.Generator().manual_seed(0))
    (action.sum() + dist.log_prob(action.detach(), pre_tanh.detach()).sum()).backward()
    for p in (mean, log_std):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("bounds", list(BOUNDS))
def test_clipped_gaussian_log_prob_is_unclipped_normal(bounds: str) -> None:
    low, high = BOUNDS[bounds]
    mean, log_std = _params(torch.float64)
    mean = (mean * 3).requires_grad_()  # many samples fall outside the bounds
    dist = ClippedGaussian(mean, log_std, low, high)
    action, raw = dist.sample(torch.Generator().manual_seed(2))
    normal = Normal(mean, log_std.exp())
    torch.testing.assert_close(dist.log_prob(action, raw), normal.log_prob(raw).sum(-1))
    torch.testing.assert_close(dist.log_prob(raw), normal.log_prob(raw).sum(-1))
    torch.testing.assert_close(dist.entropy(), normal.entropy().sum(-1))
    if low is None:
        assert torch.equal(action, raw)
        assert torch.equal(dist.mode(), mean)
    else:
        lo, hi = torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64)
        assert not torch.equal(action, raw)
        assert torch.equal(action, torch.clamp(raw, lo, hi))
        assert torch.equal(dist.mode(), torch.clamp(mean, lo, hi))
    dist.log_prob(action.detach(), raw.detach()).sum().backward()
    assert mean.grad is not None and torch.isfinite(mean.grad).all() and mean.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [(), (5,), (4, 6)])
def test_categorical_matches_torch(batch: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*batch, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ours, ref = Categorical(logits), torch.distributions.Categorical(logits=logits)
    actions = torch.randint(0, 4, batch, generator=g)
    torch.testing.assert_close(ours.log_prob(actions), ref.log_prob(actions))
    torch.testing.assert_close(ours.entropy(), ref.entropy())
    assert torch.equal(ours.mode(), logits.argmax(-1))
    action, raw = ours.sample(g)
    assert action.shape == batch and action.dtype == torch.int64 and raw is action
    ours.log_prob(actions).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_categorical_sample_frequencies() -> None:
    logits = torch.tensor([0.0, 1.0, -1.0, -math.inf])
    n = 100_000
    dist = Categorical(logits.expand(n, 4))
    action, _ = dist.sample(torch.Generator().manual_seed(4))
    freq = torch.bincount(action, minlength=4).double() / n
    torch.testing.assert_close(freq, torch.softmax(logits.double(), -1), atol=5e-3, rtol=0)
    assert freq[3] == 0
    assert torch.isfinite(Categorical(logits).entropy())


def test_all_distributions_follow_the_protocol() -> None:
    mean, log_std = torch.zeros(2, 3), torch.zeros(3)
    for dist in (SquashedGaussian(mean, log_std), ClippedGaussian(mean, log_std), Categorical(torch.zeros(2, 3))):
        assert isinstance(dist, ActionDistribution)
        action, raw = dist.sample()
        assert dist.log_prob(action, raw).shape == (2,)
        assert dist.mode().shape == action.shape


def test_clear_errors() -> None:
    mean, log_std = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="low < high"):
        SquashedGaussian(mean, log_std, [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="low < high"):
        ClippedGaussian(mean, log_std, 1.0, -1.0)
    with pytest.raises(ValueError, match="both"):
        SquashedGaussian(mean, log_std, low=-1.0)
    with pytest.raises(ValueError, match="finite"):
        SquashedGaussian(mean, log_std, -math.inf, 1.0)
    with pytest.raises(ValueError, match="not broadcastable"):
        SquashedGaussian(mean, torch.zeros(2))
    with pytest.raises(ValueError, match="bound shape"):
        SquashedGaussian(mean, log_std, torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="at least one dimension"):
        ClippedGaussian(torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="floating point"):
        SquashedGaussian(torch.zeros(3, dtype=torch.long), torch.zeros(3))

    dist = SquashedGaussian(mean, log_std)
    with pytest.raises(ValueError, match="action shape"):
        dist.log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="pre_tanh shape"):
        dist.log_prob(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(TypeError, match="tensor"):
        dist.log_prob(np.zeros((4, 3)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tensors"):
        ClippedGaussian(np.zeros(3), np.zeros(3))  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError):
        dist.entropy()

    cat = Categorical(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="integer"):
        cat.log_prob(torch.zeros(4))
    with pytest.raises(TypeError, match="tensor"):
        cat.log_prob([0, 1, 2, 0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cat.log_prob(torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="batch shape"):
        cat.log_prob(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        Categorical(torch.tensor(1.0))
