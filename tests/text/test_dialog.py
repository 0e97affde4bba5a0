"""Dialogs as trajectories: tokens scored = tokens sampled, agent-only masks, dynamics cancel,
caps, Monte-Carlo branches (prefix, restored state, common random numbers), resume."""

import copy
import json
import math
import random

import pytest
import torch

from rebel.runs import read_metrics
from rebel.text import TextConfig, TextTrainer
from rebel.text.dialog import DialogSampler, branch, env_rng, render
from rebel.text.env import EnvReply, TextEnv
from rebel.text.generation import TransformersGeneration
from rebel.text.policy import CausalLMPolicy
from rebel.trainer import trajectory_log_prob
from rebel_envs.text_tasks import char_tokenizer, tiny_gpt2

# user turns end with ":", the agent's with <eos> then ":" (a template suffix after the sampled end token)
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}<eos>:{% else %}{{ m['content'] }}:{% endif %}{% endfor %}"
)
FAST = {"progress": False, "tensorboard": False, "plot": False}
DRAWS: dict[int, list[tuple[int, float]]] = {}  # id(env) -> (turn, first random number of the step)


class CounterEnv(TextEnv):
    """Says a target digit; the agent earns 1 for starting with it; the env then says 1-3 random
    digits (the new target is the first). Ends after ``limit`` agent turns."""

    def __init__(self, limit: int = 3) -> None:
        self.limit, self.turn, self.target = limit, 0, "0"

    def reset(self, rng, row=None):
        self.target = str(row["digit"]) if row else str(rng.randrange(10))
        self.turn = 0
        return [{"role": "user", "content": self.target}]

    def step(self, message, rng):
        noise = rng.random()
        DRAWS.setdefault(id(self), []).append((self.turn, noise))
        reward = float(message[:1] == self.target)
        self.turn += 1
        said = "".join(str(rng.randrange(10)) for _ in range(1 + int(noise * 3)))
        self.target = said[0]
        done = self.turn >= self.limit
        return EnvReply([] if done else [{"role": "user", "content": said}], reward, terminated=done)


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_lm")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_positions=256, seed=0).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture
def policy(chat_lm):
    return CausalLMPolicy(chat_lm)


class Recording(TransformersGeneration):
    """The transformers backend, keeping every sampled completion (up to its EOS)."""

    def __init__(self):
        super().__init__()
        self.sampled: list[list[int]] = []

    def generate(self, policy, prompt_ids, prompt_mask, settings, generator):
        out = super().generate(policy, prompt_ids, prompt_mask, settings, generator)
        for row in out.tolist():
            end = next((k + 1 for k, t in enumerate(row) if t in settings.eos_token_ids), len(row))
            self.sampled.append(row[:end])
        return out


def sampler(**kw):
    values = {"num_generations": 2, "prompts_per_iteration": 3, "max_new_tokens": 4, "max_turns": 8, "max_dialog_tokens": 200, **kw}
    return DialogSampler(CounterEnv, **values)


def run_dialogs(policy, seed=0, **kw):
    s = sampler(**kw)
    s.seed(seed)
    runner = s.runner(policy)
    dialogs = [runner.open(CounterEnv(), f"{seed}-{k}", None, True) for k in range(4)]
    runner.run(dialogs, s.generator, keep_snapshots=True)
    return runner, dialogs


def test_tokens_scored_are_tokens_sampled_and_env_tokens_are_the_template(policy):
    backend = Recording()
    s = sampler(generation_backend=backend)
    batch = s.collect(policy)
    tokenizer = policy.tokenizer
    ids, mask = batch.data["input_ids"], batch.mask
    p = ids.shape[1] - mask.shape[1]
    agent_runs = []  # each row's maximal runs of masked tokens = its agent turns, as sampled
    for row, m in zip(ids[:, p:].tolist(), mask.tolist()):
        runs, current = [], []
        for token, flag in zip(row, m):
            if flag:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        agent_runs += [*runs, current] if current else runs
    assert sorted(map(tuple, agent_runs)) == sorted(map(tuple, backend.sampled))  # every sampled turn, scored as sampled
    assert batch.counts["generated_tokens"] == sum(map(len, backend.sampled)) == batch.counts["tokens"]
    assert all(d["terminated"] and d["turns"] == 3 for d in s.last_dialogs)
    _, dialogs = run_dialogs(policy)
    for dialog in dialogs:  # before each agent turn: the chat template's rendering of the messages so far
        for k, start in enumerate(dialog.turn_starts):
            text = tokenizer.decode(dialog.opening + dialog.tokens[:start]).replace(
                "<pad>", ""
            )  # the model samples <pad> too; the env sees text without it
            assert text == render(tokenizer, dialog.messages[: dialog.message_counts[k]], True)
    assert batch.stats["terminated_fraction"] == 1.0 and batch.counts["turns"] == 3 * 6


