"""Multi-turn text tasks with verifiable rewards, and a tiny chat model to learn them on a CPU.

Registry (``DIALOG_TASKS``, read by ``rebel train text --env NAME``):

* ``"guess-number"``: guess a hidden number; a judge answers ``higher`` / ``lower`` /
  ``correct`` and lies (flips higher/lower) with probability ``lie_prob``.
* ``"calculator"``: an arithmetic question; the agent calls ``calc(12*7)``, the tool
  answers ``84``, and ``answer: 84`` ends the episode.

Each entry is a :class:`DialogTask`: ``make_env()`` builds one environment (a
``rebel.text.env.TextEnv``), ``make_model()`` the warmed-up tiny model and its tokenizer,
``dataset`` the opening rows (or None), ``text_config`` suggested TextConfig overrides,
``optimum`` the best expected return when known.
"""

from __future__ import annotations

import ast
import copy
import functools
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rebel.config import check_choice, option
from rebel.console import quiet_saving
from rebel.text.env import EnvReply, Message, TextEnv

from .text_tasks import tiny_gpt2, tiny_llama

# ------------------------------------------------------------------ guess the number


@dataclass
class GuessNumberEnv(TextEnv):
    """Guess a number in ``1..high`` drawn at reset. Each turn the judge answers
    ``higher``, ``lower`` or ``correct``; with probability ``lie_prob`` (drawn at every
    step) a ``higher`` / ``lower`` is flipped (``correct`` is always true). A message that
    is not a number in range is answered ``invalid`` and costs its turn. Finding the number
    at turn ``t`` is worth ``1 - turn_cost * (t - 1)``; after ``max_turns`` turns without it
    the episode is truncated with reward 0."""

    high: int = 8
    lie_prob: float = 0.1
    max_turns: int = 6
    turn_cost: float = 0.15
    target: int = 0
    turns: int = 0

    def reset(self, rng: random.Random, row: Mapping[str, Any] | None = None) -> list[Message]:
        self.target = rng.randint(1, self.high) if row is None or "target" not in row else int(row["target"])
        self.turns = 0
        return [{"role": "user", "content": f"guess 1-{self.high}"}]

    def step(self, message: str, rng: random.Random) -> EnvReply:
        lie = rng.random() < self.lie_prob  # drawn at every step: one number per step, whatever the message
        self.turns += 1
        guess = int(message.strip()) if message.strip().isdigit() else None
        if guess == self.target:
            return EnvReply([], reward=1.0 - self.turn_cost * (self.turns - 1), terminated=True)
        if guess is None or not 1 <= guess <= self.high:
            answer = "invalid"
        else:
            answer = "higher" if (guess < self.target) != lie else "lower"
        return EnvReply([{"role": "user", "content": answer}], truncated=self.turns >= self.max_turns)


def binary_search_guess(env: GuessNumberEnv, history: list[tuple[int, str]]) -> int:
    """The midpoint of the numbers the judge's answers so far allow (the whole range again
    when a lie made them contradict each other)."""
    low, high = 1, env.high
    for guess, answer in history:
        if answer == "higher":
            low = max(low, guess + 1)
        elif answer == "lower":
            high = min(high, guess - 1)
        if low > high:
            low, high = 1, env.high
    return (low + high) // 2


# ------------------------------------------------------------------ calculator tool

