"""Running statistics and reward normalisation."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

REWARD_NORMALIZATIONS = ("none", "batch", "within_group", "per_context")


class RunningMeanStd:
    """Mean and variance of a stream of arrays of shape ``shape`` (parallel Welford, float64)."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        """Fold in a batch ``[n, *shape]``."""
        values = np.asarray(values, np.float64).reshape(-1, *self.mean.shape)
        n = values.shape[0]
        if n == 0:
            return
        batch_mean, batch_var = values.mean(0), values.var(0)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = np.array(state["mean"]), np.array(state["var"]), int(state["count"])


class RewardNormalizer:
    """Rescales rewards before the regression.

    * ``"none"``: unchanged.
    * ``"batch"``: ``(r - mean) / std`` over the iteration's batch.
    * ``"within_group"``: ``(r - mean_g) / s`` with ``mean_g`` the reward mean of the
      trajectory's group and ``s`` the root-mean-square of ``r - mean_g`` over the batch:
      the scale of the differences REBEL regresses on is 1, whatever the spread between
      contexts (Q values of different states, say), and relative sizes across groups stay.
    * ``"per_context"``: ``(r - mean_c) / std_c`` with running statistics of each context key
      (a prompt, a start state); contexts seen fewer than ``min_count`` times use the batch's.
    Subtracting a per-context constant never changes a REBEL pair's target; dividing by a
    standard deviation rescales it, which acts like a per-context step size.

    ``min_scale`` bounds every divisor from below (``"none"`` divides by 1): the trainer passes
    ``eta * alpha`` for a soft reward ``Q - alpha log pi_t``, whose REBEL step
    ``pi_t^(1 - eta alpha / s) exp(eta Q / s)`` leaves its fixed point ``exp(Q / alpha)`` once
    the divisor ``s`` falls below ``eta alpha / 2``.
    """

    def __init__(self, kind: str = "none", *, min_count: int = 16, eps: float = 1e-6) -> None:
        if kind not in REWARD_NORMALIZATIONS:
            raise ValueError(f"reward_normalization={kind!r} is not supported; expected one of {REWARD_NORMALIZATIONS}")
        self.kind, self.min_count, self.eps = kind, min_count, eps
        self.per_context: dict[Hashable, RunningMeanStd] = {}

    def __call__(
        self, reward: Tensor, context: Sequence[Hashable] | None = None, group: Tensor | None = None, *, min_scale: float = 0.0
    ) -> Tensor:
        if self.kind == "none":
            return reward / min_scale if min_scale > 1 else reward
        if self.kind == "within_group":
            if group is None:
                raise ValueError("reward_normalization='within_group' needs the batch's group ids")
            _, index, counts = torch.unique(group, return_inverse=True, return_counts=True)
            sums = torch.zeros(len(counts), dtype=reward.dtype, device=reward.device).index_add(0, index, reward)
            centred = reward - (sums / counts.to(reward.dtype))[index]
            return centred / (centred.pow(2).mean().sqrt() + self.eps).clamp(min=min_scale)
        batch_mean, batch_std = reward.mean(), reward.std(unbiased=False)
        if self.kind == "batch":
            return (reward - batch_mean) / (batch_std + self.eps).clamp(min=min_scale)
        if context is None:
            raise ValueError("reward_normalization='per_context' needs a sampler that sets batch.context")
        values = reward.detach().cpu().double().numpy()
        rows: dict[Hashable, list[int]] = {}
        for i, key in enumerate(context):
            rows.setdefault(key, []).append(i)
        for key, index in rows.items():
            self.per_context.setdefault(key, RunningMeanStd()).update(values[index])
        mean = torch.empty_like(reward)
        std = torch.empty_like(reward)
        for i, key in enumerate(context):
            stats = self.per_context[key]
            if stats.count >= self.min_count:
                mean[i], std[i] = float(stats.mean), float(stats.std)
            else:
                mean[i], std[i] = batch_mean, batch_std
        return (reward - mean) / (std + self.eps).clamp(min=min_scale)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "per_context": {k: v.state_dict() for k, v in self.per_context.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.per_context = {}
        for key, value in state.get("per_context", {}).items():
            self.per_context[key] = RunningMeanStd()
            self.per_context[key].load_state_dict(value)
