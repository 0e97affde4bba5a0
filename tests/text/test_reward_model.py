"""Reward models: a one-label sequence classifier with its own tokenizer, as a reward function."""

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from rebel.runs import read_metrics
from rebel.text import TextConfig, TextTrainer
from rebel.text.rewards import RewardModel, as_reward_funcs
from rebel_envs.text_tasks import char_tokenizer, sorted_digits_reward, sorting_dataset


def tiny_classifier(num_labels=1, seed=0):
    tokenizer = char_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=4,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(config).eval(), tokenizer


@pytest.fixture
def reward_model_dir(tmp_path):
    model, tokenizer = tiny_classifier()
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_reward_model_scores_each_text_as_the_classifier_alone_does(reward_model_dir):
    model, tokenizer = tiny_classifier()
    rm = RewardModel(str(reward_model_dir), batch_size=3)
    prompts, completions = ["12:", "3:", "987:", "5:"], ["12", "3<eos>", "789", ""]
    scores = rm(prompts, completions)
    expected = [model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(expected, abs=1e-5)  # padding and batching change nothing
    assert rm.__name__ == "rm"


def test_reward_models_combine_with_functions_in_the_trainer(reward_model_dir, tiny_lm, tmp_path):
    funcs = as_reward_funcs([sorted_digits_reward, str(reward_model_dir)])
    assert funcs[0] is sorted_digits_reward and isinstance(funcs[1], RewardModel)
    config = TextConfig(output_dir=str(tmp_path / "run"), iterations=1, prompts_per_iteration=4, num_generations=2, max_new_tokens=6,
                        progress=False, report_to="none", plot=False)  # fmt: skip
    TextTrainer(tiny_lm, [sorted_digits_reward, str(reward_model_dir)], sorting_dataset(20, seed=0), config).train()
    row = read_metrics(tmp_path / "run")[0]
    assert "rewards/rm" in row and "rewards/sorted_digits_reward" in row
    assert row["reward_mean"] == pytest.approx(row["rewards/rm"] + row["rewards/sorted_digits_reward"], abs=1e-5)


def test_a_reward_model_needs_one_label(tmp_path):
    model, tokenizer = tiny_classifier(num_labels=3)
    with pytest.raises(ValueError, match="a reward model must have one label"):
        RewardModel(model, tokenizer)