CALL = re.compile(r"calc\((.*)\)")
ANSWER = re.compile(r"answer: ?(-?\d+)")
OPERANDS = (2, 9)  # the questions' operands: one digit, so that the tiny model learns to copy them in seconds
OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def calculate(expression: str) -> int | None:
    """The value of an integer expression of ``+ - *`` and parentheses (at most 32
    characters), or None when it is anything else."""
    if len(expression) > 32:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None

    def value(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = value(node.operand)
            return None if inner is None else -inner
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            return None if left is None or right is None else OPERATORS[type(node.op)](left, right)
        return None

    return value(tree)


@dataclass
class CalculatorEnv(TextEnv):
    """Answer an arithmetic question (``"7*8=?"``, drawn at reset or a row's
    ``question``) using a calculator: ``calc(7*8)`` is answered with the value
    (``56``), a malformed message with ``error``; ``answer: 56`` ends the episode with
    reward 1 if right, 0 if wrong. After ``max_turns`` turns without an answer the episode is
    truncated with reward 0. The tool itself is deterministic; the randomness is the
    question."""

    max_turns: int = 4
    low: int = OPERANDS[0]
    high: int = OPERANDS[1]
    question: str = ""
    turns: int = 0

    def reset(self, rng: random.Random, row: Mapping[str, Any] | None = None) -> list[Message]:
        self.question = str(row["question"]) if row is not None else random_question(rng, self.low, self.high)
        self.turns = 0
        return [{"role": "user", "content": f"{self.question}=?"}]

    def step(self, message: str, rng: random.Random) -> EnvReply:
        self.turns += 1
        text = message.strip()
        if (answer := ANSWER.fullmatch(text)) is not None:
            return EnvReply([], reward=float(int(answer.group(1)) == calculate(self.question)), terminated=True)
        call = CALL.fullmatch(text)
        result = calculate(call.group(1)) if call is not None else None
        reply = "error" if result is None else str(result)
        return EnvReply([{"role": "user", "content": reply}], truncated=self.turns >= self.max_turns)


def random_question(rng: random.Random, low: int = OPERANDS[0], high: int = OPERANDS[1]) -> str:
    """``"a+b"`` or ``"a*b"`` with ``a, b`` uniform in ``low..high``."""
    a, b = rng.randint(low, high), rng.randint(low, high)
    return f"{a}{rng.choice('+*')}{b}"


def calculator_dataset(n: int, seed: int = 0, low: int = OPERANDS[0], high: int = OPERANDS[1]) -> list[dict[str, str]]:
    """``n`` opening rows ``{"question": "7*8"}``."""
    rng = random.Random(seed)
    return [{"question": random_question(rng, low, high)} for _ in range(n)]


# ------------------------------------------------------------------ tiny chat model

CHAT_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*()=?:"
PAD, EOS, USER, AGENT = "<pad>", "<eos>", "<usr>", "<bot>"
# a turn is its role's token, its text and EOS: the agent's turn ends where generation stops
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<bot>' if m['role'] == 'assistant' else '<usr>' }}{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bot>{% endif %}"
)


