"""Reward functions for text: TRL's signature, reward models, weights and checks.

A reward function is called as ``fn(prompts, completions, **columns)`` with one entry
per completion (prompts repeated for each of their completions) and every other column
of the dataset as a keyword list; it returns one float per completion. For
conversational prompts (lists of messages) a completion is ``[{"role": "assistant",
"content": text}]``, as in TRL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rebel.hf.inputs import call_reward_function, check_source, load_pretrained

RewardFunc = Callable[..., Sequence[float]]
REWARD_MODEL_EXPECTED = "a sequence-classification model folder or a hub id (org/name)"


class RewardModel:
    """A sequence-classification model with one label as a reward function.

    Args:
        model: an ``AutoModelForSequenceClassification`` object, a folder or a hub id.
        tokenizer: its own tokenizer (default: loaded from the model's source).
        batch_size: completions scored per forward pass.
        max_length: truncation length of prompt + completion.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, batch_size: int = 16, max_length: int | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = model if isinstance(model, (str, Path)) else model.config._name_or_path
        if isinstance(model, (str, Path)):
            model = load_pretrained(
                AutoModelForSequenceClassification.from_pretrained, model, "reward model", REWARD_MODEL_EXPECTED, num_labels=1
            )
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model must have one label (num_labels=1), {source} has {model.config.num_labels}")
        tokenizer = tokenizer if tokenizer is not None else source
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, "tokenizer", REWARD_MODEL_EXPECTED)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = Path(str(source)).name or "reward_model"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores

    def to(self, device: torch.device | str) -> RewardModel:
        self.model.to(device)
        return self

    def _text(self, prompt: Any, completion: Any) -> str:
        if isinstance(prompt, str):
            return prompt + (completion if isinstance(completion, str) else completion[-1]["content"])
        return self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)


def check_reward_funcs(reward_funcs: Any) -> list[Any]:
    """``reward_funcs`` (one or a list) as a list, each a callable, a reward-model object, or
    a folder or hub id that exists or could (:func:`~rebel.hf.inputs.check_source`); nothing loads."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError("reward_funcs is empty: give at least one reward function or reward model")
    for k, fn in enumerate(funcs):
        if isinstance(fn, (str, Path)):
            check_source(fn, "reward model", REWARD_MODEL_EXPECTED)
        elif not callable(fn):
            raise TypeError(f"reward_funcs[{k}] is a {type(fn).__name__}; expected a callable, a reward model, a folder or a hub id")
    return funcs


def as_reward_funcs(reward_funcs: Any, processing_classes: Sequence[Any] | None = None) -> list[RewardFunc]:
    """Normalise ``reward_funcs`` (one or a list of callables, reward-model objects,
    folders or hub ids) into callables; ``processing_classes[k]`` is the tokenizer of
    the k-th entry when it is a reward model."""
    out: list[RewardFunc] = []
    for k, fn in enumerate(check_reward_funcs(reward_funcs)):
        tokenizer = processing_classes[k] if processing_classes is not None and k < len(processing_classes) else None
        out.append(RewardModel(fn, tokenizer) if isinstance(fn, (str, Path)) or _is_sequence_classifier(fn) else fn)
    return out


def call_reward(fn: RewardFunc, prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]]) -> Tensor:
    """``fn``'s rewards as a float64 tensor, one real number per completion; errors name the function."""
    return call_reward_function(fn, len(completions), "completion", prompts=prompts, completions=completions, **columns)


def _is_sequence_classifier(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and type(obj).__name__.endswith("ForSequenceClassification")
