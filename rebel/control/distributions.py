"""Action distributions for continuous (Box) and discrete action spaces.

All distributions share the small :class:`ActionDistribution` interface:

* ``sample(generator=None) -> (action, raw)``: ``action`` is ready to be sent to the
  env; ``raw`` is the value to keep for exact log-probabilities later (the
  pre-tanh value for :class:`SquashedGaussian`, the unclipped sample for
  :class:`ClippedGaussian`, the action itself for :class:`Categorical`).
  Gaussian samples are reparameterized: gradients flow to ``mean`` and ``log_std``.
* ``log_prob(action, raw=None)``: log-density summed over the action dimension
  (continuous) or log-probability of the index (discrete).
* ``mode()``: deterministic action for evaluation.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATANH_EPS",
    "ActionDistribution",
    "Categorical",
    "ClippedGaussian",
    "MultiCategorical",
    "SquashedGaussian",
]

#: Default clamp used when inverting tanh: ``y`` is clamped to ``[-1 + eps, 1 - eps]``
#: before ``atanh`` (so ``|u| <= ~7.25``). Pass ``pre_tanh`` to avoid it entirely.
ATANH_EPS = 1e-6

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)
BoundLike = Tensor | np.ndarray | float | list[float] | None


@runtime_checkable
class ActionDistribution(Protocol):
    """Common interface of the action distributions in this module."""

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(action for the env, raw value for log_prob)``."""
        ...

    def log_prob(self, action: Tensor, raw: Tensor | None = None, /) -> Tensor:
        """Log-probability of ``action`` (use ``raw`` from :meth:`sample` when available)."""
        ...

    def mode(self) -> Tensor:
        """Deterministic action."""
        ...


