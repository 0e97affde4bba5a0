"""REBEL's control variants against Stable-Baselines3 PPO and SAC, side by side.

Every algorithm gets the same environment-step budget and seeds, in one run on one
machine. Reported: final deterministic evaluation return (10 episodes, reset seeds
10000...), environment steps per second of training (evaluation time excluded), and
learning curves. Writes ``<out>/control.json``, ``<out>/control.md`` and ``<out>/control.png``.

    pip install -e ".[bench]"
    python benchmarks/control_vs_sb3.py --envs HalfCheetah-v5 Hopper-v5 Walker2d-v5 \\
        --steps 1000000 --seeds 0 1 2 --out docs/benchmarks

Long runs (SAC and the critic variant take hours per million steps on a CPU) survive an
interruption: every run keeps its state in ``--workdir`` (default
``runs/benchmarks/STEPS-steps``; REBEL's checkpoints; SB3's model,
replay buffer and curve, saved at each periodic evaluation; ``result.json`` once finished),
and the same command with ``--resume`` reads the finished runs back and continues the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import kept_sections
from rebel.control import Rebel, evaluate
from rebel.runs import latest_checkpoint, load_file, read_metrics

ALGORITHMS = ("rebel-trajectory", "rebel-mc", "rebel-critic", "sb3-ppo", "sb3-sac")


def default_workdir(steps: int) -> Path:
    """Where ``--workdir`` defaults to: one folder per step budget."""
    return Path("runs/benchmarks") / f"{steps}-steps"


def run_folder(workdir: Path, env_id: str, algo: str, seed: int) -> Path:
    """Where one run keeps its state: REBEL's run folder, SB3's saves, ``result.json``."""
    return workdir / f"{env_id}-{algo}-s{seed}"


def run_rebel(
    env_id: str,
    variant: str,
    steps: int,
    seed: int,
    eval_every_steps: int,
    episodes: int,
    workdir: Path,
    resume: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One REBEL run with its variant's defaults, ``options`` overriding some (a resumed run keeps
    the settings saved in its folder; ``main`` first checks them with :func:`check_resumable`)."""
    out = run_folder(workdir, env_id, f"rebel-{variant}", seed)
    found = latest_checkpoint(out)
    if found is None:
        shutil.rmtree(out, ignore_errors=True)  # a run stopped before its first checkpoint: nothing to continue
    checkpoint = found if resume else None  # without resume, an existing run makes Rebel refuse the folder
    done = load_file(checkpoint / "trainer.pt")["totals"].get("env_steps", 0) if checkpoint else 0
    next_eval = (int(done) // eval_every_steps + 1) * eval_every_steps

    def periodic_eval(trainer: Any, metrics: dict[str, Any]) -> None:
        nonlocal next_eval
        if metrics["env_steps"] >= next_eval and "eval_return" not in metrics:
            metrics.update(agent.evaluate(episodes))
            next_eval = (int(metrics["env_steps"]) // eval_every_steps + 1) * eval_every_steps

    quiet = {"progress": False, "report_to": "none", "plot": False}
    if checkpoint is not None:  # continue the interrupted run exactly
        agent = Rebel.from_run(out, callbacks=[periodic_eval], **quiet)
    else:
        agent = Rebel(
            env_id, variant=variant, seed=seed, output_dir=str(out), callbacks=[periodic_eval],
            eval_episodes=episodes, eval_every=0, **quiet, **(options or {}),
        )  # fmt: skip
    agent.learn(steps, resume=checkpoint is not None)
    rows = read_metrics(out)
    curve = [(r["env_steps"], r["eval_return"]) for r in rows if "eval_return" in r]
    # wall_time sums the iterations (collection and update) over resumes, evaluations excluded
    return {
        "final_return": rows[-1]["eval_return"],
        "final_return_std": rows[-1]["eval_return_std"],
        "env_steps": rows[-1]["env_steps"],
        "train_seconds": rows[-1]["wall_time"],
        "curve": curve,
        **({"options": options} if options else {}),
    }


# Rebel options the benchmark sets itself in every run: not settable by --rebel-option, not compared on --resume
SET_BY_BENCHMARK = ("env", "variant", "seed", "output_dir", "eval_every", "eval_episodes", "total_steps", "budget", "iterations",
                    "progress", "report_to", "plot")  # fmt: skip


def check_resumable(workdir: Path, env_id: str, variant: str, seed: int, options: dict[str, Any]) -> None:
    """Raise ValueError when an unfinished REBEL run of ``workdir`` was started with other settings
    than the variant's defaults with ``options`` (its rows would carry the wrong label)."""
    from rebel.control.agent import resolve_config, run_config, settings_differences

    out = run_folder(workdir, env_id, f"rebel-{variant}", seed)
    if (out / "result.json").is_file() or latest_checkpoint(out) is None:
        return
    differences = settings_differences(run_config(out), resolve_config(env_id, variant, seed, **options), SET_BY_BENCHMARK)
    if differences:
        words = ", ".join(f"{k}={saved!r} (these options give {ours!r})" for k, (saved, ours) in sorted(differences.items()))
        raise ValueError(
            f"--resume: {out} was started with {words}; resume it with the options it started with "
            f"(--rebel-option KEY=VALUE), or use another --workdir"
        )


def parse_rebel_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as Rebel keyword options (VALUE read as JSON where it parses, else a
    string); raises ValueError naming a malformed pair or a key Rebel does not take."""
    from rebel.control.agent import option_names

    allowed = option_names() - set(SET_BY_BENCHMARK)
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--rebel-option {pair!r} is not KEY=VALUE (e.g. reward_normalization=none)")
        if key not in allowed:
            raise ValueError(f"--rebel-option {key!r} is not an option this benchmark can set; expected one of {sorted(allowed)}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def run_sb3(
    env_id: str, algo: str, steps: int, seed: int, eval_every_steps: int, episodes: int, workdir: Path, resume: bool = False
) -> dict[str, Any]:
    """One SB3 run; saved every ``eval_every_steps`` to ``workdir`` (model, SAC's replay buffer,
    curve and training time) so that ``resume`` continues it from there."""
    import gymnasium as gym
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.callbacks import BaseCallback

    folder = run_folder(workdir, env_id, algo, seed)
    cls = PPO if algo == "sb3-ppo" else SAC

    class Actor:
        def predict(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
            return model.predict(obs, deterministic=deterministic)[0]

    class PeriodicEvalAndSave(BaseCallback):
        def __init__(self, progress: dict[str, Any]) -> None:
            super().__init__()
            self.progress = progress
            self.started = time.perf_counter()
            self.seconds_before = progress["train_seconds"]
            self.paused_seconds = 0.0  # evaluations and saves, not training
            self.save_pending = False

        def train_seconds(self) -> float:
            return self.seconds_before + time.perf_counter() - self.started - self.paused_seconds

        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every_steps == 0 and self.num_timesteps < steps:  # the final evaluation follows learn()
                start = time.perf_counter()
                self.progress["curve"].append((self.num_timesteps, evaluate(Actor(), env_id, episodes)["eval_return"]))  # type: ignore[arg-type]
                self.paused_seconds += time.perf_counter() - start
                self.save_pending = True
                if algo == "sb3-ppo":  # its rollout is collected again after a resume
                    self.save()
            return True

        def _on_rollout_end(self) -> None:
            if self.save_pending:  # SAC: after the step's transition went into the replay buffer
                self.save()

        def save(self) -> None:
            start = time.perf_counter()
            self.progress["train_seconds"] = self.train_seconds()
            self.progress["num_timesteps"] = self.num_timesteps
            _save_sb3(model, folder, self.progress)
            self.paused_seconds += time.perf_counter() - start
            self.save_pending = False

    saved = folder / "save" / "progress.json"
    if resume and saved.is_file():
        progress = json.loads(saved.read_text())
        model = cls.load(folder / "save" / "model.zip", env=gym.make(env_id), device="cpu")
        if algo == "sb3-sac":
            model.load_replay_buffer(folder / "save" / "replay_buffer.pkl")
        model.set_random_seed(seed + model.num_timesteps)  # SB3 saves no random state: the rest is a fresh stream
    else:
        progress = {"curve": [], "train_seconds": 0.0, "num_timesteps": 0}
        model = cls("MlpPolicy", gym.make(env_id), seed=seed, verbose=0, device="cpu")
    callback = PeriodicEvalAndSave(progress)
    model.learn(steps - model.num_timesteps, callback=callback, reset_num_timesteps=False)
    train_seconds = callback.train_seconds()
    final = evaluate(Actor(), env_id, episodes)  # type: ignore[arg-type]
    return {
        "final_return": final["eval_return"],
        "final_return_std": final["eval_return_std"],
        "env_steps": steps,
        "train_seconds": train_seconds,
        "curve": [*map(tuple, progress["curve"]), (steps, final["eval_return"])],
    }


def _save_sb3(model: Any, folder: Path, progress: dict[str, Any]) -> None:
    """Model, replay buffer (off-policy algorithms) and progress into ``folder/save``, swapped in whole."""
    staging, final, old = folder / "save.tmp", folder / "save", folder / "save.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save(staging / "model.zip")
    if hasattr(model, "replay_buffer"):
        model.save_replay_buffer(staging / "replay_buffer.pkl")
    (staging / "progress.json").write_text(json.dumps(progress))
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def command_line(argv: list[str]) -> str:
    """The command as typed, with the text of ``--note`` (printed under the table) shortened to '...'."""
    words = ["python", *argv]
    return " ".join("'...'" if previous == "--note" else shlex.quote(word) for previous, word in zip(["", *words], words, strict=False))


def row_label(run: dict[str, Any]) -> str:
    """The algorithm of a result, followed by its options (if any) in parentheses: ``rebel-critic (eta=1.5)``."""
    options = run.get("options") or {}
    words = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(options.items()))
    return f"{run['algorithm']} ({words})" if words else run["algorithm"]


def row_labels(results: list[dict[str, Any]], algorithms: list[str]) -> list[str]:
    """The table's row labels in the order of ``algorithms``: each algorithm's defaults first, then its runs with options."""
    return [label for algo in algorithms for label in sorted({row_label(r) for r in results if r["algorithm"] == algo})]


def write_report(results: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    lines = [
        "# Control: REBEL against Stable-Baselines3",
        "",
        f"Command: `{command_line(sys.argv)}`",
        "",
        (
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; budget {args.steps} env steps, seeds {args.seeds}, "
            f"final deterministic evaluation over {args.episodes} episodes."
        ),
        "",
        "| env | algorithm | final eval return (mean ± std over seeds) | per seed | env steps / s (training) | x SB3 PPO's steps/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    labels = row_labels(results, args.algorithms)

    def speed(env_id: str, label: str) -> float:
        runs = [r for r in results if r["env"] == env_id and row_label(r) == label]
        return float(np.mean([r["env_steps"] / r["train_seconds"] for r in runs])) if runs else float("nan")

    for env_id in args.envs:
        for label in labels:
            runs = [r for r in results if r["env"] == env_id and row_label(r) == label]
            if not runs:
                continue
            returns = [r["final_return"] for r in runs]
            per_seed = ", ".join(f"{x:.0f}" for x in returns)
            ratio = speed(env_id, label) / speed(env_id, "sb3-ppo")
            lines.append(
                f"| {env_id} | {label} | {np.mean(returns):.1f} ± {np.std(returns):.1f} | {per_seed} | {speed(env_id, label):.0f} | {ratio:.2f} |"
            )
    if args.steps < 1_000_000 or len(args.seeds) < 3:
        lines += [
            "",
            (
                f"**Short budget:** {args.steps} env steps and {len(args.seeds)} seed(s). Published MuJoCo comparisons use 1M steps "
                "and 5 or more seeds; these numbers show early learning only."
            ),
        ]
    if any(r.get("options") for r in results):
        lines += [
            "",
            (
                "Not the defaults: a row whose algorithm names options in parentheses ran with those options in place of the "
                "variant's current defaults (set with `--rebel-option`, or the defaults of an earlier version); its runs are kept "
                "apart from the runs with the defaults."
            ),
        ]
    if args.note:
        lines += ["", args.note]
    lines += ["", "![learning curves](control.png)", ""]
    for section in kept_sections(out / "control.md"):  # written by other scripts (control_vec_env.py)
        lines += [section, ""]
    (out / "control.md").write_text("\n".join(lines))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(args.envs), 3.6))
    axes = fig.subplots(1, len(args.envs), squeeze=False)[0]
    for ax, env_id in zip(axes, args.envs):
        for color, label in enumerate(labels):
            runs = [r for r in results if r["env"] == env_id and row_label(r) == label]
            for k, r in enumerate(runs):
                points = dict(r["curve"])  # one point per step count: the final evaluation wins over a periodic one there
                xs, ys = (tuple(points), tuple(points.values())) if points else ((), ())
                ax.plot(xs, ys, color=f"C{color}", alpha=0.8, label=label if k == 0 else None)
        ax.set_title(env_id)
        ax.set_xlabel("env steps")
        ax.set_ylabel("eval return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "control.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=50_000, help="env steps between evaluations of the curves")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument(
        "--workdir",
        default=None,
        help="where the run folders go (REBEL's runs, SB3's saves, each run's result); default runs/benchmarks/STEPS-steps, "
        "so that runs of one env, algorithm and seed at two budgets do not share a folder",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs of --workdir: finished ones are read back from their result.json, REBEL's continue exactly from "
        "their newest checkpoint, SB3's from their last save (every --eval-every steps; SB3 saves no random state, so not bit-exact)",
    )
    parser.add_argument("--note", default="", help="a sentence added to the report (conditions of the run)")
    parser.add_argument(
        "--rebel-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one of the REBEL variants' defaults in every REBEL run (repeatable; VALUE is JSON or a string), "
        "e.g. --rebel-option reward_normalization=none; the report puts the runs that used it in rows of their own, named "
        "after the options (--resume refuses a run that started with other settings, before any run)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every algorithm (default: 1; small MLPs run fastest so)")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="no runs: write the report from these control.json files (runs split over processes)"
    )
    args = parser.parse_args()
    for name in ("steps", "eval_every", "episodes", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        rebel_options = parse_rebel_options(args.rebel_option)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        runs = [r for path in args.merge for r in json.loads(Path(path).read_text())]
        latest = {(r["env"], row_label(r), r["seed"]): r for r in runs}
        results = list(latest.values())  # a later file's run of the same env, algorithm, options and seed replaces an earlier one
        args.envs = list(dict.fromkeys(r["env"] for r in results))
        args.seeds = sorted({r["seed"] for r in results})
        args.algorithms = [a for a in ALGORITHMS if any(r["algorithm"] == a for r in results)]
        (out / "control.json").write_text(json.dumps(results, indent=1))
        write_report(results, args, out)
        return
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.steps)
    if args.resume:  # before any run: a resumed run must carry the settings its row will be labelled with
        for env_id in args.envs:
            for algo in (a for a in args.algorithms if a.startswith("rebel-")):
                for seed in args.seeds:
                    try:
                        check_resumable(workdir, env_id, algo.removeprefix("rebel-"), seed, rebel_options)
                    except ValueError as error:
                        parser.error(str(error))
    results = []
    for env_id in args.envs:
        for algo in args.algorithms:
            for seed in args.seeds:
                torch.manual_seed(seed)
                finished = run_folder(workdir, env_id, algo, seed) / "result.json"
                if args.resume and finished.is_file():
                    result = json.loads(finished.read_text())
                elif algo.startswith("rebel-"):
                    variant = algo.removeprefix("rebel-")
                    result = run_rebel(
                        env_id, variant, args.steps, seed, args.eval_every, args.episodes, workdir, args.resume, options=rebel_options
                    )
                else:
                    result = run_sb3(env_id, algo, args.steps, seed, args.eval_every, args.episodes, workdir, args.resume)
                finished.parent.mkdir(parents=True, exist_ok=True)
                finished.write_text(json.dumps(result))
                results.append({"env": env_id, "algorithm": algo, "seed": seed, **result})
                print(
                    f"{env_id} {algo} seed {seed}: return {result['final_return']:.1f}, {result['env_steps'] / result['train_seconds']:.0f} steps/s",
                    flush=True,
                )
                (out / "control.json").write_text(json.dumps(results, indent=1))
    write_report(results, args, out)


if __name__ == "__main__":
    main()
