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

from rebel.config import first_line, option
from rebel.hf.inputs import check_source, is_hub_id, root_cause

DATASET_FILES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DATASET_EXPECTED = f"a {', '.join(DATASET_FILES)} file, a save_to_disk folder or a hub id (org/name)"

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
    env: str | None = option(
        None,
        "an embedded dialog task (rebel_envs.dialog_tasks.DIALOG_TASKS: guess-number, calculator): the trajectories are dialogs with it",
    )


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
    from rebel.runs import claimed_run_folder
    from rebel.text.policy import MODEL_EXPECTED
    from rebel.text.trainer import TextConfig, TextTrainer
    from rebel_envs.text_tasks import SortingTaskConfig

    config, source, task = resolve_model_run(args, "text", TextConfig, TextSource, SortingTaskConfig, _embedded_defaults(args))
    for what, value in (("model", source.model), ("tokenizer", source.tokenizer)):  # checked before any folder or model is made
        check_source(value, what, MODEL_EXPECTED)
    if source.env is not None:
        return _run_dialogs(args, config, source)
    rewards, dataset = _rewards(source), _dataset(source, task)

    embedded = source.model is None
    with claimed_run_folder(config.output_dir, resume=bool(args.resume), overwrite=args.overwrite):
        model, tokenizer, evaluation = _model(source, task, config, bool(args.resume))
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


# ------------------------------------------------------------------ dialogs


def dialog_task(name: str) -> Any:
    """The embedded dialog task ``name`` of ``rebel_envs.dialog_tasks.DIALOG_TASKS`` (an object with
    ``make_env``, ``dataset``, ``text_config``, ``max_length`` and ``make_model(save_to=...)``)."""
    from rebel_envs.dialog_tasks import DIALOG_TASKS

    if name not in DIALOG_TASKS:
        raise ValueError(f"--env {name}: not an embedded dialog task; expected one of {', '.join(sorted(DIALOG_TASKS))}")
    return DIALOG_TASKS[name]


def _embedded_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The defaults of a run without ``--model``: the digit-sorting task's, or those the dialog
    task ``--env`` names suggests (its dialogs fit the tiny model's positions)."""
    from rebel.cli import resumed_folder
    from rebel.runs import read_config

    run_dir = resumed_folder(args)
    env = getattr(args, "env", None) if run_dir is None else read_config(run_dir).get("source", {}).get("env")
    if env is None:
        return EMBEDDED_DEFAULTS
    task = dialog_task(env)
    return {"max_dialog_tokens": task.max_length, **task.text_config}


def _run_dialogs(args: argparse.Namespace, config: Any, source: TextSource) -> int:
    """``rebel train text --env NAME``: REBEL over dialogs with an embedded dialog task (its own
    tiny model, warmed up once and kept in ``<run>/base_model``, unless ``--model`` is given)."""
    from rebel.cli import start_options
    from rebel.hf.cli import reward_summary
    from rebel.runs import claimed_run_folder
    from rebel.text.trainer import TextTrainer

    for flag, value in (("--reward", source.reward), ("--dataset", source.dataset)):
        if value is not None:
            raise ValueError(f"{flag} {value} with --env {source.env}: the dialog task gives its own rewards and openings")
    task = dialog_task(source.env)  # type: ignore[arg-type]
    with claimed_run_folder(config.output_dir, resume=bool(args.resume), overwrite=args.overwrite):
        model, tokenizer = source.model, source.tokenizer
        if model is None:
            model, tokenizer = _dialog_model(task, Path(config.output_dir) / "base_model", bool(args.resume))
        trainer = TextTrainer(
            model,
            None,
            task.dataset,
            config,
            env=task.make_env,
            processing_class=tokenizer,
            model_kwargs={"gguf_file": source.gguf_file} if source.gguf_file else None,
            run_config={"source": dataclasses.asdict(source)},
        )
        rows = trainer.train(**start_options(args))
    if not trainer.accelerator.is_main_process or not rows or trainer.exit_code:
        return trainer.exit_code
    print(reward_summary(rows, 5, config.output_dir))
    print(f"dialogs in {Path(config.output_dir) / 'transcripts.jsonl'}; model saved to {Path(config.output_dir) / 'model'}")
    return 0


def _dialog_model(task: Any, base: Path, resume: bool) -> tuple[Any, Any]:
    """The dialog task's tiny model: warmed up on a new run, read back from ``base`` on a resume."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    if resume and base.is_dir():
        return AutoModelForCausalLM.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(base))
    base.parent.mkdir(parents=True, exist_ok=True)
    return task.make_model(save_to=base)


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


def _rewards(source: TextSource) -> list[Any]:
    """The reward functions ``--reward`` names (the embedded task's without it); a
    ``module:function`` is imported, a reward model only checked (the sampler loads it)."""
    from rebel.hf.cli import load_function
    from rebel.text.rewards import check_reward_funcs

    if source.reward is None:
        if source.dataset is not None:
            raise ValueError(f"--dataset {source.dataset} needs --reward (the embedded reward only scores the embedded task)")
        from rebel_envs.text_tasks import sorted_digits_reward

        return [sorted_digits_reward]
    specs = [spec.strip() for spec in source.reward.split(",")]
    return check_reward_funcs([load_function(spec) if ":" in spec else spec for spec in specs])


def _dataset(source: TextSource, task: Any) -> Any:
    """The prompts ``--dataset`` names (the embedded task's without it), checked as
    TextTrainer checks them; what fails is one line naming ``--dataset``."""
    from rebel.text.data import PromptDataset

    if source.dataset is None:
        from rebel_envs.text_tasks import sorting_dataset

        return sorting_dataset(task.num_prompts, task.min_digits, task.max_digits, seed=task.task_seed)
    name, path = f"--dataset {source.dataset}", Path(source.dataset)
    kind = DATASET_FILES.get(path.suffix)
    if path.is_file():
        if kind is None:
            raise ValueError(f"{name}: unsupported file type {path.suffix!r}; expected {', '.join(DATASET_FILES)}")
        if not _has_content(path, name):
            raise ValueError(f"{name} is empty; expected prompts in a 'prompt' column")
    elif not path.exists() and (kind is not None or not is_hub_id(source.dataset)):  # a data file's name is no hub id
        raise FileNotFoundError(f"{name} does not exist; expected {DATASET_EXPECTED}")
    try:
        loaded = _load_dataset(source, kind if path.is_file() else None)
    except Exception as error:  # whatever datasets raises, the reason is told in one line
        raise ValueError(f"{name}: cannot read it ({first_line(root_cause(error))})") from error
    try:
        return PromptDataset(loaded)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: {error}") from error


def _load_dataset(source: TextSource, kind: str | None) -> Any:
    """``datasets``' reading of ``--dataset``: a file of type ``kind``, a save_to_disk folder or a hub id."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error lines would repeat the reason given
    try:
        if kind is not None:
            return datasets.load_dataset(kind, data_files=source.dataset, split="train")
        if Path(source.dataset).is_dir():
            loaded = datasets.load_from_disk(source.dataset)
            return loaded[source.dataset_split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(source.dataset, split=source.dataset_split)
    finally:
        datasets.logging.set_verbosity(level)


def _has_content(path: Path, name: str) -> bool:
    """Whether the file holds anything but white space."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return True
    except OSError as error:
        raise ValueError(f"{name} cannot be read ({error.strerror})") from error
    return False
