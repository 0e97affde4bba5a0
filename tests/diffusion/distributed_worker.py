"""Run by test_distributed.py under torchrun: REBEL on a tiny diffusion pipeline in every process."""

import sys
from pathlib import Path

import torch

from rebel.diffusion import DiffusionConfig, DiffusionTrainer, brightness

pipe_dir, out = sys.argv[1], Path(sys.argv[2])
config = DiffusionConfig(output_dir=str(out / "run"), iterations=2, prompts_per_iteration=2, num_generations=2, num_inference_steps=3,
                         guidance_scale=2.0, lora_rank=2, learning_rate=1e-2, log_images=4, progress=False, report_to="none", plot=False)  # fmt: skip
prompts = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle", "star")]
trainer = DiffusionTrainer(pipe_dir, brightness, prompts, config)
seen = []
original = trainer.sampler.collect


def recording_collect(policy):
    batch = original(policy)
    seen.append({"prompts": list(batch.context), "noise": batch.data["latents"][:, 0].clone()})
    return batch


trainer.sampler.collect = recording_collect
rows = trainer.train()
accelerator = trainer.trainer.accelerator
params = {name: p.detach().clone() for name, p in trainer.unet.named_parameters() if p.requires_grad}
torch.save({"params": params, "seen": seen, "rows": rows, "world": accelerator.num_processes}, out / f"rank{accelerator.process_index}.pt")
