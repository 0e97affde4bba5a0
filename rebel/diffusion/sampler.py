"""Sampling images per prompt and scoring them: the diffusion adapter's :class:`rebel.Sampler`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rebel.batch import RolloutBatch
from rebel.config import check_group_size, check_int
from rebel.diffusion.policy import DiffusionPolicy
from rebel.diffusion.rewards import RewardFunc, call_reward
from rebel.hf.inputs import reward_name
from rebel.policy import Policy
from rebel.sampler import Sampler

# The built-in prompt set: common animals, one per prompt (the usual DDPO-style setup).
ANIMALS = (
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "chicken", "duck", "rabbit",
    "fox", "wolf", "bear", "deer", "lion", "tiger", "leopard", "elephant", "giraffe", "zebra",
    "monkey", "gorilla", "kangaroo", "koala", "panda", "raccoon", "squirrel", "hedgehog", "owl", "eagle",
    "parrot", "penguin", "swan", "flamingo", "frog", "turtle", "snake", "lizard", "crocodile", "shark",
    "dolphin", "whale", "octopus", "crab", "butterfly", "bee", "ladybug", "snail", "camel", "llama",
)  # fmt: skip

PromptFn = Callable[[random.Random], str]


def prompt_source(prompts: Any) -> PromptFn:
    """A function ``fn(rng) -> prompt`` from: ``None`` or ``"animals"`` (the built-in list), a
    path of a text file (one prompt per line), a list of strings (drawn uniformly with
    replacement), or a callable ``fn(rng: random.Random) -> str`` (which must draw only from
    ``rng`` for a resumed run to see the same prompts)."""
    if prompts is None or (isinstance(prompts, str) and prompts == "animals"):
        return _choice(list(ANIMALS))
    if callable(prompts):
        return prompts
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} does not exist (give a text file with one prompt per line, or 'animals')")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompt file {str(path)!r} holds no prompts")
        return _choice(lines)
    items = list(prompts)
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError("prompts must be a non-empty list of strings, a text file, 'animals' or a callable")
    return _choice(items)


def _choice(items: list[str]) -> PromptFn:
    def draw(rng: random.Random) -> str:
        return items[rng.randrange(len(items))]

    return draw


class DiffusionSampler(Sampler):
    """Each iteration draws ``prompts_per_iteration`` prompts and ``num_generations`` images
    of each (one group per prompt draw), then scores the images.

    Args:
        prompts: see :func:`prompt_source`.
        reward_fn: ``fn(images, prompts, **kwargs) -> list[float]``, or a list of them (summed
            with ``reward_weights``).
        reward_weights: one weight per reward function (default 1 each).
        num_generations: images per prompt (>= 2).
        prompts_per_iteration: prompts per iteration and process.
        timestep_fraction: share of each chain's stochastic steps that are trained, chosen per
            sample at random (1.0: all; the trajectory log-probability is exact).
        sample_batch_size: images per sampling pass (default: all at once).
        reward_kwargs: more keyword arguments for the reward functions.
    """

    def __init__(
        self,
        prompts: Any,
        reward_fn: RewardFunc | Sequence[RewardFunc],
        *,
        reward_weights: Sequence[float] | None = None,
        num_generations: int = 2,
        prompts_per_iteration: int = 8,
        timestep_fraction: float = 1.0,
        sample_batch_size: int | None = None,
        reward_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_group_size("num_generations", num_generations)
        check_int("prompts_per_iteration", prompts_per_iteration)
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        self.prompt_fn = prompt_source(prompts)
        self.reward_fns: list[RewardFunc] = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]  # type: ignore[list-item]
        if not self.reward_fns or not all(callable(f) for f in self.reward_fns):
            raise ValueError("reward_fn must be a callable fn(images, prompts, **kwargs) -> list[float] or a list of them")
        self.reward_weights = [1.0] * len(self.reward_fns) if reward_weights is None else [float(w) for w in reward_weights]
        if len(self.reward_weights) != len(self.reward_fns):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_fns)} reward functions")
        self.num_generations = num_generations
        self.prompts_per_iteration = prompts_per_iteration
        self.timestep_fraction = timestep_fraction
        self.sample_batch_size = sample_batch_size
        self.reward_kwargs = dict(reward_kwargs or {})
        self.rng = random.Random(0)  # prompts
        self.generator = torch.Generator().manual_seed(0)  # noise and trained steps
        self.last_samples: dict[str, Any] = {}  # the last batch's images, prompts and rewards, for logging

    # ------------------------------------------------------------- state
    def seed(self, seed: int) -> None:
        self.rng.seed(seed)
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.generator.set_state(state["generator"])

    # ----------------------------------------------------------- collect
    def collect(self, policy: Policy) -> RolloutBatch:
        if not isinstance(policy, DiffusionPolicy):
            raise TypeError(f"DiffusionSampler samples from a DiffusionPolicy, got {type(policy).__name__}")
        g = self.num_generations
        prompts = [self.prompt_fn(self.rng) for _ in range(self.prompts_per_iteration)]
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("the prompt function must return strings")
        rep = [k for k in range(len(prompts)) for _ in range(g)]
        texts = [prompts[k] for k in rep]
        size = self.sample_batch_size or len(texts)
        parts = [policy.sample(texts[s : s + size], self.generator) for s in range(0, len(texts), size)]
        out = {key: torch.cat([p[key] for p in parts]) for key in parts[0] if key != "stochastic"}
        mask = self.trained_steps(parts[0]["stochastic"], len(texts))

        images = out.pop("images")
        reward, scores = self.score(images, texts)
        stats = {f"rewards/{name}": v.mean().item() for name, v in scores.items()} if len(scores) > 1 else {}
        self.last_samples = {"images": images, "prompts": texts, "rewards": reward.tolist()}
        return RolloutBatch(
            group=torch.tensor(rep),
            reward=reward.float(),
            mask=mask,
            data={key: value.cpu() for key, value in out.items()},
            context=texts,
            counts={"images": float(len(texts)), "prompts": float(len(prompts))},
            stats=stats,
        )

    def score(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum of the reward functions (``[B]`` float64) and each function's own."""
        reward = torch.zeros(len(prompts), dtype=torch.float64)
        scores = {}
        for fn, weight in zip(self.reward_fns, self.reward_weights):
            scores[reward_name(fn)] = values = call_reward(fn, images, prompts, **self.reward_kwargs)
            reward += weight * values
        return reward, scores

    def trained_steps(self, stochastic: Tensor, batch_size: int) -> Tensor:
        """``[B, T]`` mask of the trained steps: ``timestep_fraction`` of the stochastic steps
        of each sample, drawn at random per sample (all of them at fraction 1)."""
        candidates = torch.nonzero(stochastic.cpu()).flatten()
        if candidates.numel() == 0:
            raise ValueError("the chain has no stochastic step to train (ddim_eta must be > 0)")
        count = max(1, round(self.timestep_fraction * candidates.numel()))
        mask = torch.zeros(batch_size, stochastic.numel(), dtype=torch.bool)
        for i in range(batch_size):
            chosen = (
                candidates
                if count == candidates.numel()
                else candidates[torch.randperm(candidates.numel(), generator=self.generator)[:count]]
            )
            mask[i, chosen] = True
        return mask