def _gaussian_params(mean: Tensor, log_std: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(mean, Tensor) or not isinstance(log_std, Tensor):
        raise TypeError("mean and log_std must be torch tensors")
    if mean.dim() == 0:
        raise ValueError("mean must have at least one dimension (the action dimension)")
    if not mean.is_floating_point() or not log_std.is_floating_point():
        raise ValueError(f"mean and log_std must be floating point, got {mean.dtype} and {log_std.dtype}")
    try:
        shape = torch.broadcast_shapes(mean.shape, log_std.shape)
    except RuntimeError as exc:
        raise ValueError(f"mean shape {tuple(mean.shape)} and log_std shape {tuple(log_std.shape)} are not broadcastable") from exc
    return mean.expand(shape), log_std.expand(shape)


def _bounds(low: BoundLike, high: BoundLike, like: Tensor) -> tuple[Tensor, Tensor] | None:
    """Validate action bounds and return them as tensors broadcastable to ``like``."""
    if low is None and high is None:
        return None
    if low is None or high is None:
        raise ValueError("give both low and high action bounds, or neither")
    lo = torch.as_tensor(low, dtype=like.dtype, device=like.device)
    hi = torch.as_tensor(high, dtype=like.dtype, device=like.device)
    for name, b in (("low", lo), ("high", hi)):
        try:
            torch.broadcast_shapes(b.shape, like.shape)
        except RuntimeError as exc:
            raise ValueError(f"{name} bound shape {tuple(b.shape)} does not match action shape {tuple(like.shape)}") from exc
        if not torch.isfinite(b).all():
            raise ValueError(f"{name} bound must be finite, got {b}")
    if not (lo < hi).all():
        raise ValueError(f"need low < high for every action dimension, got low={lo}, high={hi}")
    return lo, hi


def _check_action(action: Tensor, shape: torch.Size, what: str = "action") -> None:
    if not isinstance(action, Tensor):
        raise TypeError(f"{what} must be a torch tensor, got {type(action).__name__}")
    try:
        torch.broadcast_shapes(action.shape, shape)
    except RuntimeError as exc:
        raise ValueError(f"{what} shape {tuple(action.shape)} does not match distribution shape {tuple(shape)}") from exc


def _normal_log_prob(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Elementwise log N(x; mean, exp(log_std)^2)."""
    z = (x - mean) * torch.exp(-log_std)
    return -0.5 * z * z - log_std - _LOG_SQRT_2PI


class _DiagonalGaussian:
    """What both Gaussians share: ``mean`` and ``log_std`` broadcast to one shape, and their
    reparameterized draw."""

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        self.mean, self.log_std = _gaussian_params(mean, log_std)

    @property
    def shape(self) -> torch.Size:
        """Shape of one sample (batch shape + action dimension)."""
        return self.mean.shape

    @property
    def std(self) -> Tensor:
        return torch.exp(self.log_std)

    def _draw(self, generator: torch.Generator | None) -> Tensor:
        """``mean + std * noise`` with standard normal ``noise`` drawn from ``generator``."""
        noise = torch.randn(self.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise


class SquashedGaussian(_DiagonalGaussian):
    """Diagonal Gaussian in pre-tanh space, squashed by tanh and affinely rescaled.

    ``action = loc + scale * tanh(u)``, ``u ~ N(mean, exp(log_std)^2)``, with
    ``loc = (high + low) / 2`` and ``scale = (high - low) / 2`` (``loc=0, scale=1``,
    i.e. actions in ``(-1, 1)``, when no bounds are given).

    Args:
        mean, log_std: broadcastable tensors; the last dimension is the action dimension.
        low, high: optional finite action bounds (broadcastable to the action shape).
        eps: clamp used by :meth:`log_prob` when it has to invert tanh (see :data:`ATANH_EPS`).
    """

    def __init__(
        self,
        mean: Tensor,
        log_std: Tensor,
        low: BoundLike = None,
        high: BoundLike = None,
        eps: float = ATANH_EPS,
    ) -> None:
        super().__init__(mean, log_std)
        bounds = _bounds(low, high, self.mean)
        if bounds is None:
            self.loc = torch.zeros((), dtype=self.mean.dtype, device=self.mean.device)
            self.scale = torch.ones((), dtype=self.mean.dtype, device=self.mean.device)
        else:
            self.loc = (bounds[1] + bounds[0]) / 2
            self.scale = (bounds[1] - bounds[0]) / 2
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.eps = eps

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Reparameterized sample: returns ``(action, pre_tanh)``."""
        pre_tanh = self._draw(generator)
        return self.loc + self.scale * torch.tanh(pre_tanh), pre_tanh

    def log_prob(self, action: Tensor, pre_tanh: Tensor | None = None) -> Tensor:
        """Log-density of ``action``, summed over the last dimension.

        Uses the exact change of variables
        ``log p(a) = log N(u) - sum log(scale * (1 - tanh(u)^2))`` with the stable form
        ``log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2u))``. If ``pre_tanh`` is not
        given it is recovered as ``atanh`` of the rescaled action clamped to
        ``[-1 + eps, 1 - eps]``; pass the ``pre_tanh`` returned by :meth:`sample` for
        exact values near the bounds.
        """
        _check_action(action, self.shape)
        if pre_tanh is None:
            y = ((action - self.loc) / self.scale).clamp(-1.0 + self.eps, 1.0 - self.eps)
            pre_tanh = torch.atanh(y)
        else:
            _check_action(pre_tanh, self.shape, "pre_tanh")
        log_det = torch.log(self.scale) + 2.0 * (_LOG_2 - pre_tanh - F.softplus(-2.0 * pre_tanh))
        return (_normal_log_prob(pre_tanh, self.mean, self.log_std) - log_det).sum(-1)

    def mode(self) -> Tensor:
        """Deterministic action ``loc + scale * tanh(mean)``."""
        return self.loc + self.scale * torch.tanh(self.mean)

    def entropy(self) -> Tensor:
        raise NotImplementedError("SquashedGaussian has no closed-form entropy; estimate it with -log_prob of samples")


class ClippedGaussian(_DiagonalGaussian):
    """Plain diagonal Gaussian whose samples are clipped to the bounds only for the env.

    As in Stable-Baselines3's PPO, :meth:`log_prob` and :meth:`entropy` are those of
    the *unclipped* Gaussian: keep the unclipped sample (the second value returned
    by :meth:`sample`) and evaluate ``log_prob`` on it; the clipped action is only
    what the env receives. Without bounds nothing is clipped.
    """

    def __init__(self, mean: Tensor, log_std: Tensor, low: BoundLike = None, high: BoundLike = None) -> None:
        super().__init__(mean, log_std)
        self.bounds = _bounds(low, high, self.mean)

    def clip(self, action: Tensor) -> Tensor:
        """Clip ``action`` to the bounds (identity without bounds)."""
        if self.bounds is None:
            return action
        return torch.clamp(action, self.bounds[0], self.bounds[1])

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Reparameterized sample: returns ``(clipped action, unclipped sample)``."""
        raw = self._draw(generator)
        return self.clip(raw), raw

    def log_prob(self, action: Tensor, unclipped: Tensor | None = None) -> Tensor:
        """Gaussian log-density of the unclipped sample, summed over the last dimension.

        ``unclipped`` is used when given; otherwise ``action`` is taken to be unclipped.
        """
        x = action if unclipped is None else unclipped
        _check_action(x, self.shape, "action" if unclipped is None else "unclipped")
        return _normal_log_prob(x, self.mean, self.log_std).sum(-1)

    def mode(self) -> Tensor:
        """Deterministic action: the mean, clipped to the bounds."""
        return self.clip(self.mean)

    def entropy(self) -> Tensor:
        """Entropy of the unclipped Gaussian, summed over the last dimension."""
        return (self.log_std + 0.5 + _LOG_SQRT_2PI).sum(-1)


class Categorical:
    """Categorical distribution over ``n`` actions from unnormalized ``logits`` of shape ``(..., n)``."""

    def __init__(self, logits: Tensor) -> None:
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a torch tensor, got {type(logits).__name__}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
        if logits.dim() == 0 or logits.shape[-1] == 0:
            raise ValueError(f"logits must have shape (..., n) with n >= 1, got {tuple(logits.shape)}")
        self.logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # normalized log-probs

    @property
    def shape(self) -> torch.Size:
        """Batch shape (shape of one sample)."""
        return self.logits.shape[:-1]

    @property
    def probs(self) -> Tensor:
        return torch.exp(self.logits)

    @property
    def num_actions(self) -> int:
        return self.logits.shape[-1]

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sample action indices (int64); returns ``(action, action)``."""
        flat = self.probs.detach().reshape(-1, self.num_actions)
        action = torch.multinomial(flat, 1, generator=generator).reshape(self.shape)
        return action, action

    def log_prob(self, action: Tensor, raw: Tensor | None = None) -> Tensor:
        """Log-probability of the action indices (``raw`` is ignored)."""
        if not isinstance(action, Tensor):
            raise TypeError(f"action must be a torch tensor of action indices, got {type(action).__name__}")
        if action.is_floating_point() or action.is_complex():
            raise ValueError(f"action must be an integer tensor of action indices, got dtype {action.dtype}")
        if ((action < 0) | (action >= self.num_actions)).any():
            raise ValueError(f"action indices must lie in [0, {self.num_actions})")
        try:
            shape = torch.broadcast_shapes(action.shape, self.shape)
        except RuntimeError as exc:
            raise ValueError(f"action shape {tuple(action.shape)} does not match batch shape {tuple(self.shape)}") from exc
        logits = self.logits.expand(*shape, self.num_actions)
        index = action.long().expand(shape).unsqueeze(-1)
        return logits.gather(-1, index).squeeze(-1)

    def mode(self) -> Tensor:
        """Most likely action index."""
        return self.logits.argmax(-1)

    def entropy(self) -> Tensor:
        logits = self.logits.clamp(min=torch.finfo(self.logits.dtype).min)  # 0 * -inf -> 0
        return -(self.probs * logits).sum(-1)


class MultiCategorical:
    """Independent categoricals, one per action dimension (``MultiDiscrete`` actions; a
    ``MultiBinary`` action is the case of two values per dimension, a Bernoulli each).

    ``logits`` ``(..., sum(sizes))`` hold dimension ``i``'s ``sizes[i]`` logits one after the
    other; an action is ``(..., len(sizes))`` indices and its log-probability is the sum over
    dimensions of each categorical's log-probability (the dimensions are independent).
    """

    def __init__(self, logits: Tensor, sizes: tuple[int, ...]) -> None:
        if logits.shape[-1] != sum(sizes):
            raise ValueError(f"logits have {logits.shape[-1]} entries in the last dimension; expected sum{tuple(sizes)} = {sum(sizes)}")
        self.sizes = tuple(int(n) for n in sizes)
        self.parts = [Categorical(chunk) for chunk in logits.split(self.sizes, dim=-1)]

    @property
    def shape(self) -> torch.Size:
        """Shape of one sample (batch shape + number of dimensions)."""
        return torch.Size((*self.parts[0].shape, len(self.sizes)))

    def sample(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sample every dimension's index (int64); returns ``(action, action)``."""
        action = torch.stack([part.sample(generator)[0] for part in self.parts], dim=-1)
        return action, action

    def gumbel_max(self, noise: Tensor) -> Tensor:
        """The sample that uniform ``noise`` ``(..., sum(sizes))`` picks (Gumbel-max in each dimension)."""
        gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-12)))
        chunks = gumbel.split(self.sizes, dim=-1)
        return torch.stack([(part.logits + g).argmax(-1) for part, g in zip(self.parts, chunks)], dim=-1)

    def log_prob(self, action: Tensor, raw: Tensor | None = None) -> Tensor:
        """``sum_i log p_i(action[..., i])`` (``raw`` is ignored)."""
        if action.shape[-1] != len(self.sizes):
            raise ValueError(f"action has {action.shape[-1]} entries in the last dimension; expected {len(self.sizes)}")
        return sum(part.log_prob(action[..., i]) for i, part in enumerate(self.parts))  # type: ignore[return-value]

    def mode(self) -> Tensor:
        """The most likely index of every dimension."""
        return torch.stack([part.mode() for part in self.parts], dim=-1)

    def entropy(self) -> Tensor:
        """Sum of the dimensions' entropies (they are independent)."""
        return sum(part.entropy() for part in self.parts)  # type: ignore[return-value]
