"""``rebel train control`` and ``rebel eval`` for control runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from rebel.config import add_arguments as add_config_arguments

SET_BY_TOTAL_STEPS = ("iterations", "budget", "budget_counter")  # a control run stops at --total-steps env steps
# What a bare ``rebel train control`` (no --env, no --config) runs: ``make demo``'s task, about 2 minutes on a CPU
EMBEDDED = {"env": "InvertedPendulum-v5", "variant": "trajectory", "total_steps": 100_000, "eval_every": 5, "eval_episodes": 5}
# Rough env steps per second of each variant on one CPU core, MuJoCo, evaluations included
# (docs/benchmarks/control_1m/control.md: a critic run of 1M steps takes 2.2-2.6 h); a run
# expected to take longer than LONG_RUN_SECONDS says so when it starts
TYPICAL_STEPS_PER_SECOND = {"critic": 110, "mc": 3000, "trajectory": 1000}
LONG_RUN_SECONDS = 600


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
    shown = {
        **variant_defaults_help(ControlConfig, VARIANT_DEFAULTS),
        "output_dir": "runs/control/ENV-VARIANT-sSEED-TIME",
        "env": f"{EMBEDDED['env']} with the {EMBEDDED['variant']} variant for {EMBEDDED['total_steps']} steps, about 2 minutes",
    }
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
        elif "env" not in options:
            options = {**EMBEDDED, **options}
            print(
                f"rebel train control: no --env, so the embedded default: {EMBEDDED['env']} ({options['variant']}), {options['total_steps']} env steps"
            )
        env = options.pop("env")
        agent = Rebel(
            env,
            variant=options.pop("variant", "critic"),
            seed=options.pop("seed", 0),
            output_dir=options.pop("output_dir", None),
            **options,
        )
    note = None if run_dir is not None else duration_note(agent.config.env, agent.config.variant, agent.config.total_steps)
    if note and os.environ.get("RANK", "0") == "0":
        print(note)
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


def duration_note(env: str, variant: str, steps: int) -> str | None:
    """One line saying how long ``steps`` env steps of ``variant`` roughly take on one CPU core,
    when that is more than ``LONG_RUN_SECONDS``; None for a shorter run."""
    seconds = steps / TYPICAL_STEPS_PER_SECOND[variant]
    if seconds <= LONG_RUN_SECONDS:
        return None
    took = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
    return (
        f"{env} ({variant}): {steps} env steps, roughly {took} on one CPU core at the {variant} variant's "
        f"~{TYPICAL_STEPS_PER_SECOND[variant]} env steps/s (--total-steps sets the budget; Ctrl-C stops with a checkpoint)"
    )


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
    """``rebel eval RUN_DIR [--model best|last|PATH] [--episodes N] [--output FILE] [--video]``:
    deterministic evaluation of the run's newest checkpoint (``last``), of its ``best/`` model
    or of a saved agent. Reads the run without taking its lock and writes only a new result
    file (and its GIF), never the run's metrics, checkpoints or videos."""
    from rebel.control.agent import Rebel
    from rebel.runs import BEST_FOLDER, check_eval_output, checkpoint_dirs, new_eval_path, newest_intact, read_best, read_config

    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    run_dir = Path(args.run_dir)
    read_config(run_dir)  # a run folder, or one line saying it is not
    result: dict[str, Any] = {"run": str(run_dir), "model": args.model}
    if args.model == "last":
        if not checkpoint_dirs(run_dir):
            raise FileNotFoundError(f"{run_dir} holds no checkpoint to evaluate")
        agent, label = Rebel.from_run(run_dir, report_to="none"), "last"
        result["checkpoint"] = newest_intact(run_dir)[0].name
    elif args.model == "best":
        best = read_best(run_dir)
        if best is None:
            raise FileNotFoundError(f"{run_dir} has no best model ({run_dir / BEST_FOLDER}; runs with save_best write it at evaluations)")
        agent, label = Rebel.load(run_dir / BEST_FOLDER, report_to="none"), "best"
        result["best"] = best
    else:
        path = Path(args.model)
        if not path.exists():
            raise FileNotFoundError(f"--model {args.model}: no such file or folder; expected best, last or a saved agent's path")
        agent, label = Rebel.load(path, report_to="none"), path.stem
    result.update(episodes=args.episodes, seed=args.seed, **agent.evaluate(args.episodes, seed=args.seed))
    out = Path(args.output) if args.output else new_eval_path(run_dir, label)
    check_eval_output(run_dir, out)
    if args.video:
        video = agent.record_video(str(out.with_suffix(".gif")), episodes=1, seed=args.seed)
        result["video"] = str(video) if video else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["output"] = str(out)
    print(json.dumps(result))
