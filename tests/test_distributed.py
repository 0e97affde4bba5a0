"""Two CPU processes (gloo) through torchrun: data parallel over contexts."""

import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_processes_keep_identical_parameters_and_sample_different_contexts(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", str(worker), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    assert torch.equal(rank0["logits"], rank1["logits"])  # gradients were averaged across ranks
    assert rank0["contexts"] != rank1["contexts"]  # each process drew its own start states
    assert rank0["rows"][-1]["samples"] == 3 * 2 * 32 * 4  # counters summed over processes
    checkpoint = tmp_path / "run" / "checkpoints" / "iter_000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["process_0.pt", "process_1.pt", "trainer.pt"]
