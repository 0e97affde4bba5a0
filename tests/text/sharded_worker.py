"""Run by test_sharded.py under ``accelerate launch --config_file configs/accelerate/<name>.yaml``
in two CPU processes: the same small REBEL runs under each config.

* ``full``: 2 iterations of full fine-tuning with a KL to a frozen reference copy;
* ``half`` then ``resumed``: 1 iteration, then a new trainer resuming it to 2;
* ``lora``: 1 iteration of LoRA with the KL to the adapter-disabled model, merged model saved.

Each rank saves what it saw to ``rank<k>.pt``: metric rows, its batches' groups and contexts,
its first completions, the parameter elements it held while collecting, the policy's full parameters after each iteration (rank 0: gathered
from the shards), how much of the policy it holds, and the saved models' paths.
"""

import sys
from pathlib import Path

import torch

from rebel import sharding
from rebel.text import TextConfig, TextTrainer
from rebel_envs.text_tasks import sorted_digits_reward, sorting_dataset

model_dir, out = sys.argv[1], Path(sys.argv[2])
FAST = {"progress": False, "report_to": "none", "plot": False, "log_completions": 0}
SETTINGS = {"prompts_per_iteration": 4, "num_generations": 2, "max_new_tokens": 6, "minibatch_size": 4, "learning_rate": 1e-3,
            "kl_coef": 0.05, "checkpoint_every": 1, "seed": 3, **FAST}  # fmt: skip
DATA = sorting_dataset(64, seed=0)

accelerator = sharding.make_accelerator("no", 1.0)
if sharding.uses_deepspeed(accelerator):
    # DeepSpeed keeps parameters of fewer than 1e5 elements whole on every process: all of
    # this tiny model's; with 0 every parameter is partitioned, as a large model's are.
    accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0


def full_parameters(trainer: TextTrainer) -> dict[str, torch.Tensor]:
    """The policy's trainable tensors, gathered when sharded (whole on rank 0 only)."""
    state = trainer.trainer.policy_state()
    policy = trainer.trainer.policy
    return {k: v.detach().clone().cpu() for k, v in policy.checkpoint_state(state).items()}


def held_fraction(trainer: TextTrainer) -> float:
    """Elements of the trainable parameters this process stores, over their full count."""
    held = total = 0
    for p in trainer.trainer.model.parameters():
        if not p.requires_grad:
            continue
        full = getattr(p, "ds_numel", p.numel())
        local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else (p.to_local().numel() if hasattr(p, "to_local") else p.numel())
        held, total = held + local, total + full
    return held / total


def run(name: str, iterations: int, resume: bool = False, **overrides) -> dict:
    config = TextConfig(output_dir=str(out / name), iterations=iterations, **{**SETTINGS, **overrides})
    trainer = TextTrainer(model_dir, sorted_digits_reward, DATA, config)
    seen = {"groups": [], "contexts": [], "completions": [], "params": []}
    collect = trainer.sampler.collect

    def recording_collect(policy):
        batch = collect(policy)
        seen["groups"].append(batch.group.tolist())
        seen["contexts"].append(list(batch.context))
        seen["completions"].append([s["completion"] for s in trainer.sampler.last_samples])
        seen["elements_in_collect"] = sum(p.numel() for p in policy.parameters())  # whole while the sampler runs
        return batch

    trainer.sampler.collect = recording_collect
    trainer.trainer.callbacks.append(lambda t, metrics: seen["params"].append(full_parameters(trainer)))
    seen["held"] = held_fraction(trainer)
    seen["rows"] = trainer.train(resume=resume)
    seen["distributed_type"] = str(trainer.accelerator.distributed_type)
    return seen


runs = {
    "full": run("full", 2),
    "half": run("split", 1),
    "resumed": run("split", 2, resume=True),
    "lora": run("lora", 1, use_lora=True, lora_r=4, lora_target_modules="c_attn,c_fc", save_merged=True),
}
rank = accelerator.process_index
torch.save({"world": accelerator.num_processes, "out": str(out), **runs}, out / f"rank{rank}.pt")
