"""The rollout batch: what a sampler hands the trainer for one REBEL iteration."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """B trajectories of at most T steps, grouped by the context they were sampled from.

    Attributes:
        group: ``[B]`` integer ids; trajectories sharing an id share a context and are
            compared with each other. Every group has at least two members.
        reward: ``[B]`` reward of each trajectory (the regression target's ingredients).
        mask: ``[B, T]`` bool, the steps that belong to each trajectory.
        data: adapter tensors with leading dimension B (observations, actions, tokens,
            latents, ...) or lists of length B (prompts, ...).
        context: optional ``[B]`` hashable keys stable across iterations (a prompt, a start
            seed), used by per-context reward normalisation.
        logp_old: ``[B]`` log pi_t of each trajectory, filled by the trainer.
        step_logp_old: ``[B, T]`` per-step log pi_t, filled by the trainer when the loss needs
            per-step old log-probs (``register_loss(..., needs_step_logp_old=True)``).
        counts: this iteration's counters (``env_steps``, ``tokens``, ...); the trainer sums
            them over processes and writes their running totals to the metrics.
        stats: scalar statistics of the collection (episode returns, lengths, ...), averaged
            over processes and written to the metrics as they are.
        entropy_weight: ``alpha`` when each reward holds the entropy term ``-alpha log pi_t(tau)``
            (a soft reward, whose REBEL step has the fixed point ``exp(r / alpha)``); the trainer
            keeps the normalised step from overshooting it (:class:`~rebel.RewardNormalizer`).
    """

    group: Tensor
    reward: Tensor
    mask: Tensor
    data: dict[str, Any] = field(default_factory=dict)
    context: list[Hashable] | None = None
    counts: dict[str, float] = field(default_factory=dict)
    logp_old: Tensor | None = None
    step_logp_old: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        b = self.reward.shape[0] if self.reward.dim() == 1 else None
        if b is None:
            raise ValueError(f"reward must be 1-D [B], got shape {tuple(self.reward.shape)}")
        if self.group.shape != (b,) or self.group.dtype.is_floating_point:
            raise ValueError(f"group must be an integer tensor of shape ({b},), got {self.group.dtype} {tuple(self.group.shape)}")
        if self.mask.dim() != 2 or self.mask.shape[0] != b:
            raise ValueError(f"mask must have shape ({b}, T), got {tuple(self.mask.shape)}")
        self.mask = self.mask.to(torch.bool)
        for key, value in self.data.items():
            if len(value) != b:
                raise ValueError(f"data[{key!r}] has {len(value)} entries; expected one per trajectory ({b})")
        if self.context is not None and len(self.context) != b:
            raise ValueError(f"context has {len(self.context)} entries; expected {b}")
        if not (math.isfinite(self.entropy_weight) and self.entropy_weight >= 0):
            raise ValueError(f"entropy_weight must be a finite number >= 0, got {self.entropy_weight!r}")
        counts = torch.unique(self.group, return_counts=True)[1]
        if b and (counts < 2).any():
            raise ValueError("every group of a RolloutBatch needs at least two trajectories")

    def __len__(self) -> int:
        return self.reward.shape[0]

    @property
    def num_groups(self) -> int:
        return int(torch.unique(self.group).numel())

    def select(self, index: Tensor) -> RolloutBatch:
        """The sub-batch of the trajectories at ``index`` (a 1-D index tensor), in that order."""
        idx = index.tolist()

        def take(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value[index.to(value.device)]
            return [value[k] for k in idx]

        return self._map(take)

    def minibatch_indices(self, size: int | None, generator: torch.Generator | None = None, shuffle: bool = True) -> list[Tensor]:
        """Index tensors of minibatches of about ``size`` trajectories made of whole groups
        (a group is never split; a minibatch holds at least one group; members keep their
        batch order). ``size=None`` gives one minibatch with the whole batch in order."""
        if size is not None and size < 1:
            raise ValueError(f"minibatch size must be >= 1, got {size}")
        if size is None or size >= len(self):
            return [torch.arange(len(self))]
        ids, group_index = torch.unique(self.group.cpu(), return_inverse=True)
        order = torch.randperm(len(ids), generator=generator) if shuffle else torch.arange(len(ids))
        by_group = torch.sort(group_index, stable=True).indices
        members = torch.split(by_group, torch.bincount(group_index, minlength=len(ids)).tolist())
        chunks: list[Tensor] = []
        chunk: list[Tensor] = []
        filled = 0
        for g in order.tolist():
            if chunk and filled + len(members[g]) > size:
                chunks.append(torch.cat(chunk))
                chunk, filled = [], 0
            chunk.append(members[g])
            filled += len(members[g])
        chunks.append(torch.cat(chunk))
        return chunks

    def minibatches(self, size: int | None, generator: torch.Generator | None = None, shuffle: bool = True) -> Iterator[RolloutBatch]:
        """The sub-batches of :meth:`minibatch_indices`."""
        for index in self.minibatch_indices(size, generator, shuffle):
            yield self.select(index)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """A copy with every tensor moved to ``device``."""

        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, Tensor) else value

        return self._map(move)

    def _map(self, fn: Callable[[Any], Any]) -> RolloutBatch:
        """A copy with ``fn`` applied to every per-trajectory field (``group``, ``reward``,
        ``mask``, each ``data`` entry, and ``context``, ``logp_old``, ``step_logp_old`` when set)."""

        def optional(value: Any) -> Any:
            return None if value is None else fn(value)

        return replace(
            self,
            group=fn(self.group),
            reward=fn(self.reward),
            mask=fn(self.mask),
            data={k: fn(v) for k, v in self.data.items()},
            context=optional(self.context),
            logp_old=optional(self.logp_old),
            step_logp_old=optional(self.step_logp_old),
        )
