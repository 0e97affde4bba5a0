"""REBEL against DDPO's clipped per-step loss on the same Stable Diffusion pipeline, side by side.

Both algorithms run through ``rebel.diffusion.DiffusionTrainer`` on the same starting
pipeline (LoRA on the UNet, starting at zero), prompts, reward, images per prompt, DDIM steps,
guidance, learning rate, optimizer, epochs and minibatches, so they make the same number of
reward queries and optimizer steps. Only the loss differs:

* ``rebel``: REBEL's regression of log-ratio differences (summed over latent dimensions)
  onto reward differences, rewards normalised within each prompt's group.
* ``ddpo``: DDPO's loss as in ddpo-pytorch: PPO's clipped surrogate on every denoising step
  (``ppo_clip`` loss), per-step log-densities averaged over latent dimensions, clip range
  1e-4, advantages normalised per prompt (the rewards of the prompt's images minus their
  mean, over their standard deviation).

Each run is a fresh subprocess (seeds interleaved: every algorithm's seed 0, then seed 1, ...)
so memory peaks do not mix. Reported per algorithm: reward against reward queries, the
reward of a fixed-seed evaluation after training (the same noise for every algorithm),
time per iteration (sampling, reward, update), peak resident memory (and on CUDA
``torch.cuda.max_memory_allocated``), and image grids of the evaluation. Writes
``<out>/diffusion.md``, ``diffusion.png`` and ``diffusion_grid_*.png``::

    pip install torch==2.13.0 && pip install -e ".[diffusion,test]"
    python benchmarks/diffusion_vs_ddpo.py --out docs/benchmarks        # the embedded shapes task, brightness reward

    # a real pipeline (GPU):
    python benchmarks/diffusion_vs_ddpo.py --model runwayml/stable-diffusion-v1-5 --reward compressibility \\
        --prompts animals --iterations 50 --prompts-per-iteration 16 --num-inference-steps 50 --guidance-scale 5 \\
        --learning-rate 3e-4 --minibatch-size 8 --epochs 1 --mixed-precision fp16 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakRSS, command_line, machine, mean, mean_std, table

ALGORITHMS = ("rebel", "ddpo")
LABELS = {"rebel": "REBEL", "ddpo": "DDPO (clipped per-step loss)"}
# What differs between the algorithms; everything else is shared.
LOSS_SETTINGS: dict[str, dict[str, Any]] = {
    "rebel": {"loss": "rebel", "log_prob_reduction": "sum", "reward_normalization": "within_group"},
    "ddpo": {"loss": "ppo_clip", "log_prob_reduction": "mean", "clip_range": 1e-4, "reward_normalization": "none"},
}
# The command line's options that are DiffusionConfig settings of the same name (the same for every algorithm).
CONFIG_OPTIONS = ("iterations", "prompts_per_iteration", "num_generations", "num_inference_steps", "guidance_scale", "learning_rate",
                  "epochs", "minibatch_size", "lora_rank", "mixed_precision", "eta", "gradient_checkpointing")  # fmt: skip
EVAL_IMAGES_PER_PROMPT = 4
EVAL_SEED = 12_345


# ----------------------------------------------------------------------------- the task
def task_prompts(args: argparse.Namespace) -> list[str]:
    """The training prompts: the shapes task's, or ``--prompts`` (``animals`` or a text file)."""
    if args.model is None:
        from rebel_envs.diffusion_tasks import shape_prompts

        return shape_prompts()
    from rebel.diffusion.sampler import ANIMALS

    if args.prompts in (None, "animals"):
        return list(ANIMALS)
    return [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]


def task_reward(args: argparse.Namespace) -> Any:
    from rebel.diffusion.cli import DiffusionSource, reward_from_source
    from rebel.diffusion.rewards import brightness

    if args.reward is None:
        return brightness
    return reward_from_source(DiffusionSource(model=args.model, reward=args.reward))


def eval_prompts(args: argparse.Namespace) -> list[str]:
    """The evaluation's prompts (at most ``--eval-prompts`` of the training prompts), each repeated."""
    prompts = task_prompts(args)[: args.eval_prompts]
    return [p for p in prompts for _ in range(EVAL_IMAGES_PER_PROMPT)]


