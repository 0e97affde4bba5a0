"""The policy interface every adapter implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from rebel.batch import RolloutBatch
from rebel.losses import trajectory_log_prob


class Policy(torch.nn.Module, ABC):
    """A policy scores the steps of a batch of trajectories.

    An adapter implements :meth:`step_log_probs`: ``log pi_theta(a_h | s_h)`` for every
    step of every trajectory, ``[B, T]`` aligned with ``batch.mask``. The trajectory's
    log-probability is their masked sum (the dynamics cancel in every ratio). The
    trainer calls the module (``forward``), so that data-parallel wrappers see the call.
    """

    @abstractmethod
    def step_log_probs(self, batch: RolloutBatch) -> Tensor:
        """Per-step log-probabilities ``[B, T]`` of the actions in ``batch`` under this policy."""

    def forward(self, batch: RolloutBatch) -> Tensor:
        return self.step_log_probs(batch)

    def log_prob(self, batch: RolloutBatch) -> Tensor:
        """``[B]`` log pi_theta(tau) of each trajectory: the masked sum of its step log-probs."""
        return trajectory_log_prob(self(batch), batch.mask)

    def checkpoint_state(self, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The tensors a checkpoint must hold to resume: trainable parameters and buffers, from
        ``state_dict`` (the full one gathered from a sharded policy) or the module's own.
        Frozen parameters (a pretrained base under LoRA, say) come back from their source."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        buffers = {name for name, _ in self.named_buffers()}
        state = self.state_dict() if state_dict is None else state_dict
        return {k: v for k, v in state.items() if k in trainable or k in buffers}
