"""Dialogs: whole-dialog REBEL, per-turn Monte-Carlo-reset REBEL and TRL's GRPOTrainer, at equal
generated tokens, on the embedded dialog tasks of ``rebel_envs.dialog_tasks``.

* ``rebel-whole``: ``rebel.text.TextTrainer`` with ``dialog_form="whole"`` (n dialogs per
  opening, reward = the dialog's return, the log-ratio summed over the agent's tokens).
* ``rebel-per-turn``: ``dialog_form="per_turn"`` (a branching turn drawn uniformly, n
  branches from the restored prefix, one continuation each).
* ``trl-grpo``: TRL 1.16's ``GRPOTrainer`` with a ``rollout_func`` (TRL's hook for custom,
  multi-turn rollouts) that plays the whole dialog with the same environment and returns it
  as one completion, the environment's tokens masked out by ``env_mask``; the reward
  function reads the dialog's return. (TRL's ``environment_factory`` / ``tools`` route needs
  a tool-calling chat template and response parser that the tiny character model does not
  have.)

Every method starts from the same warmed-up tiny model, samples at temperature 1, uses the
same openings, n (``num_generations``), dialogs per update, learning rate and AdamW, one
optimizer step per iteration, no KL penalty, and stops once its agent-generated tokens
(every sampled token, branch continuations included) reach ``--budget``. Each run is a fresh
subprocess (peak RSS sampled every 5 ms). Reported: the return of the final policy on 128
fresh dialogs (sampled, temperature 1; rebel-rl's evaluation of dialogs, the same for every
method, outside the timed training), the training dialogs' return against generated
tokens, time and memory. Writes ``<out>/dialogs.md``::

    nice -n 5 python benchmarks/text_dialogs.py --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

NOTES = "<!-- notes: kept when the script rewrites the tables -->"
METHODS = ("rebel-whole", "rebel-per-turn", "trl-grpo")
LABELS = {"rebel-whole": "REBEL, whole dialog", "rebel-per-turn": "REBEL, per-turn MC resets", "trl-grpo": "TRL GRPOTrainer (rollout_func)"}


# ----------------------------------------------------------------------------- dialogs played here
def play_batch(model: Any, tokenizer: Any, task: Any, openings: list[str], seeds: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
    """Sample one dialog per seed (temperature 1) with ``model``, batched across dialogs:
    the opening ids, the ids after it, a mask of the agent's tokens and the return. A dialog's
    opening comes from its ``openings`` key (a row of the task's dataset, or the env's draw),
    the environment's later random numbers from its ``seeds`` key."""
    import torch

    from rebel_envs.dialog_tasks import dialog_ids

    envs = [task.make_env() for _ in seeds]
    dialogs = []
    for env, key in zip(envs, openings):
        rows = task.dataset
        opening = env.reset(random.Random(key), None if rows is None else rows[random.Random(key).randrange(len(rows))])
        ids = dialog_ids(tokenizer, opening)[0] + [tokenizer.convert_tokens_to_ids("<bot>")]
        dialogs.append({"opening": ids, "ids": [], "mask": [], "return": 0.0, "done": False, "turn": 0, "agent_tokens": 0})
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    while active := [d for d in dialogs if not d["done"]]:
        rows = [d["opening"] + d["ids"] for d in active]
        width = max(map(len, rows))
        room = task.max_length - width
        if room < 2:  # the model's positions are full: truncate what is left
            for d in active:
                d["done"] = True
            break
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=(torch.arange(width) >= torch.tensor([width - len(r) for r in rows])[:, None]).long(),
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=min(max_new_tokens, room - 1),
                                 pad_token_id=pad, eos_token_id=eos)  # fmt: skip
        for d, new in zip(active, out[:, width:].tolist()):
            turn = new[: new.index(eos) + 1] if eos in new else [t for t in new if t != pad]
            d["ids"] += turn
            d["mask"] += [1] * len(turn)
            d["agent_tokens"] += len(turn)
            if turn[-1] != eos:  # cut: end the turn with an EOS the agent did not sample
                d["ids"].append(eos)
                d["mask"].append(0)
            env = envs[dialogs.index(d)]
            reply = env.step(tokenizer.decode(turn, skip_special_tokens=True), random.Random(f"{seeds[dialogs.index(d)]}:{d['turn']}"))
            d["turn"] += 1
            d["return"] += reply.reward
            d["done"] = reply.terminated or reply.truncated
            if not d["done"]:
                delta = dialog_ids(tokenizer, reply.messages)[0] + [tokenizer.convert_tokens_to_ids("<bot>")]
                d["ids"] += delta
                d["mask"] += [0] * len(delta)
    return dialogs


