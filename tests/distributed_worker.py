"""Run by test_distributed.py under torchrun: tabular REBEL on every process."""

import sys
from pathlib import Path

import torch

from rebel import Trainer, TrainerConfig
from rebel_envs.tabular import TabularConfig, TabularSampler, make_tabular


class RecordingSampler(TabularSampler):
    def collect(self, policy):
        batch = super().collect(policy)
        self.contexts = getattr(self, "contexts", []) + [batch.context]
        return batch


out = Path(sys.argv[1])
torch.manual_seed(0)
policy, sampler = make_tabular(TabularConfig())
sampler = RecordingSampler(sampler.mdp)
config = TrainerConfig(
    output_dir=str(out / "run"), iterations=3, learning_rate=0.1, epochs=2, minibatch_size=32, progress=False, report_to="none", plot=False
)
trainer = Trainer(policy, sampler, config)
rows = trainer.train()
rank = trainer.accelerator.process_index
torch.save(
    {"logits": trainer.policy.logits.detach(), "contexts": sampler.contexts, "rows": rows, "world": trainer.accelerator.num_processes},
    out / f"rank{rank}.pt",
)
