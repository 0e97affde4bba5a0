"""Environment steps per second of the control samplers with the envs stepped in this process
(``vec_env="sync"``) and in 1 or 2 worker processes (``vec_env="async"``), side by side in one
command; writes its table as a section of docs/benchmarks/control.md.

    nice -n 5 python benchmarks/control_vec_env.py --envs CartPole-v1 Hopper-v5 --variants pool mc trajectory

``pool`` steps the mc sampler's branch pool alone (256 x 2 copies, random actions, no policy):
the ceiling of what the workers can give. ``mc`` and ``trajectory`` train with the variant's
defaults (``Rebel(env, variant=..., vec_env=..., n_envs=...).learn(steps)``), so their rate
includes the policy's forward passes and its updates. The load average is read before and
after each run: other processes share the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, machine, replace_section, table
from rebel.control.agent import Rebel
from rebel.control.envs import EnvPool

MODES = {"sync": ("sync", 1), "async-1": ("async", 1), "async-2": ("async", 2)}


class Clock:
    """Wall time and CPU time of this process and of its worker processes over a run."""

    def __init__(self) -> None:
        self.before = self._worker_times()  # workers started before the run (a pool's): their making is not counted
        self.wall, self.main, self.workers = time.perf_counter(), time.process_time(), 0.0

    def stop(self) -> None:
        """Read the times (before the workers are closed)."""
        self.wall, self.main = time.perf_counter() - self.wall, time.process_time() - self.main
        self.workers = sum(t - self.before.get(pid, 0.0) for pid, t in self._worker_times().items())

    @staticmethod
    def _worker_times() -> dict[int, float]:
        """CPU seconds so far of each process this one started."""
        return {c.pid: c.cpu_times().user + c.cpu_times().system for c in psutil.Process().children(recursive=True)}


def pool_rate(env: str, mode: str, steps: int) -> tuple[Clock, int]:
    """Times of a 512-copy pool stepped with random actions (no policy) for ``steps`` env steps."""
    vec_env, workers = MODES[mode]
    pool = EnvPool(env, 512, workers=workers if vec_env == "async" else 0)
    rng = np.random.default_rng(0)
    index = list(range(len(pool)))
    pool.reset(index, index)
    taken = 0
    clock = Clock()
    while taken < steps:
        actions = _random_actions(pool, rng)
        _, terminated, truncated = pool.step(index, actions)
        ended = np.flatnonzero(terminated | truncated).tolist()
        pool.reset(ended, [None] * len(ended))
        taken += len(index)
    clock.stop()
    pool.close()
    return clock, taken


def _random_actions(pool: EnvPool, rng: np.random.Generator) -> np.ndarray:
    space = pool.action_space
    if hasattr(space, "n"):
        return rng.integers(space.n, size=len(pool))
    return rng.uniform(space.low, space.high, size=(len(pool), *space.shape)).astype(space.dtype)


def train_rate(env: str, variant: str, mode: str, steps: int) -> tuple[Clock, int]:
    """Times of ``Rebel(env, variant).learn(steps)`` with the variant's defaults."""
    vec_env, n_envs = MODES[mode]
    with tempfile.TemporaryDirectory() as folder:
        agent = Rebel(
            env, variant=variant, seed=0, output_dir=folder, vec_env=vec_env, n_envs=n_envs,
            eval_every=0, eval_episodes=1, progress=False, report_to="none", plot=False, checkpoint_every=10**6,
        )  # fmt: skip
        clock = Clock()
        agent.learn(steps)
        clock.stop()
        agent.close()
        return clock, agent.env_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Hopper-v5"])
    parser.add_argument("--variants", nargs="+", default=["pool", "mc", "trajectory"], choices=["pool", "mc", "trajectory"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=40_000, help="env steps per run")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/control.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, cpu_rows = [], []
    for env in args.envs:
        for variant in args.variants:
            rates, cpu, loads = {}, [], []
            for mode in args.modes:
                before = os.getloadavg()[0]
                clock, taken = pool_rate(env, mode, args.steps) if variant == "pool" else train_rate(env, variant, mode, args.steps)
                loads.append(f"{before:.1f}-{os.getloadavg()[0]:.1f}")
                rates[mode] = taken / clock.wall
                main_us, workers_us = 1e6 * clock.main / taken, 1e6 * clock.workers / taken
                cpu.append(f"{main_us:.0f}" + (f" + {workers_us:.0f}" if mode != "sync" else ""))
                print(f"{env} {variant} {mode}: {rates[mode]:.0f} env steps/s, CPU us/step {cpu[-1]} ({taken} steps)", flush=True)
            base = rates.get("sync")
            cells = [f"{rates[m]:.0f}" + (f" ({rates[m] / base:.2f}x)" if base and m != "sync" else "") for m in args.modes]
            rows.append([env, variant, *cells, ", ".join(loads)])
            cpu_rows.append([env, variant, *cpu])
    lines = [
        "## Environments in worker processes (`vec_env`)",
        "",
        f"`{command_line()}`",
        "",
        (
            f"Env steps per second, about {args.steps} env steps per run (x: against sync in the same row); "
            "the load average (1 min) before-after each run, in the order of the columns, counts the other "
            "engineers' processes on this 2-core machine."
        ),
        "",
        *table(["env", "what", *args.modes, "load average"], rows),
        "",
        (
            "CPU time per env step in microseconds, the training process + its workers (all workers together), "
            "from the same runs: what the load does not change much."
        ),
        "",
        *table(["env", "what", *args.modes], cpu_rows),
        "",
        machine(("gymnasium", "mujoco"), 1, "cpu") + f" Run on {time.strftime('%Y-%m-%d')}.",
    ]
    replace_section(args.out, "vec-env", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
