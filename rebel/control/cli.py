"""``rebel train control`` and ``rebel eval`` for control runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from rebel.config import add_arguments as add_config_arguments

SET_BY_TOTAL_STEPS = ("iterations", "budget", "budget_counter")  # a control run stops at --total-steps env steps


def variant_defaults_help(cls: type, table: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The default to show in the help of each field of ``cls`` that a variant sets in ``table``,
    as ``critic X, trajectory Y, mc Z`` (fields whose help already names its default are left out)."""
    from rebel.control.agent import VARIANTS

    order = sorted(VARIANTS, key=lambda v: v != "critic")  # the default variant first
    shown: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if "default" in f.metadata.get("help", "") or not any(f.name in values for values in table.values()):
            continue
        shown[f.name] = ", ".join(f"{v} {table[v].get(f.name, f.default)}" for v in order)
    return shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rebel train control``: every ControlConfig field (the control task's
    and the trainer's), with the defaults of each variant where they differ."""
    from rebel.control.agent import VARIANT_DEFAULTS, ControlConfig
    from rebel.trainer import TrainerConfig

    shared = {f.name for f in dataclasses.fields(TrainerConfig)}
    own = tuple(f.name for f in dataclasses.fields(ControlConfig) if f.name not in shared)
    shown = {**variant_defaults_help(ControlConfig, VARIANT_DEFAULTS), "output_dir": "runs/control/ENV-VARIANT-sSEED-TIME"}
    add_config_arguments(parser, ControlConfig, "control task", shown, exclude=tuple(shared))
    add_config_arguments(parser, ControlConfig, "trainer", shown, exclude=(*own, *SET_BY_TOTAL_STEPS))


def run(args: argparse.Namespace) -> int:
    from rebel.cli import START_OPTIONS, resumed_folder, start_options
    from rebel.control.agent import Rebel
    from rebel.runs import claimed_run_folder

    options: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in START_OPTIONS}
    run_dir = resumed_folder(args)
    if run_dir is not None:
        options.pop("output_dir", None)
        agent = Rebel.from_run(run_dir, **options)
    else:
        if args.config:
            options = {**file_options(args.config), **options}
        env = options.pop("env", "HalfCheetah-v5")
        agent = Rebel(
            env,
            variant=options.pop("variant", "critic"),
            seed=options.pop("seed", 0),
            output_dir=options.pop("output_dir", None),
            **options,
        )
    with claimed_run_folder(agent.config.output_dir, resume=run_dir is not None, overwrite=args.overwrite):
        agent.learn(**start_options(args))
    assert agent.trainer is not None
    if agent.trainer.accelerator.is_main_process:
        from rebel.runs import read_metrics

        rows = read_metrics(agent.trainer.run.path)
        evals = [r for r in rows if "eval_return" in r]
        line = f"{agent.config.env} ({agent.config.variant}): {agent.env_steps} env steps"
        if evals:
            line += f", eval return {evals[0]['eval_return']:.1f} at {evals[0]['env_steps']} steps -> {evals[-1]['eval_return']:.1f}"
        print(f"{line}; run folder {agent.trainer.run.path}")
    return agent.trainer.exit_code


def file_options(path: str) -> dict[str, Any]:
    """The options of the ``--config`` file ``path`` (a control run's ``config.yaml`` or one
    in its format) as ``Rebel`` takes them (``env``, ``variant`` and ``seed`` among them)."""
    from rebel.cli import config_file
    from rebel.control.agent import ControlConfig
    from rebel.trainer import TrainerConfig

    values = config_file(path, "control", {"control": ControlConfig, "trainer": TrainerConfig})
    options = {**values.get("trainer", {}), **values.get("control", {})}
    return {k: v for k, v in options.items() if k not in ("iterations", "budget")}  # set by total_steps


def evaluate_run(args: argparse.Namespace) -> None:
    """``rebel eval RUN_DIR --episodes N [--video]``: deterministic evaluation of the run's newest checkpoint."""
    from rebel.control.agent import Rebel

    agent = Rebel.from_run(args.run_dir)
    result = {"run": str(args.run_dir), "episodes": args.episodes, **agent.evaluate(args.episodes, seed=args.seed)}
    if args.video:
        video = agent.record_video(str(Path(args.run_dir) / "videos" / "eval.gif"), episodes=1, seed=args.seed)
        result["video"] = str(video) if video else None
    (Path(args.run_dir) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
