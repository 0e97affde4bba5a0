"""The ``rebel`` command.

    rebel train tabular|control|text|diffusion [options]   train (``--resume DIR`` continues a run,
                                                           ``--config FILE`` starts one from a config.yaml)
    rebel eval RUN_DIR [--model best|last|PATH] [--episodes N] [--output FILE] [--video]
    rebel plot RUN_DIR... [--metric M] [--x X] [--output FILE]
    rebel push RUN_OR_MODEL_FOLDER --repo-id ID [--private] [--token T]   upload a saved model to the Hugging Face Hub
    rebel vllm-serve [--host H] [--port P]                  a vLLM engine for --vllm-mode server (rebel.text.vllm_server)
    rebel --version

A bad input is one line, ``rebel COMMAND: error: ...``, and exit status 2.

``rebel train NAME`` looks for the adapter's command in ``rebel.NAME.cli``: a module with
``add_arguments(parser)`` and ``run(args)`` (returning the exit code: 0, or 130 / 143 when
SIGINT / SIGTERM stopped the run after its checkpoint). The adapters' heavy libraries load only then.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence
from typing import Any

import rebel
from rebel.config import add_arguments, from_args

ADAPTERS = {
    "tabular": "the embedded tabular MDP / bandit (seconds on a CPU)",
    "control": "gymnasium and MuJoCo agents",
    "text": "causal language models (transformers)",
    "diffusion": "Stable Diffusion (diffusers)",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="rebel", description="REBEL: reinforcement learning by regressing relative rewards.")
    parser.add_argument("--version", action="version", version=f"rebel-rl {rebel.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="train a policy", description="Train with REBEL.")
    train.add_argument(
        "adapter", choices=list(ADAPTERS), metavar="{" + ",".join(ADAPTERS) + "}", help="; ".join(f"{k}: {v}" for k, v in ADAPTERS.items())
    )
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a run's best or last model",
        description="Evaluation of a run's model: control runs play deterministic episodes, text runs complete their evaluation "
        "set (--eval-dataset, or the embedded task's held-out prompts) or, trained on dialogs (--env), play their evaluation "
        "dialogs, diffusion runs draw their fixed-seed evaluation grid (a PNG beside the JSON file). Reads the run only (a run "
        "still training can be evaluated) and writes its result to a new file, RUN_DIR/eval/<model>-<time>.json unless --output names one.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument(
        "--model",
        default="last",
        help="last (control: the newest checkpoint; text: RUN_DIR/model; diffusion: RUN_DIR/lora), best (RUN_DIR/best) or a saved "
        "model's path (default: last)",
    )
    evaluate.add_argument("--episodes", type=int, default=10, help="control: evaluation episodes (default: 10)")
    evaluate.add_argument("--seed", type=int, default=10_000, help="control: reset seed of the first episode (default: 10000)")
    evaluate.add_argument("--output", default=None, help="JSON file to write (default: a new RUN_DIR/eval/<model>-<time>.json)")
    evaluate.add_argument("--video", action="store_true", help="control: also render an episode into a GIF beside the JSON file")
    plot = commands.add_parser("plot", help="overlay learning curves of runs", description="Overlay one metric of several runs.")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--metric", default=None, help="metric to plot (default: eval_return if logged, else reward_mean)")
    plot.add_argument("--x", default=None, help="x axis (default: env_steps if logged, else iteration)")
    plot.add_argument("--output", default="curves.png", help="PNG file to write (default: curves.png)")

    push = commands.add_parser(
        "push",
        help="upload a saved model to the Hugging Face Hub",
        description="Upload a saved model folder (weights and model card) to a Hub repo, created if needed. "
        "A run folder pushes its final model (model/ or lora/); name RUN/model_merged or another saved folder to push that one.",
    )
    push.add_argument("folder", metavar="RUN_OR_MODEL_FOLDER")
    push.add_argument("--repo-id", required=True, help="the Hub repo: name or org/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--token", default=None, help="a Hub token with write access (default: HF_TOKEN or the `hf auth login` token)")
    push.add_argument("--commit-message", default=None, help="the upload's commit message")

    commands.add_parser("vllm-serve", help="serve a vLLM engine to text trainers (--vllm-mode server)", add_help=False)

    if argv[:1] == ["vllm-serve"]:
        from rebel.text.vllm_server import main as serve

        return serve(argv[1:])
    if argv[:1] == ["train"] and len(argv) > 1 and argv[1] in ADAPTERS:
        return _train(argv[1], argv[2:])
    args = parser.parse_args(argv)
    if args.command == "eval":
        return _evaluate(args)
    if args.command == "push":
        return _push(args)
    if args.command == "plot":
        from rebel.runs import plot_runs

        try:
            _check_plotted(args.run_dirs, {"--metric": args.metric, "--x": args.x})
            print(plot_runs(args.run_dirs, args.output, metric=args.metric, x=args.x))
        except (ValueError, FileNotFoundError) as error:
            print(f"rebel plot: error: {error}", file=sys.stderr)
            return 2
        return 0
    parser.print_help()
    return 0 if args.command is None else 2


def _train(name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"rebel train {name}", description=f"Train {ADAPTERS[name]} with REBEL.")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the run in DIR exactly where its newest intact checkpoint left it (or name one: DIR/checkpoints/iter_N)",
    )
    start.add_argument("--overwrite", action="store_true", help="replace the run the output folder holds (its files are deleted)")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="start a new run from the settings of a YAML file in the format of a run's config.yaml (options given here override it)",
    )
    if name == "tabular":
        module: Any = sys.modules[__name__]
        add, run = _tabular_arguments, _tabular_run
    else:
        try:
            module = importlib.import_module(f"rebel.{name}.cli")
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith(f"rebel.{name}"):
                print(f"rebel train {name}: this version of rebel-rl has no {name} adapter yet", file=sys.stderr)
            else:
                print(
                    f"rebel train {name}: missing dependency {error.name!r}; install it with pip install 'rebel-rl[{name}]'",
                    file=sys.stderr,
                )
            return 2
        add, run = module.add_arguments, module.run
    add(parser)
    args = parser.parse_args(argv)
    try:
        if args.config and args.resume:
            raise ValueError(f"--config {args.config} conflicts with --resume {args.resume}: a resumed run keeps its own config.yaml")
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"rebel train {name}: error: {error}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    from rebel.runs import read_config

    try:
        adapter = read_config(args.run_dir).get("adapter")
        module = importlib.import_module(f"rebel.{adapter}.cli") if adapter in ADAPTERS and adapter != "tabular" else None
        if module is None or not hasattr(module, "evaluate_run"):
            raise ValueError(f"{args.run_dir} is a {adapter!r} run; rebel eval evaluates control, text and diffusion runs")
        module.evaluate_run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"rebel eval: error: {error}", file=sys.stderr)
        return 2
    return 0


def _push(args: argparse.Namespace) -> int:
    """``rebel push``: the checks that need no network (repo id, token, folder), then the upload."""
    from rebel.config import first_line
    from rebel.hub import check_push, model_folder_of, push_folder

    try:
        token = check_push(args.repo_id, args.token)
        folder = model_folder_of(args.folder)
    except (ValueError, FileNotFoundError) as error:
        print(f"rebel push: error: {error}", file=sys.stderr)
        return 2
    try:
        url = push_folder(folder, args.repo_id, private=True if args.private else None, token=token, commit_message=args.commit_message)
    except Exception as error:  # noqa: BLE001 - the Hub's answer (network, permission, ...): one line
        print(f"rebel push: error: uploading {folder} to {args.repo_id} failed ({first_line(error)})", file=sys.stderr)
        return 1
    print(f"pushed {folder} to {args.repo_id}: {url}")
    return 0


def _check_plotted(run_dirs: Sequence[str], keys: dict[str, str | None]) -> None:
    """Each key given (``--metric``, ``--x``) must be a number in the metrics of every run that has metrics."""
    from rebel.runs import read_metrics

    logged = {
        d: {k for row in read_metrics(d) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for d in run_dirs
    }
    logged = {d: names for d, names in logged.items() if names}
    for option, key in keys.items():
        lacking = [d for d, names in logged.items() if key is not None and key not in names]
        if lacking:
            common = sorted(set.intersection(*logged.values()))
            raise ValueError(f"{option} {key!r} is not in the metrics of {', '.join(lacking)}; the runs have {', '.join(common)}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, title: str, defaults: dict[str, Any] | None = None) -> None:
    """The options of an adapter's config ``cls`` (a TrainerConfig with the adapter's own
    fields) in two groups: the adapter's own (``title``) and the trainer's."""
    from rebel.trainer import TrainerConfig

    shared = tuple(f.name for f in dataclasses.fields(TrainerConfig))
    own = tuple(f.name for f in dataclasses.fields(cls) if f.name not in shared)
    add_arguments(parser, cls, title, defaults, exclude=shared)
    add_arguments(parser, cls, "trainer", defaults, exclude=own)


START_OPTIONS = ("resume", "overwrite", "config")  # options of every ``rebel train`` command that are no setting


def resolve_configs(
    args: argparse.Namespace, sections: dict[str, type], defaults: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The configs of a ``rebel train`` command: the command's ``defaults`` for a new run
    (with the sections of the ``--config`` file over them), or each section of ``config.yaml``
    when ``--resume`` names a run (a config that derives from TrainerConfig reads the
    ``trainer`` section too, and its ``output_dir`` is that folder), with the options given on
    the command line on top. The first key of ``sections`` is the command's adapter."""
    from rebel.trainer import TrainerConfig

    saved: dict[str, Any] = dict(defaults or {})
    given: dict[str, Any] = {}  # the --config file's sections, over the defaults
    run_dir = resumed_folder(args)
    if run_dir is not None:
        from rebel.runs import read_config

        saved = read_config(run_dir)
    elif getattr(args, "config", None):
        shared = {"trainer": TrainerConfig} if any(issubclass(cls, TrainerConfig) for cls in sections.values()) else {}
        given = config_file(args.config, next(iter(sections)), {**shared, **sections})
    configs = {}
    for key, cls in sections.items():
        base = dict(saved.get(key) or {})
        if issubclass(cls, TrainerConfig):
            base = {**saved.get("trainer", {}), **base, **given.get("trainer", {})}  # older runs kept some trainer settings in both
            if run_dir is not None:
                base["output_dir"] = run_dir
        configs[key] = from_args(cls, args, {**base, **given.get(key, {})})
    return configs