def evaluate(model: Any, tokenizer: Any, task: Any, n: int, seed: int) -> float:
    """The mean return of ``n`` fresh dialogs sampled at temperature 1 (the environment's own
    openings, its random numbers from fixed seeds): the library's dialog evaluation
    (:class:`rebel.text.evaluation.DialogEvaluator`), the same for every method's final model."""
    import torch

    from rebel.text import TextConfig
    from rebel.text.dialog import DialogSampler
    from rebel.text.evaluation import DialogEvaluator
    from rebel.text.policy import CausalLMPolicy

    config = TextConfig(seed=seed, eval_dialogs=n, eval_generation="sampled", temperature=1.0, max_dialog_tokens=task.max_length,
                        **task.text_config)  # fmt: skip
    sampler = DialogSampler(task.make_env, max_new_tokens=config.max_new_tokens, max_dialog_tokens=config.max_dialog_tokens)
    policy = CausalLMPolicy(model, tokenizer, temperature=1.0).eval()
    with torch.no_grad():
        metrics, _ = DialogEvaluator(sampler, None, config).measure(policy)  # prompts_per_iteration x num_generations dialogs at once
    return metrics["eval/return_mean"]


# ----------------------------------------------------------------------------- the methods
def run_rebel(form: str, model: Any, tokenizer: Any, task: Any, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from rebel.text import TextConfig, TextTrainer

    settings = {"max_dialog_tokens": task.max_length, **task.text_config, "num_generations": args.num_generations,
                "prompts_per_iteration": args.prompts, "learning_rate": args.learning_rate}  # fmt: skip
    config = TextConfig(output_dir=str(workdir), iterations=None, budget=args.budget, budget_counter="generated_tokens", dialog_form=form,
                        seed=args.seed, checkpoint_every=10**6, progress=False, report_to="none", plot=False, log_dialogs=0, eval_every=0,
                        **settings)  # fmt: skip
    trainer = TextTrainer(model, None, task.dataset, config, env=task.make_env, processing_class=tokenizer)
    rows = trainer.train()
    curve = [(float(row["generated_tokens"]), row["episode_return"]) for row in rows]  # generated_tokens: the running total
    return {"curve": curve, "seconds": sum(r["iteration_time"] for r in rows), "model": trainer.policy.model}


def run_trl(model: Any, tokenizer: Any, task: Any, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    state = {"tokens": 0, "calls": 0}
    curve: list[tuple[float, float]] = []

    def rollout(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        was_training = policy.training
        policy.eval()
        # a group (the copies of one prompt) shares its opening; every dialog has its own env noise
        openings = [f"{args.seed}:{p}" for p in prompts]
        seeds = [f"{args.seed}:{state['calls']}:{i}" for i in range(len(prompts))]
        dialogs = play_batch(policy, tokenizer, task, openings, seeds, task.text_config["max_new_tokens"])
        policy.train(was_training)
        state["calls"] += 1
        state["tokens"] += sum(d["agent_tokens"] for d in dialogs)
        curve.append((state["tokens"], mean([d["return"] for d in dialogs])))
        return {"prompt_ids": [d["opening"] for d in dialogs], "completion_ids": [d["ids"] for d in dialogs],
                "logprobs": [[0.0] * len(d["ids"]) for d in dialogs], "env_mask": [d["mask"] for d in dialogs],
                "dialog_return": [d["return"] for d in dialogs]}  # fmt: skip

    def dialog_return(prompts: list[Any], completions: list[Any], dialog_return: list[float], **kwargs: Any) -> list[float]:
        return list(dialog_return)

    class Budget(TrainerCallback):
        def on_step_end(self, train_args: Any, train_state: Any, control: Any, **k: Any) -> Any:
            control.should_training_stop = state["tokens"] >= args.budget
            return control

    prompts = Dataset.from_list([{"prompt": str(i)} for i in range(10_000)])  # an opening's seed; the env draws the opening from it
    batch = args.prompts * args.num_generations
    config = GRPOConfig(
        output_dir=str(workdir), max_steps=10**6, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=task.max_length, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, num_iterations=1, use_cpu=not torch.cuda.is_available(), disable_dropout=True, seed=args.seed,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )  # fmt: skip
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = GRPOTrainer(model=model, reward_funcs=[dialog_return], args=config, train_dataset=prompts, processing_class=tokenizer,
                          rollout_func=rollout, callbacks=[Budget()])  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    return {"curve": curve, "seconds": time.perf_counter() - start, "model": trainer.accelerator.unwrap_model(trainer.model)}


# ----------------------------------------------------------------------------- one run, in its own process
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rebel_envs.dialog_tasks import DIALOG_TASKS

    if args.worker == "trl-grpo":
        import trl  # noqa: F401 - imported before the baseline RSS

    task = DIALOG_TASKS[args.task]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with PeakRSS() as rss:
        if args.worker == "trl-grpo":
            out = run_trl(model, tokenizer, task, args, Path(args.result).with_suffix(""))
        else:
            out = run_rebel(
                args.worker.removeprefix("rebel-").replace("-", "_"), model, tokenizer, task, args, Path(args.result).with_suffix("")
            )
    total = time.perf_counter() - start
    trained = out.pop("model")
    out.update(method=args.worker, total_seconds=total, rss_peak_mb=rss.peak / 2**20, rss_before_mb=rss.start_rss / 2**20,
               final=evaluate(trained, tokenizer, task, args.eval_dialogs, seed=1000 + args.seed))  # fmt: skip
    Path(args.result).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- the report
def write_report(
    results: dict[str, dict[str, list[dict[str, Any]]]], start: dict[str, float], args: argparse.Namespace, seconds: float
) -> None:
    lines = [
        "# Dialogs: whole-dialog REBEL, per-turn MC-reset REBEL and TRL GRPO",
        "",
        "Written by `benchmarks/text_dialogs.py` (see its docstring for what is equal between the methods). Command:",
        "",
        f"    {command_line()}",
        "",
        machine(("transformers", "trl"), 1, "cpu")
        + f" The whole command took {seconds / 60:.1f} min, `nice -n 5`, on a machine shared with other jobs "
        "(times are indicative only).",
        "",
        (
            f"Budget: {args.budget} agent-generated tokens per run; {args.prompts} openings x {args.num_generations} per update; "
            f"learning rate {args.learning_rate}; seeds {', '.join(map(str, args.seeds))}. Final return: {args.eval_dialogs} fresh sampled dialogs."
        ),
        "",
    ]
    for task, by_method in results.items():
        lines += [f"## {task}", "", f"Return of the warmed-up model before training: {start[task]:.3f}.", ""]
        rows = []
        for method, runs in by_method.items():
            early = [mean([r for _, r in run["curve"][:3]]) for run in runs]
            late = [mean([r for _, r in run["curve"][-3:]]) for run in runs]
            rows.append([LABELS[method], mean_std([run["final"] for run in runs]), mean_std(early), mean_std(late),
                         mean_std([float(len(run["curve"])) for run in runs], ".0f"), mean_std([run["total_seconds"] for run in runs], ".0f"),
                         mean_std([run["rss_peak_mb"] for run in runs], ".0f")])  # fmt: skip
        lines += table(
            ["method", "final return", "training return, first 3 updates", "last 3 updates", "updates", "time (s)", "peak RSS (MB)"], rows
        )
        lines.append("")
    page = Path(args.out) / "dialogs.md"
    notes = page.read_text().partition(NOTES)[2] if page.exists() else ""  # the page's prose after the tables stays
    page.write_text("\n".join(lines) + "\n" + NOTES + notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["guess-number", "calculator"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budget", type=int, default=6000, help="agent-generated tokens per run")
    parser.add_argument("--prompts", type=int, default=8, help="openings per update")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-dialogs", type=int, default=128)
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    from rebel_envs.dialog_tasks import DIALOG_TASKS

    began = time.perf_counter()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    start: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="text_dialogs-") as tmp:
        for task in args.tasks:
            folder = Path(tmp) / task
            model, tokenizer = DIALOG_TASKS[task].make_model(save_to=folder)
            start[task] = evaluate(model, tokenizer, DIALOG_TASKS[task], args.eval_dialogs, seed=1000)
            results[task] = {m: [] for m in args.methods}
            for seed in args.seeds:
                for method in args.methods:
                    result = Path(tmp) / f"{task}-{method}-{seed}.json"
                    cmd = [sys.executable, __file__, "--worker", method, "--task", task, "--seed", str(seed), "--model-dir", str(folder),
                           "--result", str(result), "--budget", str(args.budget), "--prompts", str(args.prompts),
                           "--num-generations", str(args.num_generations), "--learning-rate", str(args.learning_rate),
                           "--eval-dialogs", str(args.eval_dialogs)]  # fmt: skip
                    subprocess.run(cmd, check=True)
                    results[task][method].append(json.loads(result.read_text()))
                    print(task, method, seed, {k: v for k, v in results[task][method][-1].items() if k != "curve"}, flush=True)
            write_report(results, start, args, time.perf_counter() - began)
        if args.out:
            Path(args.out, "dialogs.json").write_text(json.dumps({"results": results, "start": start}))


if __name__ == "__main__":
    main()
