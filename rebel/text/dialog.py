"""Dialogs as trajectories: the agent's turns are the actions, the environment's turns are dynamics.

A dialog's token sequence is built once, as it is sampled: the chat-templated opening
messages, then for each turn the token ids the agent actually sampled (ending at its EOS /
end-of-turn token) followed by the chat-template delta that renders the environment's reply
and the next generation prompt. The policy scores exactly these ids, and the mask covers the
agent's tokens only, so the dialog's log-probability ratio is the sum over the agent's tokens:
the environment's transitions are the same under pi_theta and pi_t and cancel.

Two REBEL forms (:class:`DialogSampler`, ``form``):

* ``"whole"``: ``n`` dialogs per opening (one group); reward = the dialog's return.
* ``"per_turn"``: Monte-Carlo resets. One dialog per opening is sampled; at a branching turn
  ``k`` (one drawn uniformly, or all turns) ``n`` agent turns are drawn from pi_t from the
  identical prefix and the environment's restored state, each continued ``m`` times with pi_t
  to the end; Q of a branch = the mean of its ``m`` returns-to-go. A group is the ``n``
  branches of one (dialog, turn); the log-ratio covers the branched turn's tokens only.

Environment randomness: every call of an environment gets ``random.Random(f"{seed}:{turn}:{rollout}")``,
``seed`` the dialog's, ``turn`` the agent turn it answers (``"reset"`` for the opening) and
``rollout`` the rollout index (0: the sampled dialog, 1..m: the branches' continuations). The
branches of one rollout index therefore share the environment's random numbers (common random
numbers), and different rollout indices are independent.

Policy randomness follows the same rule in the continuations: a branch point draws one base
seed from the sampler's generator, and every continuation turn of rollout ``j`` samples with
a row seed hashed from ``(base, j, turn)`` (the backend's ``row_seeds``), the same for every
branch. Branches whose dialogs agree after the branch draw the same tokens; the branched
turns themselves are independent draws.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from rebel.batch import RolloutBatch
from rebel.config import check_choice, check_group_size, check_int
from rebel.policy import Policy
from rebel.text.env import Message, TextEnv
from rebel.text.generation import GenerationBackend, SamplingSettings, step_seed
from rebel.text.policy import CausalLMPolicy
from rebel.text.sampler import PromptCursor, completion_mask, sampler_backend

FORMS = ("whole", "per_turn")
BRANCH_TURNS = ("uniform", "all")
EnvFactory = Callable[[], TextEnv]


@dataclass
class Dialog:
    """One dialog as it is sampled (token ids after the opening, the agent's flags, rewards)."""

    env: TextEnv
    seed: str
    opening: list[int]
    messages: list[Message]
    rollout: int = 0
    tokens: list[int] = field(default_factory=list)  # after the opening
    agent: list[bool] = field(default_factory=list)  # per token of ``tokens``: sampled by the agent
    turn_starts: list[int] = field(default_factory=list)  # where each agent turn starts in ``tokens``
    rewards: list[float] = field(default_factory=list)  # per agent turn (0 for a turn cut by the token cap)
    snapshots: list[Any] = field(default_factory=list)  # env state at each agent turn's start (kept on request)
    message_counts: list[int] = field(default_factory=list)  # len(messages) at each agent turn's start
    policy_seed: int | None = None  # seeds the policy's noise turn by turn (None: the runner's generator)
    terminated: bool = False
    truncated: bool = False

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    @property
    def turns(self) -> int:
        return len(self.turn_starts)

    @property
    def length(self) -> int:
        """Tokens of the whole sequence, the opening included."""
        return len(self.opening) + len(self.tokens)

    def return_from(self, turn: int = 0) -> float:
        """The sum of the rewards of the agent turns ``turn, turn + 1, ...``."""
        return float(sum(self.rewards[turn:]))

    def record(self) -> dict[str, Any]:
        """A readable record of the dialog (for the transcript)."""
        return {
            "messages": self.messages,
            "return": self.return_from(0),
            "turns": self.turns,
            "tokens": self.length,
            "terminated": self.terminated,
            "truncated": self.truncated,
        }


def env_rng(seed: str, turn: int | str, rollout: int) -> random.Random:
    """The random generator of one environment call (see the module's docstring)."""
    return random.Random(f"{seed}:{turn}:{rollout}")


def render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to ``messages`` (as text)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("dialogs need a tokenizer with a chat template (tokenizer.chat_template is None)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reply_ids(tokenizer: Any, history: list[Message], agent: Message, replies: list[Message], sampled_end: str | None) -> list[int]:
    """The tokens that follow the agent's sampled turn: the rest of the template's rendering of
    the agent's message (what follows its end token, e.g. a newline), then the environment's
    ``replies`` and the next generation prompt, as the chat template renders them.

    ``sampled_end``: the text of the end token the agent sampled (None if its turn was cut);
    the template's end of the agent message is not repeated after it.
    """
    head = render(tokenizer, history, True)
    own = render(tokenizer, [*history, agent], False)
    full = render(tokenizer, [*history, agent, *replies], True)
    if not (own.startswith(head) and full.startswith(own)):
        raise ValueError("the chat template does not render a dialog as a growing text (each turn appended to the previous ones)")
    tail = own[len(head) :]  # the agent's message as the template renders it
    content = agent["content"].strip()
    at = tail.find(content) if content else 0
    suffix = tail[at + len(content) :] if at >= 0 else ""
    if sampled_end and suffix.startswith(sampled_end):
        suffix = suffix[len(sampled_end) :]
    return encode(tokenizer, suffix + full[len(own) :])


@dataclass(frozen=True)
class DialogLimits:
    """Caps of a dialog: tokens of the whole sequence (opening included), agent turns, and
    tokens of one agent turn. Hitting the first two truncates the dialog (not terminated)."""

    max_tokens: int
    max_turns: int
    max_turn_tokens: int


class DialogRunner:
    """Runs many dialogs at once: each round, the active dialogs' current sequences are
    left-padded into one batch and the backend samples the agent's next turns."""

    def __init__(self, policy: CausalLMPolicy, backend: GenerationBackend, settings: SamplingSettings, limits: DialogLimits) -> None:
        self.policy, self.backend, self.settings, self.limits = policy, backend, settings, limits
        self.tokenizer = policy.tokenizer
        self.generated_tokens = 0

    def open(self, env: TextEnv, seed: str, row: Mapping[str, Any] | None, keep_snapshots: bool) -> Dialog:
        """Reset ``env`` and render its opening messages."""
        messages = list(env.reset(env_rng(seed, "reset", 0), row))
        opening = encode(self.tokenizer, render(self.tokenizer, messages, True))
        dialog = Dialog(env=env, seed=seed, opening=opening, messages=messages)
        if dialog.length >= self.limits.max_tokens:
            dialog.truncated = True
        self._mark_turn_start(dialog, keep_snapshots)
        return dialog

    def sample_turns(
        self, prefixes: list[list[int]], room: list[int], generator: torch.Generator, row_seeds: list[int] | None = None
    ) -> list[list[int]]:
        """One agent turn for each prefix, at most ``min(max_turn_tokens, room[k])`` tokens (its
        room: the tokens left before the dialog's cap, so that no sequence outgrows the model).
        Prefixes with the same limit share a generation call (usually all of them: only
        dialogs near the cap have less room than a turn). With ``row_seeds``, prefix ``k``'s
        noise comes from ``row_seeds[k]`` only (the backend's ``row_seeds``)."""
        limit = [max(1, min(self.limits.max_turn_tokens, r)) for r in room]
        turns: list[list[int]] = [[] for _ in prefixes]
        for new in sorted(set(limit), reverse=True):
            index = [k for k, v in enumerate(limit) if v == new]
            seeds = None if row_seeds is None else [row_seeds[k] for k in index]
            for k, ids in zip(index, self._generate([prefixes[k] for k in index], new, generator, seeds)):
                turns[k] = ids
        return turns

    def _generate(self, prefixes: list[list[int]], new: int, generator: torch.Generator, row_seeds: list[int] | None) -> list[list[int]]:
        """Sampled turns of at most ``new`` tokens (up to the first EOS) of the left-padded prefixes."""
        device = next(self.policy.parameters()).device
        width = max(len(p) for p in prefixes)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
        seeded = {} if row_seeds is None else {"row_seeds": row_seeds}  # a backend without row seeds serves unseeded dialogs
        out = self.backend.generate(self.policy, ids, mask, replace(self.settings, max_new_tokens=new), generator, **seeded)
        lengths = completion_mask(out, self.settings.eos_token_ids).sum(1).tolist()
        self.generated_tokens += int(sum(lengths))
        return [row[:n] for row, n in zip(out.tolist(), lengths)]

    def run(self, dialogs: Sequence[Dialog], generator: torch.Generator, keep_snapshots: bool = False) -> None:
        """Advance every dialog until it terminates or is truncated. A dialog with a
        ``policy_seed`` samples turn ``t`` with the row seed ``step_seed(policy_seed, t)``; when
        some have one, the others draw theirs from ``generator``; when none has, ``generator``
        drives the backend as usual."""
        while active := [d for d in dialogs if not d.done]:
            seeds = None
            if any(d.policy_seed is not None for d in active):
                seeds = [int(torch.randint(0, 2**62, (1,), generator=generator)) if d.policy_seed is None
                         else step_seed(d.policy_seed, d.turns) for d in active]  # fmt: skip
            turns = self.sample_turns(
                [d.opening + d.tokens for d in active], [self.limits.max_tokens - d.length for d in active], generator, seeds
            )
            for dialog, ids in zip(active, turns):
                self.take_turn(dialog, ids, keep_snapshots)

    def take_turn(self, dialog: Dialog, ids: list[int], keep_snapshots: bool = False) -> None:
        """Append the agent's turn ``ids``, let the environment answer, append its reply's tokens."""
        turn = dialog.turns
        dialog.turn_starts.append(len(dialog.tokens))
        dialog.tokens += ids
        dialog.agent += [True] * len(ids)
        ended = bool(ids) and ids[-1] in self.settings.eos_token_ids
        if not ended and dialog.length >= self.limits.max_tokens:  # cut inside the turn: the env never sees it
            dialog.rewards.append(0.0)
            dialog.truncated = True
            return
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        reply = dialog.env.step(text, env_rng(dialog.seed, turn, dialog.rollout))
        agent = {"role": "assistant", "content": text}
        history = dialog.messages
        dialog.messages = [*history, agent, *reply.messages]
        dialog.rewards.append(float(reply.reward))
        if reply.terminated:
            dialog.terminated = True
            return
        if reply.truncated or dialog.turns >= self.limits.max_turns:
            dialog.truncated = True
            return
        end = self.tokenizer.decode(ids[-1:]) if ended else None
        delta = reply_ids(self.tokenizer, history, agent, list(reply.messages), end)
        if dialog.length + len(delta) >= self.limits.max_tokens:  # no room for the agent's next turn
            dialog.truncated = True
            return
        dialog.tokens += delta
        dialog.agent += [False] * len(delta)
        self._mark_turn_start(dialog, keep_snapshots)

    @staticmethod
    def _mark_turn_start(dialog: Dialog, keep_snapshots: bool) -> None:
        dialog.message_counts.append(len(dialog.messages))
        if keep_snapshots and not dialog.done:
            dialog.snapshots.append(dialog.env.snapshot())


def branch(dialog: Dialog, turn: int, env: TextEnv, rollout: int) -> Dialog:
    """A new dialog that holds ``dialog``'s prefix before agent turn ``turn`` (its tokens,
    messages and rewards) and ``env`` restored to the state ``dialog``'s environment had there."""
    start = dialog.turn_starts[turn]
    env.restore(dialog.snapshots[turn])
    return Dialog(
        env=env,
        seed=dialog.seed,
        opening=list(dialog.opening),
        messages=list(dialog.messages[: dialog.message_counts[turn]]),
        rollout=rollout,
        tokens=dialog.tokens[:start],
        agent=dialog.agent[:start],
        turn_starts=dialog.turn_starts[:turn],
        rewards=dialog.rewards[:turn],
        message_counts=dialog.message_counts[: turn + 1],
    )


def pack(prompts: list[list[int]], completions: list[list[int]], flags: list[list[bool]], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """``input_ids``, ``attention_mask`` ``[B, P + T]`` (prompts left-padded to P, the rest
    right-padded to T) and the ``[B, T]`` mask of the scored tokens: the policy's layout."""
    p = max(len(x) for x in prompts)
    t = max(1, max(len(x) for x in completions))
    ids, attention, mask = [], [], []
    for prompt, rest, flag in zip(prompts, completions, flags):
        left, right = p - len(prompt), t - len(rest)
        ids.append([pad] * left + prompt + rest + [pad] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(rest)) + [0] * right)
        mask.append(list(flag) + [False] * right)
    return torch.tensor(ids), torch.tensor(attention), torch.tensor(mask, dtype=torch.bool)


class DialogSampler(PromptCursor):
    """Samples dialogs with a :class:`~rebel.text.env.TextEnv` and scores them (both REBEL forms,
    see the module's docstring).

    Args:
        env: a callable returning a new environment (one per concurrent dialog).
        dataset: opening rows passed to ``env.reset`` (a sequence of mappings or a
            ``datasets.Dataset``); None: the environment generates its openings from its rng.
        form: ``"whole"`` or ``"per_turn"``.
        num_generations: dialogs per opening (whole) or branches per branching turn (per_turn), >= 2.
        prompts_per_iteration: openings per iteration and process.
        max_new_tokens: the longest agent turn.
        max_turns, max_dialog_tokens: the caps that truncate a dialog (``max_dialog_tokens``:
            the whole sequence, opening included; default: the model's positions).
        branch_turns: ``"uniform"`` (one turn per sampled dialog) or ``"all"`` (per_turn).
        rollouts_per_branch: ``m``, continuations of each branch (per_turn).
        top_p, top_k: as :class:`~rebel.text.sampler.TextSampler`'s.
        data_seed: seed of the row order and of the sampler's generator.
        shuffle: reshuffle the rows every pass over the dataset.
        generation_backend, backend_settings: the backend and its settings
            (``generation_kwargs``, ``generation_batch_size``, ``vllm_*``), as TextSampler's.
    """

    def __init__(
        self,
        env: EnvFactory,
        dataset: Any = None,
        *,
        form: str = "whole",
        num_generations: int = 2,
        prompts_per_iteration: int = 8,
        max_new_tokens: int = 64,
        max_turns: int = 8,
        max_dialog_tokens: int | None = None,
        branch_turns: str = "uniform",
        rollouts_per_branch: int = 1,
        top_p: float = 1.0,
        top_k: int = 0,
        generation_backend: str | GenerationBackend = "transformers",
        data_seed: int = 0,
        shuffle: bool = True,
        **backend_settings: Any,
    ) -> None:
        if not callable(env):
            raise TypeError(f"env must be a callable returning a TextEnv, got {type(env).__name__}")
        check_choice("dialog_form", form, FORMS)
        check_choice("branch_turns", branch_turns, BRANCH_TURNS)
        check_group_size("num_generations", num_generations)
        for name, value in (("prompts_per_iteration", prompts_per_iteration), ("max_new_tokens", max_new_tokens), ("max_turns", max_turns),
                            ("rollouts_per_branch", rollouts_per_branch)):  # fmt: skip
            check_int(name, value)
        if max_dialog_tokens is not None:
            check_int("max_dialog_tokens", max_dialog_tokens)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if dataset is not None and len(dataset) == 0:
            raise ValueError("dataset is empty; expected opening rows for env.reset (or None)")
        self.backend = sampler_backend(generation_backend, **backend_settings)
        self.env, self.dataset, self.form, self.branch_turns = env, dataset, form, branch_turns
        self.num_generations, self.prompts_per_iteration, self.rollouts_per_branch = (
            num_generations,
            prompts_per_iteration,
            rollouts_per_branch,
        )
        self.max_dialog_tokens, self.max_turns, self.max_new_tokens = max_dialog_tokens, max_turns, max_new_tokens
        self.top_p, self.top_k = top_p, top_k
        self.data_seed, self.shuffle = data_seed, shuffle
        self.epoch, self.position = 0, 0
        self.generator = torch.Generator().manual_seed(data_seed)
        self.last_dialogs: list[dict[str, Any]] = []  # the last batch's sampled dialogs, for the transcript

    # ----------------------------------------------------------- collect
    def limits(self, policy: Policy) -> DialogLimits:
        """The caps for ``policy`` (a causal LM with a chat template): ``max_dialog_tokens``
        defaults to the model's positions, and may not exceed them."""
        if not isinstance(policy, CausalLMPolicy):
            raise TypeError(f"DialogSampler samples from a CausalLMPolicy, got {type(policy).__name__}")
        if getattr(policy.tokenizer, "chat_template", None) is None:
            raise ValueError("dialogs need a tokenizer with a chat template (tokenizer.chat_template is None)")
        config = getattr(policy.model, "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        tokens = self.max_dialog_tokens or positions
        if tokens is None:
            raise ValueError("max_dialog_tokens is not set and the model's config names no max_position_embeddings; set max_dialog_tokens")
        if positions is not None and tokens > positions:
            raise ValueError(
                f"max_dialog_tokens {tokens} is longer than the model's {positions} positions; set max_dialog_tokens <= {positions}"
            )
        return DialogLimits(max_tokens=tokens, max_turns=self.max_turns, max_turn_tokens=self.max_new_tokens)

    def runner(self, policy: Policy) -> DialogRunner:
        """A :class:`DialogRunner` for ``policy`` with this sampler's settings."""
        limits = self.limits(policy)
        settings = SamplingSettings(
            temperature=policy.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=tuple(policy.eos_token_ids),
            pad_token_id=policy.tokenizer.pad_token_id,
        )
        return DialogRunner(policy, self.backend, settings, limits)

    def collect(self, policy: Policy) -> RolloutBatch:
        runner = self.runner(policy)
        rows = self.next_rows()
        seeds = [str(int(torch.randint(0, 2**62, (1,), generator=self.generator))) for _ in rows]
        self.last_seeds = seeds  # each opening's dialog seed (its environment's random streams)
        with self.backend.fixed_weights(policy):  # a vLLM engine gets the weights once, not every round
            batch, sampled = (self._whole if self.form == "whole" else self._per_turn)(runner, rows, seeds)
        returns = torch.tensor([d.return_from(0) for d in sampled], dtype=torch.float64)
        batch.counts.update(
            generated_tokens=float(runner.generated_tokens), turns=float(sum(d.turns for d in sampled)), dialogs=float(len(sampled))
        )
        batch.stats.update(
            episode_return=returns.mean().item(),
            episode_return_min=returns.min().item(),
            episode_return_max=returns.max().item(),
            episode_turns=sum(d.turns for d in sampled) / len(sampled),
            episode_tokens=sum(d.length for d in sampled) / len(sampled),
            terminated_fraction=sum(d.terminated for d in sampled) / len(sampled),
            truncated_fraction=sum(d.truncated for d in sampled) / len(sampled),
        )
        self.last_dialogs = [d.record() for d in sampled]
        return batch

    def _whole(self, runner: DialogRunner, rows: list[Any], seeds: list[str]) -> tuple[RolloutBatch, list[Dialog]]:
        """``n`` dialogs per opening (all with the opening's reset rng, each with steps of its own)."""
        n = self.num_generations
        dialogs = []
        for row, seed in zip(rows, seeds):
            group = [runner.open(self.env(), seed, row, False) for _ in range(n)]
            for i, dialog in enumerate(group):
                if dialog.opening != group[0].opening:
                    raise ValueError("env.reset gave different openings for the same row and rng: it must draw only from its rng argument")
                dialog.seed = f"{seed}/{i}"  # the steps' random numbers differ between the n dialogs
            dialogs += group
        runner.run(dialogs, self.generator)
        ids, attention, mask = pack(
            [d.opening for d in dialogs], [d.tokens for d in dialogs], [d.agent for d in dialogs], runner.tokenizer.pad_token_id
        )
        batch = RolloutBatch(
            group=torch.arange(len(rows)).repeat_interleave(n),
            reward=torch.tensor([d.return_from(0) for d in dialogs], dtype=torch.float32),
            mask=mask,
            data={"input_ids": ids, "attention_mask": attention},
            context=[runner.tokenizer.decode(d.opening) for d in dialogs],
            counts={"tokens": float(mask.sum())},
        )
        return batch, dialogs

    def _per_turn(self, runner: DialogRunner, rows: list[Any], seeds: list[str]) -> tuple[RolloutBatch, list[Dialog]]:
        """One dialog per opening, then ``n`` branches at its branching turns, each continued ``m`` times."""
        n, m = self.num_generations, self.rollouts_per_branch
        sampled = [runner.open(self.env(), seed, row, True) for row, seed in zip(rows, seeds)]
        runner.run(sampled, self.generator, keep_snapshots=True)
        points = [(d, k) for d in sampled for k in self.branching_turns(d, runner.limits.max_tokens)]
        if not points:
            raise ValueError("no sampled dialog has an agent turn to branch from (max_dialog_tokens is shorter than the openings?)")
        prefixes = [d.opening + d.tokens[: d.turn_starts[k]] for d, k in points]
        turns = runner.sample_turns(
            [p for p in prefixes for _ in range(n)], [runner.limits.max_tokens - len(p) for p in prefixes for _ in range(n)], self.generator
        )
        bases = [int(torch.randint(0, 2**62, (1,), generator=self.generator)) for _ in points]  # of the policy's noise
        continuations = []  # point p, branch i, rollout j at (p * n + i) * m + j - 1
        for p, (dialog, k) in enumerate(points):
            for i in range(n):
                for j in range(1, m + 1):  # rollout index j: the same env and policy random numbers for every branch i
                    follow = branch(dialog, k, self.env(), j)
                    follow.policy_seed = step_seed(bases[p], j)
                    runner.take_turn(follow, turns[p * n + i])
                    continuations.append(follow)
        runner.run(continuations, self.generator)
        returns_to_go = [c.return_from(points[index // (n * m)][1]) for index, c in enumerate(continuations)]
        q = torch.tensor(returns_to_go, dtype=torch.float64).view(len(points) * n, m).mean(1)  # Q of each branch
        ids, attention, mask = pack(
            [p for p in prefixes for _ in range(n)], turns, [[True] * len(t) for t in turns], runner.tokenizer.pad_token_id
        )
        batch = RolloutBatch(
            group=torch.arange(len(points)).repeat_interleave(n),
            reward=q.float(),
            mask=mask,
            data={"input_ids": ids, "attention_mask": attention},
            context=[runner.tokenizer.decode(p) for p in prefixes for _ in range(n)],
            counts={"tokens": float(mask.sum()), "branch_points": float(len(points))},
            stats={"q_mean": q.mean().item()},
        )
        return batch, sampled

    def branching_turns(self, dialog: Dialog, max_tokens: int) -> list[int]:
        """The turns of ``dialog`` to branch at: one drawn uniformly, or all (those with room
        for at least one token)."""
        turns = [k for k in range(len(dialog.snapshots)) if len(dialog.opening) + dialog.turn_starts[k] < max_tokens]
        if self.branch_turns == "all" or not turns:
            return turns
        return [turns[int(torch.randint(0, len(turns), (1,), generator=self.generator))]]

    def next_rows(self) -> list[Any]:
        """This process's opening rows of the next iteration (None each without a dataset)."""
        if self.dataset is None:
            return [None] * self.prompts_per_iteration
        return [self.dataset[i] for i in self.next_indices()]
