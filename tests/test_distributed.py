"""Two CPU processes (gloo) through torchrun: data parallel over contexts."""

from pathlib import Path

import torch


def test_two_processes_keep_identical_parameters_and_sample_different_contexts(torchrun_two_processes, tmp_path):
    rank0, rank1 = torchrun_two_processes(Path(__file__).with_name("distributed_worker.py"), port=29533)
    assert rank0["world"] == rank1["world"] == 2
    assert torch.equal(rank0["logits"], rank1["logits"])  # gradients were averaged across ranks
    assert rank0["contexts"] != rank1["contexts"]  # each process drew its own start states
    assert rank0["rows"][-1]["samples"] == 3 * 2 * 32 * 4  # counters summed over processes
    checkpoint = tmp_path / "run" / "checkpoints" / "iter_000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["process_0.pt", "process_1.pt", "trainer.pt"]