def evaluate(policy: Any, args: argparse.Namespace) -> tuple[float, Any]:
    """Mean reward of the fixed-seed evaluation images, and the images."""
    import torch

    from rebel.diffusion.rewards import call_reward

    texts = eval_prompts(args)
    images = policy.sample(texts, torch.Generator().manual_seed(EVAL_SEED))["images"]
    return call_reward(task_reward(args), images, texts).mean().item(), images


def save_grid(images: Any, rewards: Any, path: Path) -> None:
    from rebel.diffusion.trainer import image_grid

    image_grid(images, [f"{r:.3g}" for r in rewards], columns=EVAL_IMAGES_PER_PROMPT).save(path)


# ----------------------------------------------------------------------------- one run
def config_for(algo: str, seed: int, args: argparse.Namespace, output_dir: Path) -> Any:
    from rebel.config import pick
    from rebel.diffusion import DiffusionConfig

    return DiffusionConfig(
        output_dir=str(output_dir),
        **pick(args, CONFIG_OPTIONS),
        seed=seed,
        log_images=0,
        eval_every=0,  # the benchmark evaluates once, after training, with the same noise for every algorithm
        checkpoint_every=args.iterations,
        progress=False,
        plot=False,
        report_to="none",
        **LOSS_SETTINGS[algo],
    )


def worker(args: argparse.Namespace) -> None:
    """One algorithm, one seed, in this (fresh) process; writes ``args.result``."""
    import torch

    from rebel.diffusion import DiffusionTrainer
    from rebel.diffusion.rewards import call_reward

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available()
    out = Path(args.result).with_suffix("")
    with PeakRSS() as rss:
        trainer = DiffusionTrainer(args.pipeline_dir, task_reward(args), task_prompts(args), config_for(args.worker, args.seed, args, out))
        start = time.perf_counter()
        rows = trainer.train()
        train_seconds = time.perf_counter() - start
    evaluation, images = evaluate(trainer.policy, args)
    grid = Path(args.result).with_suffix(".png")
    save_grid(images, call_reward(task_reward(args), images, eval_prompts(args)), grid)
    result = {
        "algorithm": args.worker,
        "seed": args.seed,
        "reward": [r["reward_mean"] for r in rows],
        "reward_std": [r["reward_std"] for r in rows],
        "loss": [r["loss"] for r in rows],
        "samples": [r["samples"] for r in rows],
        "kl": [r.get("kl", float("nan")) for r in rows],
        "seconds": [r["iteration_time"] for r in rows],
        "train_seconds": train_seconds,
        "eval_reward": evaluation,
        "grid": str(grid),
        "rss_before_mb": rss.start_rss / 2**20,
        "rss_peak_mb": rss.peak / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- all runs
def build_pipeline(args: argparse.Namespace, folder: Path) -> str:
    """The starting pipeline's folder: the embedded shapes pipeline, warmed up and saved, or ``--model``."""
    if args.model is not None:
        return args.model
    import torch

    from rebel_envs.diffusion_tasks import ShapesTaskConfig, make_shapes_pipeline

    torch.set_num_threads(args.threads)
    make_shapes_pipeline(ShapesTaskConfig(), save_to=folder)
    return str(folder)


def start_evaluation(pipeline_dir: str, args: argparse.Namespace, out: Path) -> float:
    """The fixed-seed evaluation of the starting pipeline (the same for every algorithm: LoRA starts at zero)."""
    import torch

    from rebel.diffusion import DiffusionPolicy
    from rebel.diffusion.rewards import call_reward

    torch.manual_seed(0)
    policy = DiffusionPolicy(
        pipeline_dir, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, lora_rank=args.lora_rank
    )
    value, images = evaluate(policy, args)
    save_grid(images, call_reward(task_reward(args), images, eval_prompts(args)), out / "diffusion_grid_start.png")
    return value


def run_all(pipeline_dir: str, args: argparse.Namespace, tmp: Path, out: Path) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {algo: [] for algo in args.algorithms}
    for seed in args.seeds:
        for algo in args.algorithms:
            result = tmp / f"{algo}-s{seed}.json"
            worker_args = ["--worker", algo, "--seed", str(seed), "--pipeline-dir", pipeline_dir, "--result", str(result)]
            start = time.perf_counter()
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], *worker_args], check=True)
            r = json.loads(result.read_text())
            if seed == args.seeds[0]:
                (out / f"diffusion_grid_{algo}.png").write_bytes(Path(r["grid"]).read_bytes())
            results[algo].append(r)
            print(
                f"{algo} seed {seed}: {mean(r['seconds']):.2f} s/iteration, peak RSS {r['rss_peak_mb']:.0f} MB, "
                f"reward {r['reward'][0]:.4f} -> {r['reward'][-1]:.4f}, fixed-seed evaluation {r['eval_reward']:.4f} "
                f"({time.perf_counter() - start:.0f} s in all)",
                flush=True,
            )
    return results


