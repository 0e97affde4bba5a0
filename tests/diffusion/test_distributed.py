"""Two CPU processes (gloo) through torchrun: each draws its own images, the LoRA stays identical."""

import json
from pathlib import Path

import torch


def test_two_processes_draw_their_own_images_and_keep_identical_lora(torchrun_two_processes, tiny_pipe, tmp_path):
    rank0, rank1 = torchrun_two_processes(Path(__file__).with_name("distributed_worker.py"), tiny_pipe, port=29547)
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["params"] and all("lora" in name for name in rank0["params"])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name  # gradients were averaged across ranks
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in rank0["params"].items() if "lora_B" in k)  # and they moved
    for a, b in zip(rank0["seen"], rank1["seen"]):
        assert a["noise"].shape == b["noise"].shape == (4, 4, 4, 4)
        assert not torch.equal(a["noise"], b["noise"])  # each process drew its own chains
    assert [s["prompts"] for s in rank0["seen"]] != [s["prompts"] for s in rank1["seen"]]
    assert rank0["rows"][-1]["samples"] == 2 * 2 * 2 * 2  # counters summed over processes
    assert [r["start_log_ratio_max"] for r in rank0["rows"]] == [0.0, 0.0]
    logged = [json.loads(line) for line in (tmp_path / "run" / "images.jsonl").read_text().splitlines()]
    assert len(logged) == 2 * 4  # the main process's grid only, once per iteration
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
