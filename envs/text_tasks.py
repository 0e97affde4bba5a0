"""Text tasks with verifiable rewards, and a tiny causal LM to learn them on a CPU.

The default task of ``rebel train text``: **sort the digits**. A prompt is a string of
digits and a colon (``"3141:"``); the right completion is the digits in ascending order
followed by EOS (``"1134"``). The reward is the share of positions that match the sorted
digits (1.0 for an exact answer).

The starting policy is a two-layer GPT-2 with a character-level tokenizer (built in code,
saved and loaded with ``save_pretrained``), fine-tuned for a few seconds by supervised
learning on *noisy* demonstrations: a share ``noise`` of them is a random permutation of
the digits instead of the sorted one. It learns the format and sorts only part of the
time, a non-trivial policy that REBEL then improves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rebel.config import check_choice, option
from rebel.console import quiet_saving, stage

CHARS = "0123456789:"
PAD, EOS = "<pad>", "<eos>"


@dataclass
class SortingTaskConfig:
    """The embedded digit-sorting task and its tiny starting model."""

    min_digits: int = option(3, "fewest digits in a prompt")
    max_digits: int = option(6, "most digits in a prompt")
    num_prompts: int = option(2000, "training prompts")
    task_seed: int = option(0, "seed of the prompts, the model's initialisation and its supervised warm-up")
    pretrain_steps: int = option(150, "supervised warm-up steps of the tiny model")
    pretrain_noise: float = option(0.5, "share of warm-up demonstrations that are a random permutation instead of sorted")
    n_layer: int = option(2, "transformer blocks of the tiny model")
    n_embd: int = option(64, "width of the tiny model")
    architecture: str = option("gpt2", "gpt2 | llama (4 heads of n_embd/4; vLLM's CPU backend needs n_embd >= 128)")

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits} and {self.max_digits}")
        if not 0.0 <= self.pretrain_noise <= 1.0:
            raise ValueError(f"pretrain_noise must be in [0, 1], got {self.pretrain_noise}")
        check_choice("architecture", self.architecture, ("gpt2", "llama"))


def char_tokenizer() -> Any:
    """A character-level tokenizer over digits and ``:`` with ``<pad>`` and ``<eos>``,
    built with the ``tokenizers`` library (``save_pretrained`` / ``AutoTokenizer`` round trip)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS)


def tiny_gpt2(tokenizer: Any, n_layer: int = 2, n_embd: int = 64, n_positions: int = 32, seed: int = 0) -> Any:
    """A randomly initialised GPT-2 sized for the toy tasks (about 100k parameters)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def tiny_llama(tokenizer: Any, n_layer: int = 2, n_embd: int = 128, n_positions: int = 32, seed: int = 0) -> Any:
    """A randomly initialised Llama with 4 heads of ``n_embd / 4`` (vLLM's CPU backend takes
    head sizes 32, 64, 80, ...: ``n_embd=128`` is the smallest it runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=n_embd,
        intermediate_size=2 * n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=n_positions,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def distorting_generation_config(tokenizer: Any) -> dict[str, Any]:
    """``generation_config`` fields that would each change the distribution ``generate`` (or
    an engine reading ``generation_config.json``) samples from: penalties, banned and
    suppressed digits, truncation and another temperature. A model saved with them checks
    that a sampler applies none."""
    digit = tokenizer.convert_tokens_to_ids
    return {"do_sample": True, "temperature": 5.0, "top_k": 3, "repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "min_new_tokens": 2,
            "suppress_tokens": [digit("3")], "bad_words_ids": [[digit("4")]], "begin_suppress_tokens": [digit("5")], "min_p": 0.5}  # fmt: skip


def sorting_dataset(n: int, min_digits: int = 3, max_digits: int = 6, seed: int = 0) -> list[dict[str, str]]:
    """``n`` records ``{"prompt": "3141:", "answer": "1134"}``."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits)))
        records.append({"prompt": digits + ":", "answer": "".join(sorted(digits))})
    return records


SORTING_OPTIMUM = {"reward_mean": 1.0}  # every completion exactly sorted (penalties only subtract): drawn in curves.png


def sorted_digits_reward(prompts: list[str], completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """Share of positions where the completion matches the sorted digits (length
    mismatches count as wrong positions); 1.0 for an exact answer."""
    return [sum(a == b for a, b in zip(c, t)) / max(len(c), len(t), 1) for c, t in zip(completions, answer)]


def pretrain_sorting(
    model: Any, tokenizer: Any, config: SortingTaskConfig, batch_size: int = 64, learning_rate: float = 3e-3, progress: bool = False
) -> list[float]:
    """Supervised warm-up on noisy demonstrations (see the module docstring; ``progress``: a bar
    and a timing line); returns the losses."""
    rng = random.Random(config.task_seed + 1)
    gen = torch.Generator().manual_seed(config.task_seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    losses: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a ~100k-parameter model: more threads only add overhead
    try:
        for _ in stage(config.pretrain_steps, "warm-up: supervised sorting", progress):
            losses.append(_supervised_step(model, tokenizer, optimizer, config, rng, gen, batch_size))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def _supervised_step(
    model: Any, tokenizer: Any, optimizer: Any, config: SortingTaskConfig, rng: random.Random, gen: torch.Generator, batch_size: int
) -> float:
    """One AdamW step on a batch of (noisy) demonstrations; returns the loss."""
    pairs = []
    for record in sorting_dataset(batch_size, config.min_digits, config.max_digits, seed=rng.randrange(2**31)):
        target = record["answer"]
        if rng.random() < config.pretrain_noise:
            target = "".join(rng.sample(target, len(target)))
        pairs.append((record["prompt"], target))
    ids, labels = _supervised_batch(tokenizer, pairs)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))  # dropout
        logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def make_sorting_model(config: SortingTaskConfig, save_to: str | Path | None = None, progress: bool = False) -> tuple[Any, Any]:
    """The tiny GPT-2 after its supervised warm-up (``progress``: its bar), and its tokenizer
    (both written to ``save_to`` with ``save_pretrained`` when given)."""
    tokenizer = char_tokenizer()
    build = tiny_llama if config.architecture == "llama" else tiny_gpt2
    model = build(tokenizer, config.n_layer, config.n_embd, n_positions=2 * config.max_digits + 16, seed=config.task_seed)
    pretrain_sorting(model, tokenizer, config, progress=progress)
    if save_to is not None:
        with quiet_saving():
            model.save_pretrained(str(save_to))
        tokenizer.save_pretrained(str(save_to))
    return model, tokenizer


def _supervised_batch(tokenizer: Any, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + target + EOS`` ids and labels on the target and EOS only."""
    rows, label_rows = [], []
    for prompt, target in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + t)
        label_rows.append([-100] * len(p) + t)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    return ids, labels


@torch.no_grad()
def evaluate_sorting(
    model: Any, tokenizer: Any, records: list[dict[str, str]], seed: int = 0, temperature: float = 1.0
) -> dict[str, float]:
    """Mean reward and exact-match rate of completions sampled from ``model`` (the policy's
    expected reward, estimated on ``records``; the sampling does not touch the global RNG)."""
    tokenizer.padding_side = "left"
    enc = tokenizer([r["prompt"] for r in records], return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max(len(r["answer"]) for r in records) + 2,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model.train(was_training)
    completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    answers = [r["answer"] for r in records]
    rewards = sorted_digits_reward([], completions, answers)
    return {"reward": sum(rewards) / len(rewards), "exact": sum(c == a for c, a in zip(completions, answers)) / len(answers)}
