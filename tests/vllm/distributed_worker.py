"""Run by test_vllm.py in two processes (torchrun, or ``accelerate launch`` with a config of
``configs/accelerate/``): REBEL with a colocated vLLM engine in every process."""

import os
import sys
from pathlib import Path

import torch

from rebel.text import TextConfig, TextTrainer
from rebel_envs.text_tasks import sorted_digits_reward, sorting_dataset

model_dir, out = sys.argv[1], Path(sys.argv[2])
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
BACKEND = {"generation_backend": "vllm", "vllm_kwargs": {"kv_cache_memory_bytes": 2**27, "enforce_eager": True}}
if os.environ.get("REBEL_TEST_BACKEND") == "transformers":  # the same run without vLLM, for comparison
    BACKEND = {}
elif os.environ.get("REBEL_TEST_BACKEND", "").startswith("http"):  # rebel vllm-serve at that address
    BACKEND = {"generation_backend": "vllm", "vllm_mode": "server", "vllm_server_url": os.environ["REBEL_TEST_BACKEND"]}
config = TextConfig(output_dir=str(out / "run"), iterations=2, prompts_per_iteration=4, num_generations=2, max_new_tokens=6,
                    learning_rate=1e-3, **BACKEND,
                    progress=False, report_to="none", plot=False)  # fmt: skip
trainer = TextTrainer(model_dir, sorted_digits_reward, sorting_dataset(64, seed=0), config)
first = []
collect = trainer.sampler.collect


def recording_collect(policy):
    batch = collect(policy)
    first.append(batch.data["input_ids"].clone())
    return batch


trainer.sampler.collect = recording_collect
rows = trainer.train()
alive = torch.distributed.is_initialized()  # the engine, freed at the end of train(), leaves the trainer's process group
rank = trainer.trainer.accelerator.process_index
gathered = trainer.trainer.policy_state()  # sharded: the full state on rank 0 (every rank calls); else None
state = trainer.trainer.policy.checkpoint_state(gathered)
params = {name: p.detach().clone().cpu() for name, p in state.items()} if gathered is None or rank == 0 else {}
torch.save({"params": params, "rows": rows, "samples": first, "world": trainer.trainer.accelerator.num_processes,
            "process_group_after_train": alive}, out / f"rank{rank}.pt")  # fmt: skip
