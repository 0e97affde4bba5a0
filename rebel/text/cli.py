"""``rebel train text``: REBEL on a causal language model.

Without ``--model`` / ``--dataset`` / ``--reward`` it runs the embedded default: the
digit-sorting task of :mod:`rebel_envs.text_tasks` on a tiny GPT-2 warmed up in-process (a
minute or two on a CPU). With them it fine-tunes a real model:

    rebel train text --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset prompts.jsonl \\
        --reward my_rewards:brevity --use-lora --learning-rate 1e-5 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebel.config import option

# Settings of the embedded task (a new run without --model); TextConfig's defaults otherwise.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "prompts_per_iteration": 32,
    "num_generations": 4,
    "max_new_tokens": 8,
    "learning_rate": 1e-3,
    "missing_eos_penalty": 1.0,
}


@dataclass
class TextSource:
    """What to train: the model, the prompts and the rewards (default: the embedded task)."""

    model: str | None = option(None, "model folder or hub id; none: the embedded tiny GPT-2 for digit sorting")
    tokenizer: str | None = option(None, "tokenizer folder or hub id (default: the model's)")
    gguf_file: str | None = option(None, "GGUF file inside --model to load (needs the gguf package)")
    dataset: str | None = option(
        None, "prompts: a .json/.jsonl/.csv/.parquet file, a save_to_disk folder or a hub id, with a 'prompt' column"
    )
    dataset_split: str = option("train", "split of --dataset")
    reward: str | None = option(None, "comma-separated rewards: module:function, path/file.py:function, or reward-model folders / hub ids")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rebel train text``."""
    from rebel.hf import cli
    from rebel.text.trainer import TextConfig
    from rebel_envs.text_tasks import SortingTaskConfig

    cli.add_arguments(parser, "a causal language model", TextConfig, TextSource, SortingTaskConfig, EMBEDDED_DEFAULTS)


def run(args: argparse.Namespace) -> int:
    """Build and train from the command line (or from a resumed run's ``config.yaml``)."""
    from rebel.cli import start_options
    from rebel.hf.cli import resolve_model_run, reward_summary
    from rebel.text.trainer import TextConfig, TextTrainer
    from rebel_envs.text_tasks import SortingTaskConfig

    config, source, task = resolve_model_run(args, "text", TextConfig, TextSource, SortingTaskConfig, EMBEDDED_DEFAULTS)

    embedded = source.model is None
    model, tokenizer, evaluation = _model(source, task, config, bool(args.resume))
    dataset = _dataset(source, task)
    if source.reward is None and source.dataset is not None:
        raise ValueError("--dataset needs --reward (the embedded reward only scores the embedded task)")
    rewards = [_reward(spec) for spec in source.reward.split(",")] if source.reward else _embedded_reward()
    before = evaluation() if evaluation else None
    trainer = TextTrainer(
        model,
        rewards,
        dataset,
        config,
        processing_class=tokenizer,
        model_kwargs={"gguf_file": source.gguf_file} if source.gguf_file else None,
        run_config={"source": dataclasses.asdict(source), "task": dataclasses.asdict(task)},
    )
    rows = trainer.train(**start_options(args))
    if not trainer.accelerator.is_main_process or not rows or trainer.exit_code:
        return trainer.exit_code
    print(reward_summary(rows, 5, config.output_dir))
    if embedded and before is not None:
        after = evaluation()
        print(
            f"held-out prompts, sampled at temperature {config.temperature}: reward {before['reward']:.3f} -> {after['reward']:.3f}, "
            f"exactly sorted {before['exact']:.1%} -> {after['exact']:.1%}"
        )
    print(f"model saved to {Path(config.output_dir) / 'model'}")
    return 0


# ------------------------------------------------------------------ helpers


def _model(source: TextSource, task: Any, config: Any, resume: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, evaluation or None). The embedded model is warmed up once and
    kept in ``<run>/base_model`` so that a resumed run starts from the same weights."""
    if source.model is not None:
        return source.model, source.tokenizer, None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rebel_envs.text_tasks import evaluate_sorting, make_sorting_model, sorting_dataset

    torch.set_num_threads(1)  # a ~100k-parameter model: threads cost more than they give
    base = Path(config.output_dir) / "base_model"
    if resume and base.is_dir():
        model, tokenizer = AutoModelForCausalLM.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(base))
    else:
        base.parent.mkdir(parents=True, exist_ok=True)
        model, tokenizer = make_sorting_model(task, save_to=base)
    held_out = sorting_dataset(256, task.min_digits, task.max_digits, seed=task.task_seed + 10_007)
    return model, tokenizer, lambda: evaluate_sorting(model, tokenizer, held_out, seed=task.task_seed, temperature=config.temperature)


def _dataset(source: TextSource, task: Any) -> Any:
    if source.dataset is None:
        from rebel_envs.text_tasks import sorting_dataset

        return sorting_dataset(task.num_prompts, task.min_digits, task.max_digits, seed=task.task_seed)
    import datasets

    path = Path(source.dataset)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        return loaded[source.dataset_split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"--dataset {path}: unsupported file type {path.suffix!r} (json, jsonl, csv, parquet)")
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    return datasets.load_dataset(source.dataset, split=source.dataset_split)


def _reward(spec: str) -> Any:
    """``module:function`` or ``file.py:function`` -> the function; anything else is a
    reward model (folder or hub id), loaded by the sampler."""
    from rebel.hf.cli import load_function

    return load_function(spec) if ":" in spec else spec.strip()


def _embedded_reward() -> list[Any]:
    from rebel_envs.text_tasks import sorted_digits_reward

    return [sorted_digits_reward]