def test_dialog_log_ratio_is_the_sum_of_its_agent_turns_whatever_the_env_says(policy):
    other = copy.deepcopy(policy)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    replies = set()
    for seed in range(3):  # the environment's random replies differ between the runs
        s = sampler()
        s.seed(seed)
        batch = s.collect(policy)
        replies.add(json.dumps([d["messages"] for d in s.last_dialogs]))
        with torch.no_grad():
            whole = trajectory_log_prob(other.step_log_probs(batch), batch.mask) - trajectory_log_prob(
                policy.step_log_probs(batch), batch.mask
            )
        ids, mask = batch.data["input_ids"], batch.mask
        p = ids.shape[1] - mask.shape[1]
        for k in range(len(batch)):
            row = ids[k][batch.data["attention_mask"][k].bool()].tolist()
            flags = [False] * (len(row) - int(batch.data["attention_mask"][k, p:].sum())) + mask[k].tolist()[
                : int(batch.data["attention_mask"][k, p:].sum())
            ]
            total = torch.zeros((), dtype=torch.float64)
            start = 0
            while start < len(row):  # each agent turn scored on its own, given its prefix
                if not flags[start]:
                    start += 1
                    continue
                end = start
                while end < len(row) and flags[end]:
                    end += 1
                seq = torch.tensor([row[:end]])
                with torch.no_grad():
                    a = other.token_log_probs(seq, torch.ones_like(seq), end - start).sum()
                    b = policy.token_log_probs(seq, torch.ones_like(seq), end - start).sum()
                total += (a - b).double()
                start = end
            assert whole[k].item() == pytest.approx(total.item(), abs=1e-4)
            assert whole[k].abs() > 0
    assert len(replies) == 3


def test_caps_truncate_and_the_end_of_the_task_terminates(policy):
    _, dialogs = run_dialogs(policy, max_turns=2)
    assert all(d.truncated and not d.terminated and d.turns == 2 for d in dialogs)
    _, dialogs = run_dialogs(policy, max_dialog_tokens=9)
    assert all(d.truncated and not d.terminated and d.length <= 9 for d in dialogs)
    assert any(d.length == 9 for d in dialogs)  # some cut inside an agent turn, at the cap
    _, dialogs = run_dialogs(policy)
    assert all(d.terminated and not d.truncated and d.turns == 3 for d in dialogs)
    short = CausalLMPolicy(tiny_gpt2(policy.tokenizer, n_layer=1, n_embd=32, n_positions=14), policy.tokenizer)
    lengths = set()
    for seed in range(4):  # by default the cap is the model's positions: no sequence outgrows them
        _, dialogs = run_dialogs(short, seed=seed, max_dialog_tokens=None)
        lengths |= {d.length for d in dialogs}
    assert max(lengths) == 14 and min(lengths) < 14


def test_a_branch_holds_the_original_prefix_and_env_state_and_replays_it_exactly(policy):
    runner, dialogs = run_dialogs(policy)
    for dialog in dialogs:
        turns = [dialog.tokens[s : s + _turn_length(dialog, k)] for k, s in enumerate(dialog.turn_starts)]
        for k in range(dialog.turns):
            env = CounterEnv()
            copy_ = branch(dialog, k, env, rollout=0)
            assert copy_.opening + copy_.tokens == dialog.opening + dialog.tokens[: dialog.turn_starts[k]]
            assert copy_.messages == dialog.messages[: dialog.message_counts[k]] and copy_.rewards == dialog.rewards[:k]
            assert vars(env) == dialog.snapshots[k] and vars(env) is not dialog.snapshots[k]
            for ids in turns[k:]:  # the same agent turns and rollout index: the same dialog, token for token
                runner.take_turn(copy_, ids)
            assert copy_.tokens == dialog.tokens and copy_.agent == dialog.agent and copy_.rewards == dialog.rewards
            assert copy_.messages == dialog.messages and copy_.terminated == dialog.terminated