def config_file(path: str, adapter: str, sections: dict[str, type]) -> dict[str, Any]:
    """The sections of the YAML file ``path`` (a run's ``config.yaml`` or one in its format),
    each checked against its dataclass in ``sections``: an unknown section or key, or another
    adapter's file, is a one-line error naming the key and the file."""
    import dataclasses as dc

    from rebel.runs import read_yaml_config

    values = read_yaml_config(path, option="--config")
    if values.get("adapter", adapter) != adapter:
        raise ValueError(f"--config {path}: adapter {values['adapter']!r}, not {adapter!r}: it configures rebel train {values['adapter']}")
    for key, section in values.items():
        if key == "adapter":
            continue
        if key not in sections:
            raise ValueError(f"--config {path}: unknown section {key!r}; expected {', '.join(['adapter', *sections])}")
        if not isinstance(section, dict):
            raise ValueError(f"--config {path}: section {key!r} must be a mapping of settings, got {section!r}")  # noqa: TRY004
        unknown = sorted(set(section) - {f.name for f in dc.fields(sections[key])})
        if unknown:
            raise ValueError(f"--config {path}: unknown key {key}.{unknown[0]} (not a {sections[key].__name__} setting)")
    return values


def resumed_folder(args: argparse.Namespace) -> str | None:
    """The run folder ``--resume`` names (itself, or the folder of the checkpoint it names)."""
    if not args.resume:
        return None
    from rebel.runs import checkpoint_of

    run_dir = str(checkpoint_of(args.resume)[0])
    if getattr(args, "output_dir", None) not in (None, args.resume, run_dir):
        raise ValueError(f"--output-dir {args.output_dir} conflicts with --resume {args.resume}; give only --resume")
    return run_dir


