"""Fixtures of the text adapter's tests: tiny causal LMs built from configs, no network."""

import importlib.util

import pytest

if any(importlib.util.find_spec(name) is None for name in ("transformers", "peft", "datasets")):
    collect_ignore_glob = ["test_*.py"]  # the text extra is not installed


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """Folder of a random two-layer GPT-2 (dropout on in its config) and a character tokenizer."""
    from rebel_envs.text_tasks import char_tokenizer, tiny_gpt2

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = char_tokenizer()
    model = tiny_gpt2(tokenizer, n_layer=2, n_embd=32, seed=0)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def sorting_lm(tmp_path_factory):
    """Folder of the embedded task's tiny GPT-2 after its (shortened) supervised warm-up."""
    import torch

    from rebel_envs.text_tasks import SortingTaskConfig, make_sorting_model

    path = tmp_path_factory.mktemp("sorting_lm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_sorting_model(SortingTaskConfig(pretrain_steps=100), save_to=path)
    finally:
        torch.set_num_threads(threads)
    return str(path)
