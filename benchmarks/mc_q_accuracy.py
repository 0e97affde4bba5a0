"""How well does the ``mc`` variant's estimate of Q(s, a) - Q(s, a') follow the long-run one?

Loads an ``mc`` run's newest checkpoint (policy, value function, walkers), draws two actions
at each walker's state and estimates their Q difference two ways: with short branches
(horizon ``H``, with and without the learned value at the end, one branch per action, common
random numbers across the pair) and with a long Monte-Carlo reference (``--reference-horizon``
steps, no value, the mean of ``--reference-rollouts`` branches per action, noise independent
of the short branches'). Prints a markdown table of the correlation and sign agreement of each
short estimate with the reference, and the reference's split-half correlation (how repeatable
the reference itself is).

    python benchmarks/mc_q_accuracy.py RUN_DIR [--states 256] [--horizons 1 3 10 30 100]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rebel.control import Rebel
from rebel.control.mc import MonteCarloSampler
from rebel.runs import latest_checkpoint, load_file


@dataclass
class QAccuracy:
    """What :func:`measure` found: one row per (horizon, value at the end or not)."""

    states: int
    reference_mean_abs: float  # mean |Q(s, a_0) - Q(s, a_1)| of the reference
    split_half: float  # correlation of the reference's two halves of branches
    rows: list[dict[str, float]] = field(default_factory=list)  # horizon, value, corr, sign, mean_abs
    raw_actions: torch.Tensor | None = None  # [S, 2, ...] the compared actions


def q_differences(sampler: MonteCarloSampler, states, raw, noise, horizon: int, value_function) -> np.ndarray:
    """``[S, m]`` Q(s, a_0) - Q(s, a_1) per branch, from ``horizon``-step branches."""
    sampler.horizon, sampler.value_function = horizon, value_function
    q = sampler.q_values(sampler.policy, states, raw, noise[:, :, :, :horizon].contiguous())
    return q[:, 0] - q[:, 1]


def measure(
    run_dir: str, states: int = 256, horizons: Sequence[int] = (1, 3, 10, 30, 100), reference_horizon: int = 300,
    reference_rollouts: int = 8, seed: int = 1,
) -> QAccuracy:  # fmt: skip
    """Short-branch estimates of Q(s, a_0) - Q(s, a_1) at the walkers of ``run_dir``'s newest
    checkpoint, against the long Monte-Carlo reference (see the module docstring)."""
    m, h_ref = reference_rollouts, reference_horizon
    if m < 2 or m % 2:
        raise ValueError(f"reference_rollouts must be an even number >= 2, got {m}")
    if max(horizons) > h_ref or min(horizons) < 1:
        raise ValueError(f"horizons must lie in 1..reference_horizon={h_ref}, got {list(horizons)}")
    agent = Rebel.from_run(run_dir, rollouts_per_action=m)
    if agent.config.variant != "mc":
        raise ValueError(f"{run_dir} is a {agent.config.variant!r} run; expected an mc run")
    policy, sampler = agent.policy, agent._make_sampler()
    sampler.load_state_dict(load_file(latest_checkpoint(run_dir) / "process_0.pt")["sampler"])
    value_function = sampler.value_function
    s = min(states, sampler.num_states)
    snapshots = [sampler.walkers.snapshot(i) for i in range(s)]
    generator = torch.Generator().manual_seed(seed)
    _, raw = policy.act(policy.preprocess(sampler.walkers.obs[:s]).repeat_interleave(2, 0), generator=generator)
    raw = raw.reshape(s, 2, *raw.shape[1:])
    shape = (s, 1, m, h_ref, *policy.noise_shape())
    noise = torch.randn(shape, generator=generator).expand(s, 2, *shape[2:])  # common random numbers
    fresh = torch.randn(shape, generator=generator).expand(s, 2, *shape[2:])  # the short branches' own noise

    reference = q_differences(sampler, snapshots, raw, noise, h_ref, None)  # [S, m]
    truth = reference.mean(1)
    half = float(np.corrcoef(reference[:, : m // 2].mean(1), reference[:, m // 2 :].mean(1))[0, 1])
    result = QAccuracy(s, float(np.abs(truth).mean()), half, raw_actions=raw)
    for horizon in horizons:
        for vf in (value_function, None) if value_function is not None else (None,):
            d = q_differences(sampler, snapshots, raw, fresh, horizon, vf)[:, 0]
            result.rows.append({
                "horizon": horizon, "value": vf is not None, "corr": float(np.corrcoef(d, truth)[0, 1]),
                "sign": float((np.sign(d) == np.sign(truth)).mean()), "mean_abs": float(np.abs(d).mean()),
            })  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--states", type=int, default=256, help="walker states used (at most the run's num_states)")
    parser.add_argument("--horizons", type=int, nargs="+", default=[1, 3, 10, 30, 100])
    parser.add_argument("--reference-horizon", type=int, default=300)
    parser.add_argument("--reference-rollouts", type=int, default=8, help="branches per action averaged in the reference (even)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = measure(args.run_dir, args.states, args.horizons, args.reference_horizon, args.reference_rollouts, args.seed)
    print(
        f"{args.run_dir}: {r.states} states; reference: {args.reference_horizon} steps, mean of {args.reference_rollouts} branches per action, no value;"
    )
    print(f"mean |reference| {r.reference_mean_abs:.3f}, split-half correlation {r.split_half:.3f}\n")
    print("| horizon | value at the end | corr. with reference (1 branch) | sign agreement | mean abs. difference |")
    print("| --- | --- | --- | --- | --- |")
    for row in r.rows:
        print(f"| {row['horizon']} | {'yes' if row['value'] else 'no'} | {row['corr']:.2f} | {row['sign']:.2f} | {row['mean_abs']:.3f} |")


if __name__ == "__main__":
    main()
