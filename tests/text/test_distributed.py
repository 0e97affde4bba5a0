"""Two CPU processes (gloo) through torchrun: prompts sharded, parameters identical."""

import json
from pathlib import Path

import torch


def test_two_processes_shard_prompts_and_keep_identical_parameters(torchrun_two_processes, tiny_lm, tmp_path):
    rank0, rank1 = torchrun_two_processes(Path(__file__).with_name("distributed_worker.py"), tiny_lm, port=29541)
    assert rank0["world"] == rank1["world"] == 2
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name  # gradients were averaged across ranks
    for a, b in zip(rank0["prompts"], rank1["prompts"]):
        assert len(a) == len(b) == 4 and not set(a) & set(b)  # each process had its own prompts
    assert rank0["rows"][-1]["samples"] == 2 * 2 * 4 * 2  # counters summed over processes
    assert rank0["rows"][-1]["start_log_ratio_max"] == 0.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 2 * 2 * 2  # 2 completions of each process per iteration, gathered on the main one
    assert (tmp_path / "run" / "model" / "config.json").is_file()
