"""TextTrainer: exact start of each iteration, learning on the embedded task, run folder,
saved model, LoRA, reward errors, resume, command line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rebel.runs import latest_checkpoint, read_metrics
from rebel.text import RewardFunctionError, TextConfig, TextTrainer
from rebel_envs.text_tasks import sorted_digits_reward, sorting_dataset

FAST = {"progress": False, "report_to": "none", "plot": False}
DATA = sorting_dataset(200, seed=0)


def config(tmp_path, name="run", **overrides):
    values = {"output_dir": str(tmp_path / name), "iterations": 3, "prompts_per_iteration": 8, "num_generations": 2,
              "max_new_tokens": 8, "learning_rate": 1e-3, "checkpoint_every": 100, **FAST, **overrides}  # fmt: skip
    return TextConfig(**values)


def strip_times(rows):
    return [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k} for r in rows]


def test_log_ratio_is_exactly_zero_at_the_start_of_every_iteration(tiny_lm, tmp_path):
    trainer = TextTrainer(
        tiny_lm, sorted_digits_reward, DATA, config(tmp_path, iterations=4, epochs=2, minibatch_size=6, num_generations=3, temperature=0.9)
    )
    rows = trainer.train()
    assert [r["start_log_ratio_max"] for r in rows] == [0.0] * 4
    assert all(r["log_ratio_max_abs"] > 0 for r in rows)  # and the updates moved the policy


def test_rebel_improves_the_embedded_sorting_task(sorting_lm, tmp_path):
    cfg = config(tmp_path, iterations=40, prompts_per_iteration=32, num_generations=4, missing_eos_penalty=1.0, report_to=["tensorboard"])
    rows = TextTrainer(sorting_lm, sorted_digits_reward, sorting_dataset(2000, seed=0), cfg).train()
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert 0.3 < first < 0.6  # the warmed-up model sorts only part of the time
    assert last > first + 0.15, (first, last)
    row = rows[-1]
    assert {"reward_mean", "kl", "completion_length", "tokens", "tokens_per_second", "eos_fraction", "rewards/sorted_digits_reward"} <= set(
        row
    )
    assert row["tokens"] == sum(r["completion_length"] for r in rows) * 32 * 4  # running total of completion tokens
    assert row["tokens_per_second"] > 0 and 1 <= row["completion_length"] <= 8
    run = tmp_path / "run"
    logged = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 40 * 8 and logged[-1]["iteration"] == 40
    assert {"prompt", "completion", "reward", "sorted_digits_reward"} <= set(logged[0])
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())


def test_the_saved_model_loads_in_plain_transformers(tiny_lm, tmp_path):
    trainer = TextTrainer(tiny_lm, sorted_digits_reward, DATA, config(tmp_path, iterations=2))
    trainer.train()
    folder = tmp_path / "run" / "model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(["1234:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trainer.model(ids).logits)
        assert not torch.equal(model(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_lm)(ids).logits)  # it trained


def test_lora_trains_only_the_adapter_and_saves_it(tiny_lm, tmp_path):
    from huggingface_hub import ModelCard
    from peft import PeftModel

    cfg = config(tmp_path, iterations=2, use_lora=True, lora_r=4, lora_target_modules="c_attn,c_fc", kl_coef=0.1)
    trainer = TextTrainer(tiny_lm, sorted_digits_reward, DATA, cfg)
    rows = trainer.train()
    assert rows[0]["ref_kl"] == 0.0  # the adapter starts at zero: policy == reference (adapter disabled)
    assert rows[1]["ref_kl"] != 0.0 and rows[1]["start_log_ratio_max"] == 0.0
    saved = torch.load(latest_checkpoint(tmp_path / "run") / "trainer.pt", weights_only=False)["policy"]
    assert saved and all("lora_" in k for k in saved)  # only the adapter is checkpointed
    folder = tmp_path / "run" / "model"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "model.safetensors").exists() and not (tmp_path / "run" / "model_merged").exists()  # adapter only by default
    ids = torch.tensor([[5, 6, 7, 12]])
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(folder)  # transformers puts the adapter on its base (peft installed)
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), folder)
        assert torch.allclose(adapter(input_ids=ids).logits, expected, atol=1e-5)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["rebel-rl", "reinforcement-learning", "text-generation", "lora"]
    assert card.data.base_model is None  # a local folder is named in the text, not as a hub id
    assert "| kl_coef | 0.1 |" in card.text and "| use_lora | True |" in card.text and "Reward: sorted_digits_reward." in card.text
    assert f"| reward_mean | {rows[-1]['reward_mean']:.6g} |" in card.text


def test_a_lora_run_resumes_from_its_adapter_only_save_and_merges_on_request(tiny_lm, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    lora = {"use_lora": True, "lora_r": 4, "lora_target_modules": "c_attn,c_fc"}
    TextTrainer(tiny_lm, sorted_digits_reward, DATA, config(tmp_path, iterations=2, **lora)).train()
    resumed = TextTrainer(tiny_lm, sorted_digits_reward, DATA, config(tmp_path, iterations=3, save_merged=True, **lora))
    assert [r["iteration"] for r in resumed.train(resume=True)] == [3]
    ids = torch.tensor([[5, 6, 7, 12]])
    with torch.no_grad():
        expected = resumed.model(input_ids=ids).logits
        for name in ("model", "model_merged"):
            assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / name)(input_ids=ids).logits, expected, atol=1e-4)
    merged = ModelCard.load(tmp_path / "run" / "model_merged" / "README.md")
    assert merged.data.library_name == "transformers" and "lora" not in merged.data.tags
    commands = ModelCard.load(tmp_path / "run" / "model" / "README.md").text.split("## Reproduce")[1]
    assert commands.count("python -m pytest") == 2  # this process's command, twice: the first start and the resume

    from huggingface_hub import HfApi

    pushed = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: pushed.append((repo_id, kw["private"], self.token)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: pushed.append(kw["folder_path"]) or "url")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    with pytest.raises(ValueError, match="^no Hugging Face token"):
        resumed.push_to_hub("me/sorter")
    assert pushed == []
    assert resumed.push_to_hub("me/sorter", private=True, token="hf_x") == "url"
    assert pushed == [("me/sorter", True, "hf_x"), str(tmp_path / "run" / "model")]


def test_a_failing_reward_function_stops_the_run_and_keeps_the_last_iteration(tiny_lm, tmp_path):
    calls = []

    def flaky_reward(prompts, completions, answer, **columns):
        calls.append(1)
        if len(calls) == 3:
            raise ZeroDivisionError("division by zero")
        return sorted_digits_reward(prompts, completions, answer)

    trainer = TextTrainer(tiny_lm, flaky_reward, DATA, config(tmp_path, iterations=5))
    with pytest.raises(RewardFunctionError, match="reward function 'flaky_reward' raised ZeroDivisionError: division by zero"):
        trainer.train()
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "iter_000002"
    saved = torch.load(checkpoint / "trainer.pt", weights_only=False)["policy"]
    current = trainer.trainer.policy.checkpoint_state()
    assert saved.keys() == current.keys() and all(torch.equal(saved[k], current[k]) for k in saved)


@pytest.mark.parametrize("overrides", [{}, {"epochs": 2, "minibatch_size": 8, "reward_normalization": "per_context", "kl_coef": 0.05}])
def test_resume_is_bit_identical(tiny_lm, tmp_path, overrides):
    """4 iterations straight == 2, stop, resume, 2 more."""
    straight = TextTrainer(tiny_lm, sorted_digits_reward, DATA, config(tmp_path, "straight", iterations=4, **overrides))
    rows_straight = straight.train()

    def stop_at_2(trainer, metrics):
        if trainer.iteration == 2:
            trainer.request_stop()

    rows_first = TextTrainer(
        tiny_lm, sorted_digits_reward, DATA, config(tmp_path, "split", iterations=4, **overrides), callbacks=[stop_at_2]
    ).train()
    resumed = TextTrainer(tiny_lm, sorted_digits_reward, DATA, config(tmp_path, "split", iterations=4, **overrides))
    rows_second = resumed.train(resume=True)
    assert len(rows_first) == 2 and len(rows_second) == 2
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert strip_times(rows_first + rows_second) == strip_times(rows_straight)
    assert strip_times(read_metrics(tmp_path / "split")) == strip_times(rows_straight)
    logged = lambda name: [json.loads(line) for line in (tmp_path / name / "completions.jsonl").read_text().splitlines()]
    assert logged("split") == logged("straight")


def test_gradient_checkpointing_gives_the_same_update(tiny_lm, tmp_path):
    plain = TextTrainer(tiny_lm, sorted_digits_reward, DATA, config(tmp_path, "plain", iterations=2))
    plain.train()
    checkpointed = TextTrainer(tiny_lm, sorted_digits_reward, DATA, config(tmp_path, "ckpt", iterations=2, gradient_checkpointing=True))
    rows = checkpointed.train()
    assert rows[-1]["start_log_ratio_max"] == 0.0
    for a, b in zip(plain.model.parameters(), checkpointed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_text_config_is_a_trainer_config_and_checks_values():
    config = TextConfig(output_dir="x", eta=0.5, epochs=3, learning_rate=2e-5, mixed_precision="bf16", adam_beta2=0.99, clip_range=0.1)
    trainer = config.trainer_settings()
    assert (trainer["output_dir"], trainer["eta"], trainer["epochs"], trainer["learning_rate"]) == ("x", 0.5, 3, 2e-5)
    assert (trainer["mixed_precision"], trainer["adam_beta2"], trainer["clip_range"]) == ("bf16", 0.99, 0.1)  # every trainer setting
    assert "eta" not in config.adapter_settings() and config.adapter_settings()["max_new_tokens"] == 64
    assert (TextConfig().learning_rate, TextConfig().output_dir) == (1e-6, "runs/text")  # the text adapter's defaults
    with pytest.raises(ValueError, match="num_generations must be an integer >= 2"):
        TextConfig(num_generations=1)
    with pytest.raises(ValueError, match="eta must be a finite number > 0"):
        TextConfig(eta=0.0)
    with pytest.raises(ValueError, match=r"^generation_kwargs repetition_penalty: the policy scores softmax\(logits / temperature\)"):
        TextConfig(generation_kwargs={"repetition_penalty": 1.2})  # refused before a model loads


def test_bf16_paths_run_on_cpu(tiny_lm, tmp_path):
    """The code paths of bf16 training (checked here on the CPU; a GPU takes the same ones):
    autocast keeps the start of every iteration exact, and bf16 weights load and train."""
    rows = TextTrainer(tiny_lm, sorted_digits_reward, DATA, config(tmp_path, "autocast", mixed_precision="bf16", epochs=2)).train()
    assert [r["start_log_ratio_max"] for r in rows] == [0.0] * 3
    assert all(r["log_ratio_max_abs"] > 0 for r in rows)
    trainer = TextTrainer(tiny_lm, sorted_digits_reward, DATA, config(tmp_path, "weights", dtype="bfloat16", learning_rate=1e-2))
    before = [p.detach().clone() for p in trainer.policy.parameters() if p.requires_grad]
    rows = trainer.train()
    after = [p for p in trainer.policy.parameters() if p.requires_grad]
    assert {p.dtype for p in after} == {torch.bfloat16}
    assert [r["start_log_ratio_max"] for r in rows] == [0.0] * 3
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "weights" / "model")
    assert reloaded.dtype == torch.bfloat16


def test_completions_reach_the_trackers_as_a_table(tiny_lm, tmp_path, wandb_offline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, iterations=1, log_completions=3, report_to=["tensorboard", "wandb"])
    TextTrainer(tiny_lm, sorted_digits_reward, DATA, cfg).train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    [run] = wandb_offline.runs()
    [row] = [h for h in run["history"] if "completions/_type" in h]
    table = json.loads((run["folder"] / "files" / row["completions/path"]).read_text())
    assert table["columns"] == ["prompt", "completion", "reward"] and row["iteration"] == 1
    assert table["data"] == [[s["prompt"], s["completion"], s["reward"]] for s in logged]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    [text] = events.Tensors("completions/text_summary")
    lines = text.tensor_proto.string_val[0].decode().splitlines()
    assert lines[0] == "| prompt | completion | reward |" and len(lines) == 2 + len(logged)
    assert [line.rstrip(" |").rsplit("| ", 1)[1] for line in lines[2:]] == [f"{s['reward']:.4g}" for s in logged]