def _turn_length(dialog, k):
    start = dialog.turn_starts[k]
    n = 0
    while start + n < len(dialog.tokens) and dialog.agent[start + n]:
        n += 1
    return n


def test_branches_share_env_random_numbers_within_a_rollout_index_only(policy):
    made = []

    def factory():
        made.append(CounterEnv())
        return made[-1]

    DRAWS.clear()
    s = DialogSampler(factory, form="per_turn", num_generations=3, rollouts_per_branch=2, prompts_per_iteration=1, max_new_tokens=4)
    batch = s.collect(policy)
    base, branches = made[0], made[1:]
    assert len(branches) == 3 * 2 and batch.num_groups == 1 and len(batch) == 3
    k = DRAWS[id(branches[0])][0][0]  # the branched turn
    draws = [dict(DRAWS[id(e)]) for e in branches]  # (branch i, rollout j) at 2 * i + (j - 1)
    for i in range(3):
        for j in range(2):
            d = draws[2 * i + j]
            assert min(d) == k
            for turn, value in d.items():
                assert value == env_rng(s.last_seeds[0], turn, j + 1).random()  # the (dialog, turn, rollout) stream
            for other in draws[j::2]:  # branches of the same rollout index: the same numbers where both run
                assert all(other[t] == v for t, v in d.items() if t in other)
    assert draws[0][k] != draws[1][k] and dict(DRAWS[id(base)])[k] != draws[0][k]  # independent across rollout indices
    assert batch.counts["generated_tokens"] > batch.counts["tokens"]  # the continuations' tokens count too


def test_per_turn_rewards_are_mean_returns_to_go(policy):
    s = DialogSampler(CounterEnv, form="per_turn", branch_turns="all", num_generations=2, rollouts_per_branch=3, prompts_per_iteration=2,
                      max_new_tokens=3)  # fmt: skip
    batch = s.collect(policy)
    assert batch.num_groups == 2 * 3  # every turn of the two 3-turn dialogs
    assert all(abs(r * 3 - round(r * 3)) < 1e-5 and 0 <= r <= 3 for r in batch.reward.tolist())  # a mean of 3 integer returns-to-go
    p = batch.data["input_ids"].shape[1] - batch.mask.shape[1]
    for g in range(batch.num_groups):  # the members of a group share their prefix; their masks cover one turn each
        rows = batch.data["input_ids"][batch.group == g, :p]
        assert (rows == rows[0]).all()
    assert batch.mask.sum(1).le(3).all() and batch.mask.sum(1).ge(1).all()


def test_resume_is_exact_and_the_run_keeps_transcripts(chat_lm, tmp_path):
    def cfg(name, **kw):
        return TextConfig(output_dir=str(tmp_path / name), iterations=4, prompts_per_iteration=3, num_generations=2, max_new_tokens=4,
                          learning_rate=1e-3, checkpoint_every=100, dialog_form="per_turn", rollouts_per_branch=2, **FAST, **kw)  # fmt: skip

    straight = TextTrainer(chat_lm, env=CounterEnv, config=cfg("straight"))
    rows = straight.train()

    def stop_at_2(trainer, metrics):
        if trainer.iteration == 2:
            trainer.request_stop()

    first = TextTrainer(chat_lm, env=CounterEnv, config=cfg("split"), callbacks=[stop_at_2]).train()
    resumed = TextTrainer(chat_lm, env=CounterEnv, config=cfg("split"))
    second = resumed.train(resume=True)
    strip = lambda rs: [
        {k: v for k, v in r.items() if "time" not in k and "per_second" not in k and not (isinstance(v, float) and math.isnan(v))}
        for r in rs
    ]
    assert strip(first + second) == strip(rows) == strip(read_metrics(tmp_path / "split"))
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    logged = [json.loads(line) for line in (tmp_path / "split" / "transcripts.jsonl").read_text().splitlines()]
    assert len(logged) == 4 * 3 and logged == [
        json.loads(line) for line in (tmp_path / "straight" / "transcripts.jsonl").read_text().splitlines()
    ]
    assert logged[0]["messages"][0]["role"] == "user" and logged[0]["messages"][1]["role"] == "assistant"
    assert rows[-1]["generated_tokens"] > rows[-1]["tokens"] and {"episode_return", "turns", "q_mean"} <= set(rows[-1])


