"""Text environments: the other side of a dialog (a simulated user, a tool, a judge).

An episode opens with initial chat messages; the agent (the policy) answers with a
message; the environment answers with its next messages, a reward and whether the episode
is over. All of the environment's randomness comes from the ``rng`` the sampler passes
to each call, so that the sampler decides which dialogs share random numbers (common
random numbers across the branches of a Monte-Carlo reset) and which do not.

A message is a chat message, ``{"role": ..., "content": ...}``; the agent's role is
``"assistant"``. The environment's state is the instance's attributes: ``snapshot`` and
``restore`` copy them, which serves any environment whose state is plain Python data.
"""

from __future__ import annotations

import copy
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass
class EnvReply:
    """What the environment answers to one agent message.

    Attributes:
        messages: the other side's next messages (context for the agent's next turn); may be
            empty, and usually is when the episode ends.
        reward: the reward of this turn (a dialog's return is the sum over its turns).
        terminated: the episode reached an end of the task (nothing follows; no bootstrap).
        truncated: the episode was cut short (a turn or time limit of the environment);
            not an end of the task.
    """

    messages: list[Message] = field(default_factory=list)
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False


class TextEnv(ABC):
    """One dialog with the agent. Build one instance per concurrent dialog."""

    @abstractmethod
    def reset(self, rng: random.Random, row: Mapping[str, Any] | None = None) -> list[Message]:
        """Open an episode and return its initial messages (system / user turns before the
        agent speaks). ``row`` is a dataset record when the trainer has a dataset."""

    @abstractmethod
    def step(self, message: str, rng: random.Random) -> EnvReply:
        """Answer the agent's message (its decoded text, special tokens removed)."""

    def snapshot(self) -> Any:
        """A copy of the state, enough for :meth:`restore` to continue identically."""
        return copy.deepcopy(vars(self))

    def restore(self, snapshot: Any) -> None:
        """Return to a state taken by :meth:`snapshot` (the snapshot stays usable)."""
        vars(self).clear()
        vars(self).update(copy.deepcopy(snapshot))
