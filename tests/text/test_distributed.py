"""Two CPU processes (gloo) through torchrun: prompts sharded, parameters identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_processes_shard_prompts_and_keep_identical_parameters(tiny_lm, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29541", str(worker), tiny_lm, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
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