def test_bad_dialog_inputs_are_refused_in_one_line(chat_lm):
    with pytest.raises(ValueError, match="reward_funcs with env"):
        TextTrainer(chat_lm, reward_funcs=lambda p, c: [0.0] * len(p), env=CounterEnv)
    with pytest.raises(ValueError, match="kl_coef=0.1 applies to single completions"):
        TextTrainer(chat_lm, env=CounterEnv, config=TextConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="max_dialog_tokens 512 is longer than the model's 256 positions"):
        TextTrainer(chat_lm, env=CounterEnv, config=TextConfig(max_dialog_tokens=512))
    with pytest.raises(ValueError, match="dialog_form"):
        TextConfig(dialog_form="turns")
    with pytest.raises(ValueError, match="needs reward_funcs and train_dataset"):
        TextTrainer(chat_lm)
    assert env_rng("a", 1, 2).random() == random.Random("a:1:2").random()


def test_command_line_trains_a_registered_dialog_task_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    import sys
    import types

    from rebel.cli import main

    def make_model(config=None, save_to=None):
        tokenizer = char_tokenizer()
        tokenizer.chat_template = TEMPLATE
        model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_positions=128, seed=0)
        model.save_pretrained(str(save_to))
        tokenizer.save_pretrained(str(save_to))
        return model, tokenizer

    task = types.SimpleNamespace(make_env=CounterEnv, dataset=[{"digit": d} for d in range(10)], max_length=100, make_model=make_model,
                                 text_config={"max_new_tokens": 3, "prompts_per_iteration": 2, "learning_rate": 1e-3})  # fmt: skip
    registry = types.ModuleType("rebel_envs.dialog_tasks")
    registry.DIALOG_TASKS = {"counter": task}
    monkeypatch.setitem(sys.modules, "rebel_envs.dialog_tasks", registry)
    quiet = ["--no-progress", "--no-tensorboard", "--no-plot", "--checkpoint-every", "100", "--dialog-form", "per_turn"]
    assert main(["train", "text", "--env", "counter", "--output-dir", str(tmp_path / "straight"), "--iterations", "3", *quiet]) == 0
    assert "transcripts.jsonl" in capsys.readouterr().out
    assert main(["train", "text", "--env", "counter", "--output-dir", str(tmp_path / "split"), "--iterations", "2", *quiet]) == 0
    assert main(["train", "text", "--resume", str(tmp_path / "split"), "--iterations", "3"]) == 0
    straight, split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    drop = lambda rows: [
        {k: v for k, v in r.items() if "time" not in k and "per_second" not in k and k != "explained_variance"} for r in rows
    ]
    assert drop(straight) == drop(split) and len(straight) == 3 and straight[0]["samples"] == 2 * 2
    capsys.readouterr()
    assert main(["train", "text", "--env", "nope", "--output-dir", str(tmp_path / "bad")]) != 0
    assert "--env nope: not an embedded dialog task; expected one of counter" in capsys.readouterr().err
    assert main(["train", "text", "--env", "counter", "--reward", "m:f", "--output-dir", str(tmp_path / "bad")]) != 0
    assert "--reward m:f with --env counter: the dialog task gives its own rewards" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


class SayDigit(TextEnv):
    """Each of 3 turns pays 1 for an answer that starts with the digit the user asks for (always "7")."""

    def reset(self, rng, row=None):
        self.turn = 0
        return [{"role": "user", "content": "7"}]

    def step(self, message, rng):
        self.turn += 1
        done = self.turn >= 3
        return EnvReply([] if done else [{"role": "user", "content": "7"}], float(message[:1] == "7"), terminated=done)


@pytest.mark.parametrize(
    ("form", "settings"), [("whole", {"learning_rate": 1e-2}), ("per_turn", {"learning_rate": 5e-3, "branch_turns": "all"})]
)
def test_both_forms_raise_the_return(chat_lm, tmp_path, form, settings):
    config = TextConfig(output_dir=str(tmp_path / form), iterations=15, prompts_per_iteration=8, num_generations=4, max_new_tokens=3,
                        checkpoint_every=100, dialog_form=form, seed=0, **FAST, **settings)  # fmt: skip
    rows = TextTrainer(chat_lm, env=SayDigit, config=config).train()
    first, last = sum(r["episode_return"] for r in rows[:3]) / 3, sum(r["episode_return"] for r in rows[-3:]) / 3
    assert last > first + 0.8, [r["episode_return"] for r in rows]  # of at most 3
