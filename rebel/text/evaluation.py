"""Evaluation during training: completions of a held-out ``eval_dataset`` scored with the
evaluation reward functions (:class:`TextEvaluator`, TRL's ``eval_dataset``; the rewards may
differ from the training ones), or fresh dialogs with the environment (:class:`DialogEvaluator`,
as SB3's ``EvalCallback``), every ``eval_every`` iterations and at the end, as metrics under
``eval/``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from rebel import sharding
from rebel.hf.inputs import reward_name
from rebel.text.data import PromptDataset
from rebel.text.dialog import DialogSampler
from rebel.text.rewards import RewardFunc
from rebel.text.sampler import TextSampler

EVAL_GENERATION = ("greedy", "sampled", "both")
EVAL_SEED_OFFSET = 10_007  # sampled evaluations draw from seed + this (+ the rank): the same draws every time
Rows = list[dict[str, Any]]


def eval_dialog_seed(seed: int, index: int) -> str:
    """The seed of evaluation dialog ``index``'s environment calls (see
    :func:`~rebel.text.dialog.env_rng`): fixed, and unlike any training dialog's (digits)."""
    return f"eval{seed}/{index}"


def score_key(score_name: str, eval_generation: str) -> str:
    """The metric of an evaluation's score: ``eval/<score_name>``, the greedy one with ``both``."""
    return f"eval/greedy/{score_name}" if eval_generation == "both" else f"eval/{score_name}"


class Evaluator(ABC):
    """Trainer callback: every ``config.eval_every`` iterations (and in the run's last one)
    the policy's evaluation, greedy and/or sampled (``config.eval_generation``), added to the
    iteration's row under ``eval/`` (``eval/greedy/`` and ``eval/sampled/`` when both), a few
    of its samples appended to :attr:`log_file`. The training RNG is not touched.
    ``keep_best`` is called as ``keep_best(iteration, metric, score)`` after each evaluation
    (the score: ``eval/<score_name>``, the greedy one with ``both``). Subclasses say what one
    mode plays (:meth:`rows`) and how its rows are summed up (:meth:`summarize`)."""

    score_name = "reward_mean"
    log_file = "eval_completions.jsonl"

    def __init__(self, config: Any, keep_best: Callable[[int, str, float], None] | None = None) -> None:
        self.config, self.keep_best = config, keep_best

    @property
    def log_count(self) -> int:
        """Samples of each mode written to :attr:`log_file` per evaluation."""
        return int(self.config.log_completions)

    @property
    def score_key(self) -> str:
        """The metric a best model is chosen by."""
        return score_key(self.score_name, self.config.eval_generation)

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

        def gather(rows: Rows) -> Rows:
            from accelerate.utils import gather_object

            return [row for part in gather_object([rows]) for row in part]

        with torch.no_grad(), sharding.full_weights(acc, trainer.model):
            out, samples = self.measure(trainer.policy, acc.process_index, acc.num_processes, gather if acc.num_processes > 1 else None)
        if acc.is_main_process and self.log_count > 0:
            trainer.run.append_jsonl(
                self.log_file,
                [{"iteration": iteration, "mode": mode, **row} for mode, rows in samples.items() for row in rows[: self.log_count]],
            )
        return out

    def measure(
        self, policy: Any, rank: int = 0, world: int = 1, gather: Callable[[Rows], Rows] | None = None
    ) -> tuple[dict[str, float], dict[str, Rows]]:
        """``(eval/ metrics, rows of each mode)`` of ``policy``, this process playing its slice
        of the evaluation (``gather`` merges the processes' rows)."""
        c = self.config
        modes = ("greedy", "sampled") if c.eval_generation == "both" else (c.eval_generation,)
        out: dict[str, float] = {}
        samples = {}
        for mode in modes:
            rows = self.rows(policy, mode == "greedy", c.seed + EVAL_SEED_OFFSET + rank, rank, world)
            samples[mode] = rows = gather(rows) if gather is not None else rows
            out.update(self.summarize(rows, "eval/" if len(modes) == 1 else f"eval/{mode}/"))
        return out, samples

    @abstractmethod
    def rows(self, policy: Any, greedy: bool, seed: int, rank: int, world: int) -> Rows:
        """This process's evaluation samples of one mode (sampled ones from a generator seeded with ``seed``)."""

    @abstractmethod
    def summarize(self, rows: Rows, prefix: str) -> dict[str, float]:
        """The metrics of one mode's rows (every process's)."""