# ----------------------------------------------------------------------------- report
def write_report(results: dict[str, list[dict[str, Any]]], start_eval: float, args: argparse.Namespace, out: Path, command: str) -> None:
    import torch

    queries = args.prompts_per_iteration * args.num_generations
    w = max(1, min(3, args.iterations // 4))
    cuda = any(r["cuda_peak_mb"] is not None for runs in results.values() for r in runs)
    header = ["algorithm", "s / iteration", "peak RSS MB", "RSS increase MB", *(["CUDA peak MB"] if cuda else []),
              f"reward, first {w} iterations", f"reward, last {w}", "reward, mean of all iterations",
              f"fixed-seed evaluation (start {start_eval:.4f})"]  # fmt: skip
    lines = [
        "# Diffusion: REBEL against DDPO",
        "",
        (
            "Generated by [benchmarks/diffusion_vs_ddpo.py](../../benchmarks/diffusion_vs_ddpo.py) (see [diffusion.md](../diffusion.md) "
            "for the adapter). Both algorithms run in one command, one after another on the same machine, each in a fresh "
            "subprocess (seeds interleaved), through the same `DiffusionTrainer` from the same starting pipeline; only the loss differs."
        ),
        "",
        f"```bash\n{command}\n```",
        "",
        machine(("diffusers", "peft"), args.threads, "cuda" if torch.cuda.is_available() else "cpu"),
        "",
        (
            f"Pipeline: {args.model or 'the embedded tiny shapes pipeline (envs/diffusion_tasks.py), brightness reward'}"
            f"{'' if args.model is None else f', reward {args.reward}'}. {args.iterations} iterations x {args.prompts_per_iteration} "
            f"prompts x {args.num_generations} images = {args.iterations * queries} reward queries per run; "
            f"{args.num_inference_steps} DDIM steps (eta 1), guidance {args.guidance_scale}, LoRA rank {args.lora_rank}, "
            f"learning rate {args.learning_rate}, {args.epochs} epoch(s) of minibatches of {args.minibatch_size} images; "
            f"seeds {', '.join(map(str, args.seeds))} (mean ± std over seeds). The fixed-seed evaluation draws "
            f"{EVAL_IMAGES_PER_PROMPT} images of each of {len(eval_prompts(args)) // EVAL_IMAGES_PER_PROMPT} prompts with the same noise for every model."
        ),
        "",
        *table(header, [row(algo, runs, w, cuda) for algo, runs in results.items()]),
    ]
    if "rebel" in results and "ddpo" in results:
        lines += ["", against_ddpo(results["rebel"], results["ddpo"])]
    if args.note:
        lines += ["", args.note]
    lines += [
        "",
        "![reward against reward queries](diffusion.png)",
        "",
        "Fixed-seed evaluation images (seed 0 of each algorithm; rows are prompts, each tile captioned with its reward):",
        "",
    ]
    grids = ["![start](diffusion_grid_start.png)", *(f"![{a}](diffusion_grid_{a}.png)" for a in results)]
    lines += [*table(["start", *(LABELS[a] for a in results)], [grids]), ""]
    (out / "diffusion.md").write_text("\n".join(lines))
    plot(results, queries, out / "diffusion.png")


def row(algo: str, runs: list[dict[str, Any]], w: int, cuda: bool) -> list[str]:
    """One algorithm's cells of the table (``w``: iterations averaged at the start and at the end)."""
    return [
        LABELS[algo],
        mean_std([mean(r["seconds"]) for r in runs], ".2f"),
        mean_std([r["rss_peak_mb"] for r in runs], ".0f"),
        mean_std([r["rss_peak_mb"] - r["rss_before_mb"] for r in runs], ".0f"),
        *([mean_std([r["cuda_peak_mb"] for r in runs], ".0f")] if cuda else []),
        mean_std([mean(r["reward"][:w]) for r in runs], ".4f"),
        mean_std([mean(r["reward"][-w:]) for r in runs], ".4f"),
        mean_std([mean(r["reward"]) for r in runs], ".4f"),
        mean_std([r["eval_reward"] for r in runs], ".4f"),
    ]


def against_ddpo(rebel: list[dict[str, Any]], ddpo: list[dict[str, Any]]) -> str:
    """The sentence comparing REBEL's runs with DDPO's: differences and ratios of the seed means."""
    return (
        "Against the target (higher reward than DDPO at equal reward queries, no more time or memory): "
        f"fixed-seed evaluation {mean([r['eval_reward'] for r in rebel]) - mean([r['eval_reward'] for r in ddpo]):+.4f}, "
        f"mean training reward {mean([mean(r['reward']) for r in rebel]) - mean([mean(r['reward']) for r in ddpo]):+.4f}, "
        f"time per iteration x{mean([mean(r['seconds']) for r in rebel]) / mean([mean(r['seconds']) for r in ddpo]):.2f} of DDPO's, "
        f"peak RSS x{mean([r['rss_peak_mb'] for r in rebel]) / mean([r['rss_peak_mb'] for r in ddpo]):.2f} "
        "(differences between seed means; compare with the std over seeds)."
    )


def plot(results: dict[str, list[dict[str, Any]]], queries: int, path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    for k, (algo, runs) in enumerate(results.items()):
        curves = np.array([r["reward"] for r in runs])
        x = queries * np.arange(1, curves.shape[1] + 1)
        for curve in curves:
            ax.plot(x, curve, color=f"C{k}", alpha=0.25, linewidth=0.8)
        ax.plot(x, curves.mean(0), color=f"C{k}", label=f"{LABELS[algo]} (mean of {len(runs)} seeds)")
    ax.set_xlabel("reward queries")
    ax.set_ylabel("mean reward of the iteration's images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from rebel.diffusion.cli import EMBEDDED_DEFAULTS as D

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--model", help="Stable Diffusion folder or hub id; default: the embedded tiny shapes pipeline")
    parser.add_argument(
        "--reward", help="aesthetic | compressibility | incompressibility | brightness | module:function (default: brightness)"
    )
    parser.add_argument("--prompts", help="animals or a text file (with --model; default animals)")
    parser.add_argument("--iterations", type=int, default=D["iterations"])
    parser.add_argument("--prompts-per-iteration", type=int, default=D["prompts_per_iteration"])
    parser.add_argument("--num-generations", type=int, default=D["num_generations"])
    parser.add_argument("--num-inference-steps", type=int, default=D["num_inference_steps"])
    parser.add_argument("--guidance-scale", type=float, default=D["guidance_scale"])
    parser.add_argument("--learning-rate", type=float, default=D["learning_rate"])
    parser.add_argument("--epochs", type=int, default=D["epochs"])
    parser.add_argument("--minibatch-size", type=int, default=D["minibatch_size"])
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--eta", type=float, default=D["eta"], help="REBEL's step size")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in the backward pass")
    parser.add_argument("--eval-prompts", type=int, default=8, help="prompts of the fixed-seed evaluation (4 images each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    parser.add_argument("--out", default="docs/benchmarks", help="folder of diffusion.md, diffusion.png and the grids")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument("--note", default="", help="a sentence added to the report (conditions of the run)")
    # one algorithm, one seed: the subprocesses
    parser.add_argument("--worker", choices=ALGORITHMS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffusion-vs-ddpo-") as tmp:
        start = time.perf_counter()
        pipeline_dir = build_pipeline(args, Path(tmp) / "start")
        start_eval = start_evaluation(pipeline_dir, args, out)
        print(f"starting pipeline {pipeline_dir} ({time.perf_counter() - start:.0f} s); fixed-seed evaluation {start_eval:.4f}", flush=True)
        results = run_all(pipeline_dir, args, Path(tmp), out)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "start_eval": start_eval, "results": results}, indent=1))
    write_report(results, start_eval, args, out, command_line())
    print(f"wrote {out / 'diffusion.md'}, {out / 'diffusion.png'} and the grids")


if __name__ == "__main__":
    main()
