"""Evaluation during training: completions of a held-out ``eval_dataset``, scored with the
evaluation reward functions, every ``eval_every`` iterations and at the end, as metrics
under ``eval/`` (TRL's ``eval_dataset``; the rewards may differ from the training ones)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from rebel import sharding
from rebel.hf.inputs import reward_name
from rebel.text.data import PromptDataset
from rebel.text.rewards import RewardFunc
from rebel.text.sampler import TextSampler

EVAL_GENERATION = ("greedy", "sampled", "both")
EVAL_SEED_OFFSET = 10_007  # sampled evaluations draw from seed + this (+ the rank): the same draws every time


class TextEvaluator:
    """Trainer callback: every ``eval_every`` iterations (and in the run's last one) one
    completion of each ``dataset`` prompt, greedy and/or sampled (``eval_generation``),
    scored with ``reward_funcs``. Adds to the iteration's row ``eval/reward_mean``,
    ``eval/reward_std``, ``eval/rewards/<function>``, ``eval/completion_length`` and
    ``eval/eos_fraction`` (under ``eval/greedy/`` and ``eval/sampled/`` when both), and
    writes ``log_completions`` of them to ``eval_completions.jsonl``. The training
    penalties (missing EOS, KL) do not apply; the training RNG is not touched. ``keep_best``
    is called as ``keep_best(iteration, metric, score)`` after each evaluation (the score:
    ``eval/reward_mean``, the greedy one with ``both``)."""

    def __init__(
        self,
        sampler: TextSampler,
        dataset: Any,
        reward_funcs: Sequence[RewardFunc],
        reward_weights: Sequence[float],
        config: Any,
        keep_best: Callable[[int, str, float], None] | None = None,
    ) -> None:
        self.sampler, self.dataset, self.config = sampler, PromptDataset(dataset), config
        self.reward_funcs, self.reward_weights = list(reward_funcs), list(reward_weights)
        self.keep_best = keep_best

    @property
    def score_key(self) -> str:
        """The metric a best model is chosen by."""
        return "eval/greedy/reward_mean" if self.config.eval_generation == "both" else "eval/reward_mean"

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        every = self.config.eval_every
        if every and (trainer.finishing or trainer.iteration % every == 0):
            iteration = int(metrics["iteration"])
            metrics.update(self.evaluate(trainer, iteration))
            if self.keep_best is not None:
                self.keep_best(iteration, self.score_key, metrics[self.score_key])

    def evaluate(self, trainer: Any, iteration: int) -> dict[str, float]:
        """The ``eval/`` metrics of the policy now (every process must call it)."""
        acc = trainer.accelerator

        def gather(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            from accelerate.utils import gather_object

            return [row for part in gather_object([rows]) for row in part]

        with torch.no_grad(), sharding.full_weights(acc, trainer.model):
            out, samples = self.measure(trainer.policy, acc.process_index, acc.num_processes, gather if acc.num_processes > 1 else None)
        if acc.is_main_process and self.config.log_completions > 0:
            trainer.run.append_jsonl(
                "eval_completions.jsonl",
                [
                    {"iteration": iteration, "mode": mode, **row}
                    for mode, rows in samples.items()
                    for row in rows[: self.config.log_completions]
                ],
            )
        return out

    def measure(
        self, policy: Any, rank: int = 0, world: int = 1, gather: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None
    ) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        """``(eval/ metrics, rows of each mode)`` of ``policy`` on this process's slice of the
        prompts (``gather`` merges the processes' rows)."""
        c = self.config
        records = [self.dataset[i] for i in range(rank, len(self.dataset), world)]
        modes = ("greedy", "sampled") if c.eval_generation == "both" else (c.eval_generation,)
        out: dict[str, float] = {}
        samples = {}
        for mode in modes:
            rows = self.sampler.evaluate(
                policy,
                records,
                self.reward_funcs,
                self.reward_weights,
                greedy=mode == "greedy",
                seed=c.seed + EVAL_SEED_OFFSET + rank,
                batch_size=c.prompts_per_iteration * c.num_generations,
            )
            samples[mode] = rows = gather(rows) if gather is not None else rows
            prefix = "eval/" if len(modes) == 1 else f"eval/{mode}/"
            out.update(summarize(rows, [reward_name(fn) for fn in self.reward_funcs], prefix))
        return out, samples


def summarize(rows: list[dict[str, Any]], names: Sequence[str], prefix: str = "eval/") -> dict[str, float]:
    """Means over evaluation rows (see :meth:`TextSampler.evaluate`): reward, its spread, each
    reward function's value, completion length and share ending with EOS."""
    reward = np.array([r["reward"] for r in rows], dtype=np.float64)
    out = {f"{prefix}reward_mean": float(reward.mean()), f"{prefix}reward_std": float(reward.std())}
    out.update({f"{prefix}rewards/{name}": float(np.mean([r[name] for r in rows])) for name in names})
    out[f"{prefix}completion_length"] = float(np.mean([r["length"] for r in rows]))
    out[f"{prefix}eos_fraction"] = float(np.mean([r["eos"] for r in rows]))
    return out
