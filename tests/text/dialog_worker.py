"""Run by test_dialog.py under torchrun: whole-dialog REBEL with an env in every process, evaluated every iteration."""

import sys
from pathlib import Path

import torch

from rebel.text import TextConfig, TextTrainer
from rebel.text.env import EnvReply, TextEnv


class Repeat(TextEnv):
    """Opens with the row's number; 1 for an answer starting with its first digit; two turns."""

    def reset(self, rng, row=None):
        self.target, self.turn = str(row["number"])[0], 0
        return [{"role": "user", "content": str(row["number"])}]

    def step(self, message, rng):
        self.turn += 1
        return EnvReply([{"role": "user", "content": str(rng.randrange(10))}], float(message[:1] == self.target), terminated=self.turn == 2)


model_dir, out = sys.argv[1], Path(sys.argv[2])
config = TextConfig(output_dir=str(out / "run"), iterations=2, prompts_per_iteration=3, num_generations=2, max_new_tokens=3,
                    learning_rate=1e-3, log_dialogs=2, eval_every=1, eval_dialogs=5, progress=False, report_to="none",
                    plot=False)  # fmt: skip
openings = []  # per iteration, the openings of this process's dialogs
trainer = TextTrainer(
    model_dir,
    None,
    [{"number": n} for n in range(100)],
    config,
    env=Repeat,
    eval_dataset=[{"number": n} for n in range(100, 110)],  # 5 evaluation dialogs: 3 on rank 0, 2 on rank 1
    callbacks=[lambda t, metrics: openings.append(sorted({d["messages"][0]["content"] for d in trainer.sampler.last_dialogs}))],
)
rows = trainer.train()
rank = trainer.trainer.accelerator.process_index
torch.save({"params": dict(trainer.model.named_parameters()), "openings": openings, "rows": rows}, out / f"rank{rank}.pt")
