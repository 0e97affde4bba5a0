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
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebel.config import first_line, option
from rebel.hf.inputs import check_source, is_hub_id, root_cause

DATASET_FILES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EMBEDDED_EVAL_PROMPTS = 128  # held-out prompts of the embedded task evaluated every eval_every iterations
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
    eval_dataset: str | None = option(
        None,
        "prompts evaluated every --eval-every iterations, as --dataset (its split: --dataset-split); none: the embedded task's held-out set",
    )
    eval_reward: str | None = option(None, "comma-separated rewards of the evaluation, as --reward; none: the training rewards")


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
    from rebel_envs.text_tasks import SORTING_OPTIMUM, SortingTaskConfig

    config, source, task = resolve_model_run(args, "text", TextConfig, TextSource, SortingTaskConfig, _embedded_defaults(args))
    for what, value in (("model", source.model), ("tokenizer", source.tokenizer)):  # checked before any folder or model is made
        check_source(value, what, MODEL_EXPECTED)
    if source.env is not None:
        return _run_dialogs(args, config, source)
    rewards, dataset = _rewards(source.reward, source.dataset), _dataset(source, task)
    eval_dataset = _eval_dataset(source, task)
    eval_rewards = _rewards(source.eval_reward, source.eval_dataset, "--eval-reward") if source.eval_reward else None

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
            eval_dataset=eval_dataset,
            eval_reward_funcs=eval_rewards,
        )
        if source.reward is None:  # the embedded task's reward
            trainer.sampler.optimum = SORTING_OPTIMUM
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
    from rebel.hf.cli import first_and_last, reward_summary
    from rebel.runs import claimed_run_folder
    from rebel.text.evaluation import DialogEvaluator, score_key
    from rebel.text.trainer import TextTrainer

    for flag, value in (
        ("--reward", source.reward),
        ("--dataset", source.dataset),
        ("--eval-dataset", source.eval_dataset),
        ("--eval-reward", source.eval_reward),
    ):
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
    first, last = (sum(r["episode_return"] for r in part) / len(part) for part in first_and_last(rows, 5))
    print(f"episode_return of the sampled dialogs {first:.3f} -> {last:.3f}")
    key = score_key(DialogEvaluator.score_name, config.eval_generation)
    evals = [r for r in rows if key in r]
    if evals:
        shown = [f"{r[key]:.3f} at iteration {r['iteration']}" for r in (evals[0], evals[-1])[: min(2, len(evals))]]
        print(f"{key} ({config.eval_dialogs} evaluation dialogs): {' -> '.join(shown)}")
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
    base = (Path(config.output_dir) / "base_model").resolve()
    if resume and base.is_dir():
        model, tokenizer = AutoModelForCausalLM.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(base))
    else:
        base.parent.mkdir(parents=True, exist_ok=True)
        model, tokenizer = make_sorting_model(task, save_to=base, progress=config.progress)
        model.name_or_path = model.config._name_or_path = str(base)  # as if loaded from there: a LoRA adapter names its base
    held_out = sorting_dataset(256, task.min_digits, task.max_digits, seed=task.task_seed + 10_007)
    return model, tokenizer, lambda: evaluate_sorting(model, tokenizer, held_out, seed=task.task_seed, temperature=config.temperature)


def _rewards(reward: str | None, dataset: str | None, option: str = "--reward") -> list[Any]:
    """The reward functions ``reward`` (``--reward``) names (the embedded task's without it);
    a ``module:function`` is imported, a reward model only checked (the sampler loads it)."""
    from rebel.hf.cli import load_function
    from rebel.text.rewards import check_reward_funcs

    if reward is None:
        if dataset is not None:
            raise ValueError(f"--dataset {dataset} needs --reward (the embedded reward only scores the embedded task)")
        from rebel_envs.text_tasks import sorted_digits_reward

        return [sorted_digits_reward]
    specs = [spec.strip() for spec in reward.split(",")]
    return check_reward_funcs([load_function(spec, option) if ":" in spec else spec for spec in specs])


def _eval_dataset(source: TextSource, task: Any) -> Any:
    """The prompts ``--eval-dataset`` names; without it the embedded task's held-out set
    (none with --dataset)."""
    if source.eval_dataset is not None:
        return _load_prompts(source.eval_dataset, source.dataset_split, "--eval-dataset")
    if source.eval_reward is not None and source.dataset is not None:
        raise ValueError(f"--eval-reward {source.eval_reward} needs --eval-dataset (the prompts it scores)")
    if source.dataset is not None:
        return None
    from rebel_envs.text_tasks import sorting_dataset

    return sorting_dataset(EMBEDDED_EVAL_PROMPTS, task.min_digits, task.max_digits, seed=task.task_seed + 10_007)


def _dataset(source: TextSource, task: Any) -> Any:
    """The prompts ``--dataset`` names (the embedded task's without it)."""
    if source.dataset is None:
        from rebel_envs.text_tasks import sorting_dataset

        return sorting_dataset(task.num_prompts, task.min_digits, task.max_digits, seed=task.task_seed)
    return _load_prompts(source.dataset, source.dataset_split, "--dataset")