def start_options(args: argparse.Namespace) -> dict[str, Any]:
    """What ``Trainer.train`` takes from ``--resume`` and ``--overwrite``."""
    from rebel.runs import checkpoint_of

    resume = (checkpoint_of(args.resume)[1] or True) if args.resume else False
    return {"resume": resume, "overwrite": bool(getattr(args, "overwrite", False))}


# ---------------------------------------------------------------- tabular


TABULAR_TRAINER_DEFAULTS = {"iterations": 60, "learning_rate": 0.1, "epochs": 4, "output_dir": "runs/tabular"}


def _tabular_arguments(parser: argparse.ArgumentParser) -> None:
    from rebel.trainer import TrainerConfig
    from rebel_envs.tabular import TabularConfig

    add_arguments(parser, TabularConfig, "tabular task")
    add_arguments(parser, TrainerConfig, "trainer", TABULAR_TRAINER_DEFAULTS)


def _tabular_run(args: argparse.Namespace) -> int:
    import torch

    from rebel.runs import claimed_run_folder
    from rebel.trainer import Trainer, TrainerConfig
    from rebel_envs.tabular import TabularConfig, make_tabular

    configs = resolve_configs(args, {"tabular": TabularConfig, "trainer": TrainerConfig}, {"trainer": TABULAR_TRAINER_DEFAULTS})
    trainer_config: TrainerConfig = configs["trainer"]
    torch.manual_seed(trainer_config.seed)
    policy, sampler = make_tabular(configs["tabular"], seed=trainer_config.seed)
    trainer = Trainer(policy, sampler, trainer_config, run_config={"adapter": "tabular", "tabular": dataclasses.asdict(configs["tabular"])})
    with claimed_run_folder(trainer_config.output_dir, resume=bool(args.resume), overwrite=args.overwrite):
        rows = trainer.train(**start_options(args))
    if rows and trainer.accelerator.is_main_process:
        last = rows[-1]
        print(
            f"iteration {last['iteration']}: expected return {last['expected_return']:.3f} "
            f"(optimal {last['optimal_return']:.3f}; {rows[0]['expected_return']:.3f} at iteration {rows[0]['iteration']}); "
            f"run folder {trainer_config.output_dir}"
        )
    return trainer.exit_code


if __name__ == "__main__":
    sys.exit(main())