class TextEvaluator(Evaluator):
    """:class:`Evaluator` of single completions: one completion of each ``dataset`` prompt,
    scored with ``reward_funcs``: ``eval/reward_mean``, ``eval/reward_std``,
    ``eval/rewards/<function>``, ``eval/completion_length`` and ``eval/eos_fraction``;
    ``log_completions`` of them go to ``eval_completions.jsonl``. The training penalties
    (missing EOS, KL) do not apply."""

    def __init__(
        self,
        sampler: TextSampler,
        dataset: Any,
        reward_funcs: Sequence[RewardFunc],
        reward_weights: Sequence[float],
        config: Any,
        keep_best: Callable[[int, str, float], None] | None = None,
    ) -> None:
        super().__init__(config, keep_best)
        self.sampler, self.dataset = sampler, PromptDataset(dataset)
        self.reward_funcs, self.reward_weights = list(reward_funcs), list(reward_weights)

    def rows(self, policy: Any, greedy: bool, seed: int, rank: int, world: int) -> Rows:
        c = self.config
        return self.sampler.evaluate(
            policy,
            [self.dataset[i] for i in range(rank, len(self.dataset), world)],
            self.reward_funcs,
            self.reward_weights,
            greedy=greedy,
            seed=seed,
            batch_size=c.prompts_per_iteration * c.num_generations,
        )

    def summarize(self, rows: Rows, prefix: str) -> dict[str, float]:
        return summarize(rows, [reward_name(fn) for fn in self.reward_funcs], prefix)


class DialogEvaluator(Evaluator):
    """:class:`Evaluator` of dialogs with the sampler's environment: ``config.eval_dialogs``
    fresh dialogs, dialog ``i`` opening from row ``i % len(dataset)`` of ``dataset`` (None:
    the environment's own opening) with the environment's random numbers from the fixed seed
    ``eval<seed>/<i>`` (the same dialogs at every evaluation, none of training's), under the
    sampler's caps. Metrics: ``eval/return_mean``, ``eval/return_std``, ``eval/turns_mean``,
    ``eval/dialog_tokens_mean``, ``eval/terminated_fraction``, ``eval/truncated_fraction``;
    ``log_dialogs`` of the dialogs go to ``eval_transcripts.jsonl``. The best model is the
    one of the highest ``eval/return_mean``."""

    score_name = "return_mean"
    log_file = "eval_transcripts.jsonl"

    def __init__(
        self, sampler: DialogSampler, dataset: Any, config: Any, keep_best: Callable[[int, str, float], None] | None = None
    ) -> None:
        super().__init__(config, keep_best)
        self.sampler, self.dataset = sampler, dataset

    @property
    def log_count(self) -> int:
        return int(self.config.log_dialogs)

    def rows(self, policy: Any, greedy: bool, seed: int, rank: int, world: int) -> Rows:
        c, sampler = self.config, self.sampler
        runner = sampler.runner(policy)
        if greedy:
            runner.settings = replace(runner.settings, top_k=1)
        generator = torch.Generator().manual_seed(seed)
        mine = list(range(rank, c.eval_dialogs, world))
        size = c.prompts_per_iteration * c.num_generations  # dialogs played at once
        rows: Rows = []
        with sampler.backend.fixed_weights(policy):
            for start in range(0, len(mine), size):
                part = mine[start : start + size]
                dialogs = [
                    runner.open(
                        sampler.env(),
                        eval_dialog_seed(c.seed, i),
                        None if self.dataset is None else self.dataset[i % len(self.dataset)],
                        False,
                    )
                    for i in part
                ]
                runner.run(dialogs, generator)
                rows += [{"dialog": i, **d.record()} for i, d in zip(part, dialogs)]
        return rows

    def summarize(self, rows: Rows, prefix: str) -> dict[str, float]:
        rows.sort(key=lambda r: r["dialog"])  # in dialog order however the processes shared them (the log shows the first)
        returns = np.array([r["return"] for r in rows], dtype=np.float64)
        return {
            f"{prefix}return_mean": float(returns.mean()),
            f"{prefix}return_std": float(returns.std()),
            f"{prefix}turns_mean": float(np.mean([r["turns"] for r in rows])),
            f"{prefix}dialog_tokens_mean": float(np.mean([r["tokens"] for r in rows])),
            f"{prefix}terminated_fraction": float(np.mean([r["terminated"] for r in rows])),
            f"{prefix}truncated_fraction": float(np.mean([r["truncated"] for r in rows])),
        }


def summarize(rows: list[dict[str, Any]], names: Sequence[str], prefix: str = "eval/") -> dict[str, float]:
    """Means over evaluation rows (see :meth:`TextSampler.evaluate`): reward, its spread, each
    reward function's value, completion length and share ending with EOS."""
    reward = np.array([r["reward"] for r in rows], dtype=np.float64)
    out = {f"{prefix}reward_mean": float(reward.mean()), f"{prefix}reward_std": float(reward.std())}
    out.update({f"{prefix}rewards/{name}": float(np.mean([r[name] for r in rows])) for name in names})
    out[f"{prefix}completion_length"] = float(np.mean([r["length"] for r in rows]))
    out[f"{prefix}eos_fraction"] = float(np.mean([r["eos"] for r in rows]))
    return out
