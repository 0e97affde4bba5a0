"""Run by test_vllm.py under torchrun: REBEL with a colocated vLLM engine in every process."""

import os
import sys
from pathlib import Path

import torch

from rebel.text import TextConfig, TextTrainer
from rebel_envs.text_tasks import sorted_digits_reward, sorting_dataset

model_dir, out = sys.argv[1], Path(sys.argv[2])
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
config = TextConfig(output_dir=str(out / "run"), iterations=2, prompts_per_iteration=4, num_generations=2, max_new_tokens=6,
                    learning_rate=1e-3, generation_backend="vllm", vllm_kwargs={"kv_cache_memory_bytes": 2**27, "enforce_eager": True},
                    progress=False, tensorboard=False, plot=False)  # fmt: skip
trainer = TextTrainer(model_dir, sorted_digits_reward, sorting_dataset(64, seed=0), config)
rows = trainer.train()
rank = trainer.trainer.accelerator.process_index
params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
torch.save({"params": params, "rows": rows, "world": trainer.trainer.accelerator.num_processes}, out / f"rank{rank}.pt")
