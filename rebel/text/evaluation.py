"""Evaluation during training: completions of a held-out ``eval_dataset``, scored with the
evaluation reward functions, every ``eval_every`` iterations and at the end, as metrics
under ``eval/`` (TRL's ``eval_dataset``; the rewards may differ from the training ones)."""

from __future__ import annotations

from collections.abc import Sequence
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
    penalties (missing EOS, KL) do not apply; the training RNG is not touched."""

    def __init__(
        self,
        sampler: TextSampler,
        dataset: Any,
        reward_funcs: Sequence[RewardFunc],
        reward_weights: Sequence[float],
        config: Any,
    ) -> None:
        self.sampler, self.dataset, self.config = sampler, PromptDataset(dataset), config
        self.reward_funcs, self.reward_weights = list(reward_funcs), list(reward_weights)

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        every = self.config.eval_every
        if every and (trainer.finishing or trainer.iteration % every == 0):
            metrics.update(self.evaluate(trainer, int(metrics["iteration"])))

    def evaluate(self, trainer: Any, iteration: int) -> dict[str, float]:
        """The ``eval/`` metrics of the policy now (every process must call it)."""
        c, acc = self.config, trainer.accelerator
        records = [self.dataset[i] for i in range(acc.process_index, len(self.dataset), acc.num_processes)]
        modes = ("greedy", "sampled") if c.eval_generation == "both" else (c.eval_generation,)
        out: dict[str, float] = {}
        with torch.no_grad(), sharding.full_weights(acc, trainer.model):
            for mode in modes:
                rows = self.sampler.evaluate(
                    trainer.policy,
                    records,
                    self.reward_funcs,
                    self.reward_weights,
                    greedy=mode == "greedy",
                    seed=c.seed + EVAL_SEED_OFFSET + acc.process_index,
                    batch_size=c.prompts_per_iteration * c.num_generations,
                )
                if acc.num_processes > 1:
                    from accelerate.utils import gather_object

                    rows = [row for part in gather_object([rows]) for row in part]
                prefix = "eval/" if len(modes) == 1 else f"eval/{mode}/"
                out.update(summarize(rows, [reward_name(fn) for fn in self.reward_funcs], prefix))
                if acc.is_main_process and c.log_completions > 0:
                    trainer.run.append_jsonl(
                        "eval_completions.jsonl", [{"iteration": iteration, "mode": mode, **row} for row in rows[: c.log_completions]]
                    )
        return out


def summarize(rows: list[dict[str, Any]], names: Sequence[str], prefix: str = "eval/") -> dict[str, float]:
    """Means over evaluation rows (see :meth:`TextSampler.evaluate`): reward, its spread, each
    reward function's value, completion length and share ending with EOS."""
    reward = np.array([r["reward"] for r in rows], dtype=np.float64)
    out = {f"{prefix}reward_mean": float(reward.mean()), f"{prefix}reward_std": float(reward.std())}
    out.update({f"{prefix}rewards/{name}": float(np.mean([r[name] for r in rows])) for name in names})
    out[f"{prefix}completion_length"] = float(np.mean([r["length"] for r in rows]))
    out[f"{prefix}eos_fraction"] = float(np.mean([r["eos"] for r in rows]))
    return out
