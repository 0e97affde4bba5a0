"""Run by test_distributed.py under torchrun: REBEL on a tiny causal LM in every process."""

import sys
from pathlib import Path

import torch

from rebel.text import TextConfig, TextTrainer
from rebel_envs.text_tasks import sorted_digits_reward, sorting_dataset

model_dir, out = sys.argv[1], Path(sys.argv[2])
config = TextConfig(output_dir=str(out / "run"), iterations=2, prompts_per_iteration=4, num_generations=2, max_new_tokens=6, learning_rate=1e-3,
                    log_completions=2, progress=False, report_to="none", plot=False)  # fmt: skip
trainer = TextTrainer(model_dir, sorted_digits_reward, sorting_dataset(64, seed=0), config)
prompts = []
original = trainer.sampler.collect


def recording_collect(policy):
    batch = original(policy)
    prompts.append(sorted(set(batch.context)))
    return batch


trainer.sampler.collect = recording_collect
rows = trainer.train()
rank = trainer.trainer.accelerator.process_index
params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
torch.save({"params": params, "prompts": prompts, "rows": rows, "world": trainer.trainer.accelerator.num_processes}, out / f"rank{rank}.pt")
