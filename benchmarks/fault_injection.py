"""Fault injection: kill, damage and crowd small runs, recover them, and check nothing was lost or mixed.

    python benchmarks/fault_injection.py --trials 60                   # 60 trials each of tabular and text
    python benchmarks/fault_injection.py --workloads tabular --trials 12

Each trial starts a small run (``rebel train tabular`` or the embedded ``rebel train text``)
as a subprocess, injects one fault at a random moment, then recovers the run the way a user
would (``--resume`` while the folder holds a checkpoint, ``--overwrite`` when it holds a run
that never reached one, a new start otherwise) until it finishes, and compares the run's
final parameters and every ``*.jsonl`` row (times left out) with an uninterrupted run's.

Faults: ``sigkill`` and ``sigterm`` at a random moment; ``truncate`` (SIGKILL, then the newest
checkpoint's files cut to a random length); ``torn_jsonl`` (SIGKILL, then a torn row appended
to each log); ``concurrent_start`` (a second identical command into the same folder);
``concurrent_resume`` (``--resume`` of the folder while its run is going). A ``sigterm`` run
must exit 143 with a checkpoint of its last logged iteration; of two commands started into one
folder exactly one may run. Prints ``N faults injected, K runs lost or mixed``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--no-progress", "--report-to", "none", "--no-plot"]
WORKLOADS = {
    "tabular": ["train", "tabular", "--iterations", "24", "--checkpoint-every", "3", *QUIET],
    "text": [
        "train", "text", "--iterations", "8", "--checkpoint-every", "2", "--pretrain-steps", "20",
        "--num-prompts", "64", "--prompts-per-iteration", "4", *QUIET,
    ],
}  # fmt: skip
FAULTS = ("sigkill", "sigterm", "truncate", "torn_jsonl", "concurrent_start", "concurrent_resume")
TIMING_KEYS = ("time", "per_second")


@dataclass
class Outcome:
    """One run folder's end state: the policy's tensors and the rows of its logs."""

    policy: dict[str, Any]
    logs: dict[str, list[dict[str, Any]]]

    def differences(self, other: Outcome) -> list[str]:
        import torch

        out = [f"log {name} differs" for name in sorted(set(self.logs) | set(other.logs)) if self.logs.get(name) != other.logs.get(name)]
        if self.policy.keys() != other.policy.keys() or not all(torch.equal(self.policy[k], other.policy[k]) for k in self.policy):
            out.append("final parameters differ")
        return out


@dataclass
class Trial:
    workload: str
    fault: str
    stage: str = ""  # where the run was when the fault hit
    problems: list[str] = field(default_factory=list)
    commands: int = 0
    restarts: int = 0  # recoveries that had to start over (no intact checkpoint yet)


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rebel.cli", *args]


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def outcome(run_dir: Path) -> Outcome:
    from rebel.runs import latest_checkpoint, load_file, read_jsonl

    checkpoint = latest_checkpoint(run_dir)
    policy = load_file(checkpoint / "trainer.pt")["policy"] if checkpoint else {}
    logs = {
        p.name: [{k: v for k, v in row.items() if not any(t in k for t in TIMING_KEYS)} for row in read_jsonl(p)]
        for p in sorted(run_dir.glob("*.jsonl"))
    }
    return Outcome(policy, logs)


def finish(workload: str, run_dir: Path, trial: Trial) -> None:
    """Recover and complete the run as a user would."""
    from rebel.runs import holds_run, latest_checkpoint

    for _ in range(6):
        if latest_checkpoint(run_dir) is not None:
            args = ["train", workload, "--resume", str(run_dir), "--no-progress"]
        else:
            args = [*WORKLOADS[workload], "--output-dir", str(run_dir)]
            if holds_run(run_dir):
                args.append("--overwrite")
                trial.restarts += 1
        proc = subprocess.run(command(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, check=False)
        trial.commands += 1
        if proc.returncode == 0:
            return
        if "no intact checkpoint" in proc.stderr:
            for checkpoint in (run_dir / "checkpoints").glob("iter_*"):
                checkpoint.rename(checkpoint.with_name("damaged-" + checkpoint.name))
            continue
        trial.problems.append(f"recovery {' '.join(args[:4])} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        return
    trial.problems.append("the run did not finish after 6 recoveries")


def run_trial(workload: str, fault: str, reference: Reference, rng: random.Random, workdir: Path, at_rows: int | None = None) -> Trial:
    """One fault, at a random moment of the run (after a random number of its iterations, or
    after ``at_rows``, and a random part of the next), then recovery and comparison."""
    trial = Trial(workload, fault)
    run_dir = workdir / f"{workload}-{fault}-{rng.randrange(10**9)}"
    args = [*WORKLOADS[workload], "--output-dir", str(run_dir)]
    first = start(args)
    wait_for_rows(run_dir, rng.randrange(reference.iterations) if at_rows is None else at_rows, first)
    time.sleep(rng.uniform(0.0, reference.iteration_time))
    trial.stage = stage(run_dir, first)
    if fault in ("sigkill", "truncate", "torn_jsonl"):
        first.kill()
        first.wait()
        if fault == "truncate":
            damage_newest_checkpoint(run_dir, rng)
        elif fault == "torn_jsonl":
            tear_logs(run_dir, rng)
    elif fault == "sigterm":
        first.send_signal(signal.SIGTERM)
        code = first.wait()
        check_sigterm(run_dir, code, trial)
    else:
        second = start(args if fault == "concurrent_start" else ["train", workload, "--resume", str(run_dir), "--no-progress"])
        codes = (first.wait(), second.wait())
        allowed = {(0, 2), (2, 0)} if fault == "concurrent_start" else {(0, 2), (0, 0)}
        if codes not in allowed:
            trial.problems.append(f"exit codes {codes}, expected one of {sorted(allowed)}: {second.stderr.read().strip()[-200:]}")
    finish(workload, run_dir, trial)
    trial.problems += outcome(run_dir).differences(reference.outcome)
    return trial


def wait_for_rows(run_dir: Path, rows: int, proc: subprocess.Popen[str]) -> None:
    path = run_dir / "metrics.jsonl"
    while proc.poll() is None and (not path.exists() or path.read_text().count("\n") < rows):
        time.sleep(0.02)


def stage(run_dir: Path, proc: subprocess.Popen[str]) -> str:
    """Where the run is: not started, before its first checkpoint, mid-run, or finished."""
    from rebel.runs import holds_run, latest_checkpoint

    if proc.poll() is not None:
        return "finished"
    if latest_checkpoint(run_dir) is not None:
        return "mid-run"
    return "before the first checkpoint" if holds_run(run_dir) else "starting"


def check_sigterm(run_dir: Path, code: int, trial: Trial) -> None:
    """A run stopped by SIGTERM exits 143 with the checkpoint of its last logged iteration."""
    from rebel.runs import latest_checkpoint, read_metrics

    if code == 143:
        rows, checkpoint = read_metrics(run_dir), latest_checkpoint(run_dir)
        logged = rows[-1]["iteration"] if rows else 0
        if logged and (checkpoint is None or checkpoint.name != f"iter_{logged:06d}"):
            trial.problems.append(f"SIGTERM after iteration {logged} left checkpoint {checkpoint}")
    elif code not in (0, -signal.SIGTERM):  # finished first, or stopped before the handler was installed
        trial.problems.append(f"SIGTERM: exit code {code}")


def damage_newest_checkpoint(run_dir: Path, rng: random.Random) -> None:
    from rebel.runs import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return
    for file in checkpoint.glob("*.pt"):
        data = file.read_bytes()
        file.write_bytes(data[: rng.randrange(len(data))])


def tear_logs(run_dir: Path, rng: random.Random) -> None:
    for path in run_dir.glob("*.jsonl"):
        row = json.dumps({"iteration": 10**6, "loss": rng.random(), "note": "torn"})
        with open(path, "a") as f:
            f.write(row[: rng.randrange(1, len(row) - 1)])


@dataclass
class Reference:
    """The uninterrupted run: its end state, iterations and mean time per iteration."""

    outcome: Outcome
    iterations: int
    iteration_time: float


def reference_run(workload: str, workdir: Path) -> Reference:
    from rebel.runs import read_metrics

    run_dir = workdir / f"{workload}-reference"
    subprocess.run(command([*WORKLOADS[workload], "--output-dir", str(run_dir)]), check=True, cwd=ROOT, capture_output=True)
    rows = read_metrics(run_dir)
    return Reference(outcome(run_dir), len(rows), sum(r["iteration_time"] for r in rows) / len(rows))


def run_trials(
    workloads: list[str], trials: int, seed: int, workdir: Path, faults: tuple[str, ...] = FAULTS, at_rows: int | None = None
) -> list[Trial]:
    """``trials`` trials per workload, cycling through ``faults``."""
    rng = random.Random(seed)
    done = []
    for workload in workloads:
        reference = reference_run(workload, workdir)
        for k in range(trials):
            trial = run_trial(workload, faults[k % len(faults)], reference, rng, workdir, at_rows)
            done.append(trial)
            verdict = "ok" if not trial.problems else "LOST OR MIXED: " + "; ".join(trial.problems)
            print(f"{workload:8s} {trial.fault:18s} {trial.stage:28s} {verdict}", flush=True)
    return done


def summary(trials: list[Trial]) -> str:
    lost = sum(bool(t.problems) for t in trials)
    return f"{len(trials)} faults injected, {lost} runs lost or mixed"


def table(trials: list[Trial]) -> str:
    lines = [
        "| workload | fault | trials | hit the run (mid-run / before its first checkpoint / starting / finished) | lost or mixed | recovery commands | started over |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    stages = ("mid-run", "before the first checkpoint", "starting", "finished")
    for workload in dict.fromkeys(t.workload for t in trials):
        for fault in dict.fromkeys(t.fault for t in trials):
            group = [t for t in trials if (t.workload, t.fault) == (workload, fault)]
            if group:
                lines.append(
                    f"| {workload} | {fault} | {len(group)} | {' / '.join(str(sum(t.stage == s for t in group)) for s in stages)} | "
                    f"{sum(bool(t.problems) for t in group)} | "
                    f"{sum(t.commands for t in group)} | {sum(t.restarts for t in group)} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="tabular,text", help="comma-separated: tabular, text (default: both)")
    parser.add_argument("--trials", type=int, default=60, help="trials per workload, cycling through the faults (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault times and damage (default: 0)")
    parser.add_argument("--workdir", default=None, help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown or args.trials < 1:
        parser.error(
            f"--workloads {unknown} unknown (expected {sorted(WORKLOADS)})" if unknown else f"--trials must be >= 1, got {args.trials}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        began = time.monotonic()
        trials = run_trials(workloads, args.trials, args.seed, workdir)
        print(f"\n{table(trials)}\n\n{summary(trials)} ({time.monotonic() - began:.0f} s)")
    return 1 if any(t.problems for t in trials) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