def chat_tokenizer() -> Any:
    """A character-level tokenizer over lower-case letters, digits and ``+-*()=?:``, with
    ``<pad>``, ``<eos>`` (also the end of every turn) and the role tokens ``<usr>`` /
    ``<bot>``, and :data:`CHAT_TEMPLATE` as its chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, USER, AGENT]
    vocab = {token: i for i, token in enumerate(specials + list(CHAT_CHARS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, normalized=False) for token in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, additional_special_tokens=[USER, AGENT])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def dialog_ids(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[int]]:
    """The chat-templated ids of a dialog and labels on the agent's tokens (its text and
    EOS) only, -100 elsewhere: the supervised target of the warm-up."""
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        role = tokenizer.convert_tokens_to_ids(AGENT if m["role"] == "assistant" else USER)
        text = tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += [role, *text]
        labels += [-100, *(text if m["role"] == "assistant" else [-100] * len(text))]
    return ids, labels


@dataclass
class DialogModelConfig:
    """The tiny starting model of an embedded dialog task and its supervised warm-up."""

    task_seed: int = option(0, "seed of the model's initialisation and its warm-up transcripts")
    pretrain_steps: int = option(300, "supervised warm-up steps")
    pretrain_batch_size: int = option(16, "transcripts per warm-up step")
    pretrain_lr: float = option(1e-2, "AdamW learning rate of the warm-up")
    pretrain_good: float = option(0.5, "share of warm-up transcripts played well (the rest play poorly)")
    n_layer: int = option(2, "transformer blocks")
    n_embd: int = option(64, "width")
    architecture: str = option("gpt2", "gpt2 | llama (4 heads of n_embd/4)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.pretrain_good <= 1.0:
            raise ValueError(f"pretrain_good must be in [0, 1], got {self.pretrain_good}")
        check_choice("architecture", self.architecture, ("gpt2", "llama"))


Player = Callable[[TextEnv, list[Message], random.Random], str]


def play(env: TextEnv, player: Player, rng: random.Random, row: Mapping[str, Any] | None = None) -> tuple[list[Message], float]:
    """One episode of ``player`` (``(env, messages so far, rng) -> message``) against
    ``env``: the transcript and the return."""
    messages = list(env.reset(rng, row))
    total = 0.0
    while True:
        text = player(env, messages, rng)
        messages.append({"role": "assistant", "content": text})
        reply = env.step(text, rng)
        messages += reply.messages
        total += reply.reward
        if reply.terminated or reply.truncated:
            return messages, total


def guess_player(good: bool) -> Player:
    """Binary search (good) or a uniform guess that ignores the judge (poor)."""

    def player(env: TextEnv, messages: list[Message], rng: random.Random) -> str:
        assert isinstance(env, GuessNumberEnv)
        if not good:
            return str(rng.randint(1, env.high))
        agent = [m["content"] for m in messages if m["role"] == "assistant"]
        judge = [m["content"] for m in messages[1:] if m["role"] != "assistant"]
        return str(binary_search_guess(env, [(int(g), a) for g, a in zip(agent, judge) if g.isdigit()]))

    return player


def calculator_player(style: str) -> Player:
    """``"tool"``: ``calc(question)`` then ``answer: <result>``; ``"guess"``: an answer of
    the right size without the tool (usually wrong); ``"malformed"``: a call without
    parentheses first, then as ``"tool"``."""

    def player(env: TextEnv, messages: list[Message], rng: random.Random) -> str:
        assert isinstance(env, CalculatorEnv)
        question, last = env.question, messages[-1]["content"]
        if style == "guess":
            exact = calculate(question) or 0
            return f"answer: {rng.randint(exact // 2, 2 * exact)}"
        if env.turns == 0 and style == "malformed":
            return f"calc {question}"
        if last.lstrip("-").isdigit():
            return f"answer: {last}"
        return f"calc({question})"

    return player


def warmup_transcript(name: str, config: DialogModelConfig, rng: random.Random) -> list[Message]:
    """One warm-up dialog of task ``name``: good play with probability ``pretrain_good``."""
    env = DIALOG_TASKS[name].make_env()
    good = rng.random() < config.pretrain_good
    if name == "guess-number":
        player = guess_player(good)
    else:
        player = calculator_player("tool" if good else rng.choice(["guess", "guess", "malformed"]))
    return play(env, player, rng)[0]


@functools.lru_cache(maxsize=4)
def _warmed_up(name: str, config_values: tuple) -> tuple[Any, Any]:
    config = DialogModelConfig(*config_values)
    tokenizer = chat_tokenizer()
    build = tiny_llama if config.architecture == "llama" else tiny_gpt2
    model = build(tokenizer, config.n_layer, config.n_embd, n_positions=DIALOG_TASKS[name].max_length, seed=config.task_seed)
    rng = random.Random(config.task_seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a ~100k-parameter model: more threads only add overhead
    try:
        with torch.random.fork_rng():
            torch.manual_seed(config.task_seed + 1)  # dropout
            for _ in range(config.pretrain_steps):
                rows = [dialog_ids(tokenizer, warmup_transcript(name, config, rng)) for _ in range(config.pretrain_batch_size)]
                width = max(len(ids) for ids, _ in rows)
                ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r, _ in rows])
                labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
                logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, tokenizer


def make_dialog_model(name: str, config: DialogModelConfig | None = None, save_to: str | Path | None = None) -> tuple[Any, Any]:
    """The tiny model of task ``name`` after its supervised warm-up on a mix of good and
    poor transcripts, and its tokenizer (written to ``save_to`` when given). Warm-ups are
    cached in-process: a second call with the same settings returns a fresh copy at once."""
    check_choice("task", name, tuple(DIALOG_TASKS))
    model, tokenizer = copy.deepcopy(_warmed_up(name, astuple(config or DIALOG_TASKS[name].model_config)))
    if save_to is not None:
        with quiet_saving():  # no "Writing model shards" bar
            model.save_pretrained(str(save_to))
        tokenizer.save_pretrained(str(save_to))
    return model, tokenizer


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class DialogTask:
    """An embedded dialog task: how to build its environment and its tiny model.

    Attributes:
        make_env: a fresh environment (one per concurrent dialog).
        dataset: opening rows passed to ``reset`` (None: the environment draws its openings).
        text_config: suggested TextConfig overrides for REBEL on the tiny model.
        optimum: the best expected return, when known.
        max_length: the longest dialog in tokens (the tiny model's positions).
        model_config: the tiny model's default settings.
    """

    make_env: Callable[[], TextEnv]
    dataset: list[dict[str, Any]] | None = None
    text_config: dict[str, Any] = field(default_factory=dict)
    optimum: float | None = None
    max_length: int = 256
    model_config: DialogModelConfig = field(default_factory=DialogModelConfig)

    def make_model(self, config: DialogModelConfig | None = None, save_to: str | Path | None = None) -> tuple[Any, Any]:
        """The warmed-up tiny model and its tokenizer (:func:`make_dialog_model`)."""
        name = next(key for key, task in DIALOG_TASKS.items() if task is self)
        return make_dialog_model(name, config, save_to)


DIALOG_TASKS: dict[str, DialogTask] = {
    "guess-number": DialogTask(
        make_env=GuessNumberEnv,
        text_config={"max_new_tokens": 4, "num_generations": 4, "prompts_per_iteration": 8, "learning_rate": 1e-3},
        optimum=None,  # with a lying judge the best policy is not known in closed form; no return exceeds 1
        max_length=128,
        model_config=DialogModelConfig(pretrain_steps=300, pretrain_lr=3e-3, pretrain_good=0.5),
    ),
    "calculator": DialogTask(
        make_env=CalculatorEnv,
        dataset=calculator_dataset(2000),
        text_config={"max_new_tokens": 16, "num_generations": 4, "prompts_per_iteration": 8, "learning_rate": 1e-3},
        optimum=1.0,
        max_length=128,
        model_config=DialogModelConfig(pretrain_steps=400, pretrain_lr=1e-2, pretrain_good=0.4),
    ),
}