def _load_prompts(spec: str, split: str, option: str) -> Any:
    """The prompts ``spec`` names (a file, a save_to_disk folder, a hub id), checked as
    TextTrainer checks them; what fails is one line naming ``option``."""
    from rebel.text.data import PromptDataset

    name, path = f"{option} {spec}", Path(spec)
    kind = DATASET_FILES.get(path.suffix)
    if path.is_file():
        if kind is None:
            raise ValueError(f"{name}: unsupported file type {path.suffix!r}; expected {', '.join(DATASET_FILES)}")
        if not _has_content(path, name):
            raise ValueError(f"{name} is empty; expected prompts in a 'prompt' column")
    elif not path.exists() and (kind is not None or not is_hub_id(spec)):  # a data file's name is no hub id
        raise FileNotFoundError(f"{name} does not exist; expected {DATASET_EXPECTED}")
    try:
        loaded = _load_dataset(spec, split, kind if path.is_file() else None)
    except Exception as error:  # whatever datasets raises, the reason is told in one line
        raise ValueError(f"{name}: cannot read it ({first_line(root_cause(error))})") from error
    try:
        return PromptDataset(loaded, "eval_dataset" if option == "--eval-dataset" else "train_dataset")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: {error}") from error


def _load_dataset(spec: str, split: str, kind: str | None) -> Any:
    """``datasets``' reading of ``spec``: a file of type ``kind``, a save_to_disk folder or a hub id."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error lines would repeat the reason given
    try:
        if kind is not None:
            return datasets.load_dataset(kind, data_files=spec, split="train")
        if Path(spec).is_dir():
            loaded = datasets.load_from_disk(spec)
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(spec, split=split)
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


# ------------------------------------------------------------------ rebel eval


def evaluate_run(args: argparse.Namespace) -> None:
    """``rebel eval RUN_DIR [--model last|best|PATH] [--output FILE]``: the run's evaluation
    (its eval dataset and rewards, or with ``--env`` its ``eval_dialogs`` dialogs;
    ``eval_generation``) of its final model (``last``: RUN/model), its best (RUN/best, with
    ``save_best``) or a saved model folder. Reads the run without its lock and writes only a
    new result file."""
    import torch

    from rebel.config import from_dict, pick
    from rebel.runs import BEST_FOLDER, check_eval_output, new_eval_path, read_best, read_config
    from rebel.text.dialog import DialogSampler
    from rebel.text.evaluation import DialogEvaluator, Evaluator, TextEvaluator
    from rebel.text.policy import CausalLMPolicy
    from rebel.text.sampler import TextSampler
    from rebel.text.trainer import DIALOG_SETTINGS, SAMPLER_SETTINGS, TextConfig
    from rebel_envs.text_tasks import SortingTaskConfig

    run, saved = Path(args.run_dir), read_config(args.run_dir)
    source, task = from_dict(TextSource, saved.get("source", {})), from_dict(SortingTaskConfig, saved.get("task", {}))
    config = from_dict(
        TextConfig, {**saved.get("trainer", {}), **saved.get("text", {}), "output_dir": str(run), "progress": False, "report_to": "none"}
    )
    folder = {"last": run / "model", "best": run / BEST_FOLDER}.get(args.model, Path(args.model))
    if not folder.is_dir():
        what = {
            "last": "final model (written when a run ends)",
            "best": "best model (runs with --save-best and an evaluation set or --env)",
        }
        raise FileNotFoundError(
            f"{run} has no {what.get(args.model, 'model folder')} at {folder}; expected --model last, best or a saved model folder"
        )
    here = tuple(k for k in (DIALOG_SETTINGS if source.env else SAMPLER_SETTINGS) if k not in ("generation_backend", "vllm_kwargs"))
    evaluator: Evaluator
    if source.env is not None:  # the dialog task's env, its own openings (a dialog run takes no --eval-dataset)
        dialog = dialog_task(source.env)
        sampler = DialogSampler(dialog.make_env, dialog.dataset, form=config.dialog_form, data_seed=config.seed, **pick(config, here))
        evaluator, size = DialogEvaluator(sampler, None, config), {"dialogs": config.eval_dialogs}
    else:
        dataset = _eval_dataset(source, task)
        if dataset is None:
            raise ValueError(f"{run} was trained without an evaluation set (--eval-dataset): nothing to evaluate on")
        rewards = _rewards(source.eval_reward, None, "--eval-reward") if source.eval_reward else _rewards(source.reward, source.dataset)
        text = TextSampler(
            dataset, rewards, **{**pick(config, here), "reward_weights": None if source.eval_reward else config.reward_weights}
        )
        evaluator, size = TextEvaluator(text, dataset, text.reward_funcs, text.reward_weights, config), {"prompts": len(dataset)}
    out = Path(args.output) if args.output else None
    if out is not None:
        check_eval_output(run, out)
    policy = CausalLMPolicy(_saved_model(folder, source, run), folder, temperature=config.temperature).eval()
    with torch.no_grad():
        metrics, _ = evaluator.measure(policy)
    result: dict[str, Any] = {"run": str(run), "model": args.model, "folder": str(folder), **size, **metrics}
    if args.model == "best":
        result["best"] = read_best(run)
    out = out or new_eval_path(run, args.model if args.model in ("last", "best") else folder.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({**result, "output": str(out)}))


def _saved_model(folder: Path, source: TextSource, run: Path) -> Any:
    """The model a saved folder holds: itself, or a LoRA adapter on the run's base model."""
    if not (folder / "adapter_config.json").is_file():
        return str(folder)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = source.model or str(run / "base_model")
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), str(folder))
