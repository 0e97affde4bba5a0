"""Prompt datasets: a list of strings, a list of records, or a ``datasets.Dataset``.

Each record has a ``prompt``: text, or chat messages (a list of ``{"role", "content"}``
dicts, rendered with the tokenizer's chat template). Its other fields reach the reward
functions as keyword lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PromptDataset:
    """Uniform, indexable view of the prompts a :class:`~rebel.text.TextSampler` draws."""

    def __init__(self, data: Any, name: str = "train_dataset") -> None:
        if isinstance(data, PromptDataset):
            data = data.data
        if isinstance(data, str) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise TypeError(f"{name} must be a list of prompts, a list of records or a datasets.Dataset, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError(f"{name} is empty")
        columns = getattr(data, "column_names", None)
        if columns is not None and "prompt" not in columns:
            raise ValueError(f"the dataset needs a 'prompt' column; it has {columns}")
        first = data[0]
        if not isinstance(first, (str, dict)) and not is_conversation(first):
            raise TypeError(f"{name} entries must be prompt strings or records with a 'prompt', got {type(first).__name__}")
        if isinstance(first, dict) and "prompt" not in first:
            raise ValueError(f"the records need a 'prompt' field; the first has {sorted(first)}")
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[int(index)]
        return dict(item) if isinstance(item, dict) else {"prompt": item}


def is_conversation(prompt: Any) -> bool:
    """A prompt given as chat messages (a list of dicts with a ``role``)."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and isinstance(prompt[0], dict)
        and "role" in prompt[0]
    )


def render_prompt(prompt: Any, tokenizer: Any) -> str:
    """The text the model continues: the prompt itself, or the chat template applied to
    messages with the generation prompt appended."""
    if isinstance(prompt, str):
        return prompt
    if is_conversation(prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("a prompt is a list of chat messages but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
