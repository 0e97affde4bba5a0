"""The sampler interface every adapter implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from rebel.batch import RolloutBatch
from rebel.policy import Policy


class Sampler(ABC):
    """Draws groups of trajectories from the current policy and scores them.

    ``collect`` returns a :class:`RolloutBatch` whose groups share a context (a start
    state, a prompt, a state to branch from). A sampler that keeps state across
    iterations (environments, a data cursor, random generators) returns it from
    ``state_dict`` so that a resumed run continues exactly.

    ``optimum`` (optional): the known best values of logged metrics, such as
    ``{"eval_return": 1000.0}``; ``curves.png`` draws each as a dashed line.
    """

    optimum: dict[str, float] | None = None

    @abstractmethod
    def collect(self, policy: Policy) -> RolloutBatch:
        """Sample one iteration's batch with ``policy`` (pi_t); runs under ``torch.no_grad``."""

    def seed(self, seed: int) -> None:
        """Reseed the sampler's own random generators. The trainer calls it at the start of a
        new run with ``config.seed + rank``, so that processes draw different contexts."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but the checkpoint holds {sorted(state)}")
