"""The command-line glue of ``rebel train text`` and ``rebel train diffusion``: each trains
an embedded task unless ``--model`` names a real model, reads its rewards from
``module:function`` specs, and prints how the reward moved."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from pathlib import Path
from typing import Any

from rebel.cli import add_config_arguments, resolve_configs, resumed_folder
from rebel.config import add_arguments as add_dataclass_arguments
from rebel.config import first_line


def add_arguments(
    parser: argparse.ArgumentParser, what: str, config_cls: type, source_cls: type, task_cls: type, embedded_defaults: dict[str, Any]
) -> None:
    """The options of a command that fine-tunes ``what`` (``"a causal language model"``): the
    source (model, prompts, rewards), the config and the embedded task, whose defaults the
    help shows (a run with ``--model`` starts from the config's own)."""
    parser.description = (
        f"Fine-tune {what} with REBEL. Without --model it trains the embedded task (the defaults shown are the "
        f"embedded task's; with --model, {config_cls.__name__}'s own defaults apply)."
    )
    add_dataclass_arguments(parser, source_cls, "what to train")
    add_config_arguments(parser, config_cls, config_cls.__name__, embedded_defaults)
    add_dataclass_arguments(parser, task_cls, "embedded task")


def resolve_model_run(
    args: argparse.Namespace, section: str, config_cls: type, source_cls: type, task_cls: type, embedded_defaults: dict[str, Any]
) -> tuple[Any, Any, Any]:
    """``(config, source, task)`` of an adapter command that trains its embedded task unless
    ``--model`` is given (on the command line or in the ``--config`` file): the embedded
    defaults apply only then; a resumed run keeps its folder."""
    from rebel.runs import read_config, read_yaml_config

    run_dir = resumed_folder(args)
    model = getattr(args, "model", None) if run_dir is None else read_config(run_dir).get("source", {}).get("model")
    if run_dir is None and model is None and getattr(args, "config", None):
        source = read_yaml_config(args.config, option="--config").get("source")
        model = source.get("model") if isinstance(source, dict) else None
    defaults = {section: embedded_defaults} if model is None else {}
    configs = resolve_configs(args, {section: config_cls, "source": source_cls, "task": task_cls}, defaults)
    return configs[section], configs["source"], configs["task"]


def load_function(spec: str, option: str = "--reward") -> Any:
    """The function ``module:function`` or ``path/file.py:function`` names; a module that
    cannot be found or imported is a ValueError naming ``spec``."""
    where, _, name = spec.strip().rpartition(":")
    if where.endswith(".py") and not Path(where).is_file():
        raise ValueError(f"{option} {spec}: {where} does not exist")
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(where)
    except Exception as error:  # importing the user's module: whatever fails, say it in one line
        raise ValueError(f"{option} {spec}: cannot import {where} ({first_line(error)})") from error
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{option} {spec}: {where} has no function {name!r}")
    return fn


def first_and_last(rows: list[dict[str, Any]], window: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first and the last ``window`` rows, fewer when that many would overlap (a short run)."""
    n = min(window, max(1, len(rows) // 2))
    return rows[:n], rows[-n:]


def reward_summary(rows: list[dict[str, Any]], window: int, output_dir: str, digits: str = ".3f") -> str:
    """``reward_mean A (iterations i-j) -> B (iterations k-l); run folder D``: the mean reward
    of the first and the last ``window`` iterations of this call (:func:`first_and_last`)."""
    first, last = first_and_last(rows, window)

    def mean(part: list[dict[str, Any]]) -> float:
        return sum(r["reward_mean"] for r in part) / len(part)

    return (
        f"reward_mean {mean(first):{digits}} (iterations {first[0]['iteration']}-{first[-1]['iteration']}) -> "
        f"{mean(last):{digits}} (iterations {last[0]['iteration']}-{last[-1]['iteration']}); run folder {output_dir}"
    )
