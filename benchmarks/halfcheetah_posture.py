"""Does a control run on HalfCheetah-v5 learn to run upright or on its back?

HalfCheetah-v5 rewards forward speed whatever the body's posture, and a policy that flips
the torso early can settle into running on its back: a local optimum at about a quarter of
the upright return. Per seed this script trains ``Rebel("HalfCheetah-v5", ...)`` in chunks
of ``--check-every`` env steps and, after each chunk, plays one deterministic episode (reset
seed 10000) and records its return and the mean |pitch| of the torso over the episode (the
``rooty`` joint, ``qpos[2]``): near 0 upright, near pi on its back. Prints one JSON line per
check and a markdown table at the end.

    python benchmarks/halfcheetah_posture.py --seeds 1 2 --steps 50000 --check-every 10000 \\
        --rebel-option learning_starts=20000

Seeds run one after another; start one process per seed to use more cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from control_vs_sb3 import parse_rebel_options

from rebel.control import Rebel
from rebel.control.agent import VARIANTS

ENV_ID = "HalfCheetah-v5"
ON_ITS_BACK = 2.0  # mean |pitch| in radians above which an episode counts as run on the back


def posture_episode(agent: Rebel, env: gym.Env, seed: int = 10_000) -> tuple[float, float]:
    """Return and mean |torso pitch| (radians) of one deterministic episode of ``agent``."""
    obs, _ = env.reset(seed=seed)
    total, pitches, done = 0.0, [], False
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        pitches.append(abs(float(env.unwrapped.data.qpos[2])))
        done = terminated or truncated
    return total, float(np.mean(pitches))


def run_seed(seed: int, steps: int, check_every: int, workdir: Path, options: dict[str, Any]) -> list[dict[str, float]]:
    """Train one seed to ``steps`` env steps, checking the posture every ``check_every``."""
    agent = Rebel(ENV_ID, seed=seed, output_dir=str(workdir / f"seed{seed}"), eval_every=0, eval_episodes=1, **options)
    env = gym.make(ENV_ID)
    rows, start = [], time.time()
    while agent.env_steps < steps:
        agent.learn(min(check_every, steps - agent.env_steps), progress=False)
        episode_return, pitch = posture_episode(agent, env)
        row = {"seed": seed, "env_steps": agent.env_steps, "return": round(episode_return, 1), "mean_abs_pitch": round(pitch, 2),
               "minutes": round((time.time() - start) / 60, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def cell(row: dict[str, float]) -> str:
    """``return (pitch)`` of one check, the pitch in bold when above ``ON_ITS_BACK``."""
    pitch = f"{row['mean_abs_pitch']:.2f}"
    return f"{row['return']:.0f} ({f'**{pitch}**' if row['mean_abs_pitch'] > ON_ITS_BACK else pitch})"


def table(rows: list[dict[str, float]]) -> str:
    """Markdown table: one line per seed, ``return (pitch)`` at each check; a pitch above
    ``ON_ITS_BACK`` in bold."""
    checks = sorted({int(r["env_steps"]) for r in rows})
    lines = ["| seed | " + " | ".join(f"{c // 1000}k" for c in checks) + " |", "| --- |" + " --- |" * len(checks)]
    for seed in sorted({int(r["seed"]) for r in rows}):
        cells = {int(r["env_steps"]): r for r in rows if r["seed"] == seed}
        lines.append(f"| {seed} | " + " | ".join(cell(cells[c]) if c in cells else "" for c in checks) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=50_000, help="env steps per seed")
    parser.add_argument("--check-every", type=int, default=10_000, help="env steps between posture checks")
    parser.add_argument("--variant", default="critic", choices=VARIANTS)
    parser.add_argument("--rebel-option", action="append", default=[], metavar="KEY=VALUE", help="a Rebel option (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/benchmarks/halfcheetah-posture"))
    args = parser.parse_args()
    if args.steps < 1 or args.check_every < 1:
        parser.error(f"--steps and --check-every must be >= 1, got {args.steps} and {args.check_every}")
    try:
        options = {"variant": args.variant, **parse_rebel_options(args.rebel_option)}
    except ValueError as error:
        parser.error(str(error))
    rows = [row for seed in args.seeds for row in run_seed(seed, args.steps, args.check_every, args.workdir, options)]
    print(f"\nreturn (mean |torso pitch|, rad; bold: on its back) of one deterministic episode, {args.variant}, options {options}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
