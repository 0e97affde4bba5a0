"""The shipped accelerate configs in two CPU processes (``accelerate launch --config_file
configs/accelerate/<name>.yaml``): data parallel, DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's CPU
accelerator over gloo) and FSDP2 (fully_shard over gloo). Each runs sharded_worker.py: whole
groups per process, exact resume, and the first iteration (samples, reference KL, metrics,
parameters) and the saved models equal to data parallel's."""

from pathlib import Path

import pytest
import torch

from rebel import sharding

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sharded_worker.py")
PORTS = {"ddp": 29551, "fsdp2": 29552, "zero2": 29553, "zero3": 29554}
KIND = {"ddp": "MULTI_CPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
SHARDED = ("fsdp2", "zero3")  # the policy's weights split across processes
NAMES = ["ddp", "fsdp2", "zero2", "zero3"]


@pytest.fixture(scope="module")
def runs(tiny_lm, tmp_path_factory, two_processes):
    """``runs(name)``: the two ranks' records of the worker under config ``name`` (run once)."""
    done = {}

    def get(name):
        if name.startswith("zero"):
            pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'rebel-rl[deepspeed]')")
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            config = ROOT / "configs" / "accelerate" / f"{name}.yaml"
            done[name] = two_processes(WORKER, tiny_lm, out=out, port=PORTS[name], accelerate_config=config)
        return done[name]

    return get


def strip_times(rows):
    return [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k} for r in rows]


@pytest.mark.parametrize("name", NAMES)
def test_each_config_starts_two_processes_that_hold_their_share_and_the_whole_policy_while_sampling(runs, name):
    rank0, rank1 = runs(name)
    assert rank0["world"] == rank1["world"] == 2
    for run in ("full", "lora"):
        assert rank0[run]["distributed_type"] == f"DistributedType.{KIND[name]}"
        held = rank0[run]["held"], rank1[run]["held"]
        assert rank0[run]["elements_in_collect"] == rank1[run]["elements_in_collect"] == runs("ddp")[0][run]["elements_in_collect"]
        if name in SHARDED:  # each process stores about half of every trainable tensor
            assert all(0.4 < h < 0.6 for h in held) and sum(held) == pytest.approx(1.0, abs=0.01), held
        else:
            assert held == (1.0, 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_each_process_collects_whole_groups_of_its_own_prompts(runs, name):
    rank0, rank1 = runs(name)
    for run in ("full", "lora"):
        for k, (groups0, groups1) in enumerate(zip(rank0[run]["groups"], rank1[run]["groups"])):
            contexts = []
            for rank, groups in ((rank0, groups0), (rank1, groups1)):
                context = rank[run]["contexts"][k]
                members = {}
                for g, c in zip(groups, context):
                    members.setdefault(g, []).append(c)
                assert all(len(m) == 2 and len(set(m)) == 1 for m in members.values())  # num_generations samples of one prompt
                assert len(members) == 4  # prompts_per_iteration groups on every process
                contexts.append(set(context))
            assert not contexts[0] & contexts[1]


@pytest.mark.parametrize("name", NAMES)
def test_resuming_gives_the_uninterrupted_run(runs, name):
    rank0, _ = runs(name)
    assert strip_times(rank0["half"]["rows"] + rank0["resumed"]["rows"]) == strip_times(rank0["full"]["rows"])
    whole, resumed = rank0["full"]["params"][-1], rank0["resumed"]["params"][-1]
    assert whole.keys() == resumed.keys() and len(whole) == 28
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


@pytest.mark.parametrize("name", ["fsdp2", "zero2", "zero3"])
def test_the_first_iteration_equals_data_parallel(runs, name):
    ddp, other = runs("ddp"), runs(name)
    for run in ("full", "lora"):  # a frozen reference copy, and the adapter disabled
        for rank in (0, 1):  # the same samples: generation saw the whole, same policy
            assert other[rank][run]["completions"][0] == ddp[rank][run]["completions"][0]
        row, expected = strip_times(other[0][run]["rows"])[0], strip_times(ddp[0][run]["rows"])[0]
        assert row.keys() == expected.keys() and row["ref_kl"] == 0.0  # the policy starts as its reference
        assert row == pytest.approx(expected, rel=1e-5, abs=1e-6)  # gradients are summed in another order
        params, expected_params = other[0][run]["params"][0], ddp[0][run]["params"][0]
        assert params.keys() == expected_params.keys()
        for key in params:
            torch.testing.assert_close(params[key], expected_params[key], rtol=0, atol=1e-6)
    second, expected = other[0]["full"]["rows"][1], ddp[0]["full"]["rows"][1]
    assert second["ref_kl"] != 0.0 and second["ref_kl"] == pytest.approx(expected["ref_kl"], rel=1e-4)


@pytest.mark.parametrize("name", ["fsdp2", "zero2", "zero3"])
def test_the_saved_models_equal_data_parallels(runs, name):
    from safetensors.torch import load_file

    ddp, other = Path(runs("ddp")[0]["out"]), Path(runs(name)[0]["out"])
    for folder, file in (("full/model", "model.safetensors"), ("lora/model", "adapter_model.safetensors"),
                         ("lora/model_merged", "model.safetensors")):  # fmt: skip
        saved, expected = load_file(other / folder / file), load_file(ddp / folder / file)
        assert saved.keys() == expected.keys(), folder
        for key in saved:
            torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=1e-5)


def test_the_runs_mixed_precision_rules_over_the_accelerate_configs(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match=r"mixed_precision: the accelerate config says 'bf16' and the run 'no'; set the run's"):
        sharding.make_accelerator("no", 1.0)


def test_deepspeed_clips_with_max_grad_norm():
    config = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto"}
    sharding._fill_deepspeed_config(config, 0.5)
    assert config == {"gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": 1}
    unclipped = {}
    sharding._fill_deepspeed_config(unclipped, None)
    assert unclipped["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"
    with pytest.raises(ValueError, match=r"gradient_clipping: the DeepSpeed config says 2.0 and the run's max_grad_norm 1.0"):
        sharding._fill_deepspeed_config({"gradient_clipping": 2.0}, 1.0)
