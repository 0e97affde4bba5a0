"""Dialogs as trajectories: tokens scored = tokens sampled, agent-only masks, dynamics cancel,
caps, Monte-Carlo branches (prefix, restored state, common random numbers), resume."""

import copy
import json
import math
import random
from pathlib import Path

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
FAST = {"progress": False, "report_to": "none", "plot": False}
EVAL_KEYS = sorted(f"eval/{k}" for k in ("return_mean", "return_std", "turns_mean", "dialog_tokens_mean", "terminated_fraction",
                                          "truncated_fraction"))  # fmt: skip
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
            assert copy_.message_counts == dialog.message_counts and copy_.turn_starts == dialog.turn_starts


def _turn_length(dialog, k):
    start = dialog.turn_starts[k]
    n = 0
    while start + n < len(dialog.tokens) and dialog.agent[start + n]:
        n += 1
    return n


class SeedRecording(TransformersGeneration):
    """The transformers backend, keeping the row seeds of every seeded call (None for the others)."""

    def __init__(self):
        super().__init__()
        self.calls: list[list[int] | None] = []

    def generate(self, policy, prompt_ids, prompt_mask, settings, generator, row_seeds=None):
        self.calls.append(None if row_seeds is None else list(row_seeds))
        return super().generate(policy, prompt_ids, prompt_mask, settings, generator, row_seeds=row_seeds)


def test_branches_share_env_and_policy_random_numbers_within_a_rollout_index_only(policy):
    made = []

    def factory():
        made.append(CounterEnv())
        return made[-1]

    DRAWS.clear()
    backend = SeedRecording()
    s = DialogSampler(factory, form="per_turn", num_generations=3, rollouts_per_branch=2, prompts_per_iteration=1, max_new_tokens=4,
                      generation_backend=backend)  # fmt: skip
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
    unseeded = backend.calls.index(next(c for c in backend.calls if c is not None))  # the sampled dialog's rounds, the branched turns
    rounds = backend.calls[unseeded:]  # the continuations' rounds: rows at 2 * i + (j - 1) while all six run (3 turns each)
    assert all(c is None for c in backend.calls[:unseeded]) and len(rounds) == 2 - k and all(len(c) == 6 for c in rounds)
    for seeds in rounds:
        assert seeds[0::2] == [seeds[0]] * 3 and seeds[1::2] == [seeds[1]] * 3 and seeds[0] != seeds[1]  # shared per rollout index
    assert len({c[0] for c in rounds}) == len(rounds)  # a new seed each turn


class Echo(TextEnv):
    """Deterministic: says "1", then repeats the agent's first character (or "0"); 1 for an
    answer that starts with "1"; 4 turns."""

    def reset(self, rng, row=None):
        self.turn = 0
        return [{"role": "user", "content": "1"}]

    def step(self, message, rng):
        self.turn += 1
        done = self.turn >= 4
        LOG.setdefault(id(self), []).append(message)
        return EnvReply([] if done else [{"role": "user", "content": message[:1] or "0"}], float(message[:1] == "1"), terminated=done)


LOG: dict[int, list[str]] = {}  # id(env) -> the agent's messages


class ForcedTurns(TransformersGeneration):
    """Unseeded calls (the sampled dialog, the branched turns) all answer "3<eos>"; seeded ones sample."""

    def generate(self, policy, prompt_ids, prompt_mask, settings, generator, row_seeds=None):
        if row_seeds is not None:
            return super().generate(policy, prompt_ids, prompt_mask, settings, generator, row_seeds=row_seeds)
        turn = [policy.tokenizer.convert_tokens_to_ids("3"), settings.eos_token_ids[0]]
        return torch.tensor([turn + [settings.pad_token_id] * (settings.max_new_tokens - 2)] * len(prompt_ids))


def continuation_messages(policy, backend, n, m, **kw):
    """The agent's messages in each continuation (branch i, rollout j at i * m + j - 1) of one
    per_turn collection with :class:`Echo`, and the branched turns."""
    made = []

    def factory():
        made.append(Echo())
        return made[-1]

    LOG.clear()
    settings = {"prompts_per_iteration": 1, "max_new_tokens": 4, "max_dialog_tokens": 200, **kw}
    s = DialogSampler(factory, form="per_turn", num_generations=n, rollouts_per_branch=m, generation_backend=backend, **settings)
    s.collect(policy)
    return [LOG[id(e)] for e in made[1:]]


def test_branches_forced_to_the_same_turn_continue_alike_per_rollout_index(policy):
    n, m = 3, 3
    for seed in range(2):
        torch.manual_seed(seed)
        continued = continuation_messages(policy, ForcedTurns(), n, m, data_seed=seed, branch_turns="all")[: n * m]  # the first turn's
        assert all(c[0] == "3" for c in continued)  # the branched turn, forced
        for j in range(m):  # the same rollout index: the same tokens after the branch, in every branch
            assert [continued[i * m + j] for i in range(n)] == [continued[j]] * n
        assert len({tuple(c) for c in continued[:m]}) == m  # independent across rollout indices


def test_branches_whose_turns_agree_get_the_same_continuations(chat_lm):
    n, m, agreeing = 6, 2, 0
    for seed in range(6):  # turns of one token: the branched turns often agree
        continued = continuation_messages(CausalLMPolicy(chat_lm), "transformers", n, m, data_seed=seed, max_new_tokens=1)
        for a in range(n):
            for b in range(a):
                if continued[a * m][0] == continued[b * m][0]:  # the same branched turn (and the env is deterministic)
                    agreeing += 1
                    assert [continued[a * m + j] for j in range(m)] == [continued[b * m + j] for j in range(m)]
    assert agreeing >= 5  # of 6 * 15 pairs


def test_shared_policy_noise_shrinks_the_variance_of_q_differences(policy, monkeypatch):
    """Q(branch 0) - Q(branch 1) over 160 branch points (32 dialogs of 5 turns, m = 1): with the
    policy's noise shared per rollout index its variance is well below that with independent
    noise per continuation (the env's numbers are shared in both)."""
    from rebel.text import dialog

    def q_differences(seed_of):
        monkeypatch.setattr(dialog, "step_seed", seed_of)
        s = DialogSampler(lambda: CounterEnv(5), form="per_turn", branch_turns="all", num_generations=2, rollouts_per_branch=1,
                          prompts_per_iteration=32, max_new_tokens=3, max_dialog_tokens=200, data_seed=1)  # fmt: skip
        q = s.collect(policy).reward.view(-1, 2).double()
        assert len(q) == 160
        return q[:, 0] - q[:, 1]

    shared = q_differences(dialog.step_seed)
    rng = random.Random(0)
    independent = q_differences(lambda *parts: rng.getrandbits(62))  # a new seed for every continuation turn
    assert shared.var() < 0.6 * independent.var(), (shared.var(), independent.var())  # 0.21 against 0.47


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
                          learning_rate=1e-3, checkpoint_every=100, dialog_form="per_turn", rollouts_per_branch=2, eval_every=2,
                          eval_dialogs=4, eval_generation="sampled", **FAST, **kw)  # fmt: skip

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
    assert [sorted(k for k in r if k.startswith("eval/")) for r in rows] == [[], EVAL_KEYS, [], EVAL_KEYS]  # evaluated, and resumed exactly
    for name in ("transcripts.jsonl", "eval_transcripts.jsonl"):
        split_lines = (tmp_path / "split" / name).read_text().splitlines()
        assert split_lines == (tmp_path / "straight" / name).read_text().splitlines() and split_lines
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    logged = [json.loads(line) for line in (tmp_path / "split" / "transcripts.jsonl").read_text().splitlines()]
    assert len(logged) == 4 * 3
    assert logged[0]["messages"][0]["role"] == "user" and logged[0]["messages"][1]["role"] == "assistant"
    assert rows[-1]["generated_tokens"] > rows[-1]["tokens"] and {"episode_return", "turns", "q_mean"} <= set(rows[-1])
    assert "the return of dialogs with `CounterEnv`" in (tmp_path / "straight" / "model" / "README.md").read_text()


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
    with pytest.raises(ValueError, match="eval_reward_funcs with env: the environment gives the rewards; pass eval_reward_funcs=None"):
        TextTrainer(chat_lm, env=CounterEnv, eval_reward_funcs=[lambda p, c: [0.0] * len(p)])
    with pytest.raises(ValueError, match="eval_dataset is empty; expected opening rows for env.reset"):
        TextTrainer(chat_lm, env=CounterEnv, eval_dataset=[])
    with pytest.raises(ValueError, match="eval_dialogs must be"):
        TextConfig(eval_dialogs=0)

    class NeedsRow(CounterEnv):
        def reset(self, rng, row=None):
            return super().reset(rng, {"digit": row["digit"]})

    with pytest.raises(
        ValueError, match=r"with env.reset\(rng, None\) when there is no eval_dataset, and it raised TypeError: .*; pass an"
    ):
        TextTrainer(chat_lm, None, [{"digit": 1}], env=NeedsRow)
    TextTrainer(chat_lm, None, [{"digit": 1}], env=NeedsRow, config=TextConfig(eval_every=0))  # no evaluation: nothing to open
    assert env_rng("a", 1, 2).random() == random.Random("a:1:2").random()


def test_command_line_trains_a_registered_dialog_task_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    from rebel.cli import main

    counter_task(monkeypatch)
    quiet = ["--no-progress", "--report-to", "none", "--no-plot", "--checkpoint-every", "100", "--dialog-form", "per_turn"]
    assert main(["train", "text", "--env", "counter", "--output-dir", str(tmp_path / "straight"), "--iterations", "3", *quiet]) == 0
    out = capsys.readouterr().out
    assert "transcripts.jsonl" in out and "episode_return of the sampled dialogs" in out
    assert main(["train", "text", "--env", "counter", "--output-dir", str(tmp_path / "split"), "--iterations", "2", *quiet]) == 0
    assert main(["train", "text", "--resume", str(tmp_path / "split"), "--iterations", "3"]) == 0
    straight, split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    drop = lambda rows: [
        {k: v for k, v in r.items() if "time" not in k and "per_second" not in k and k != "explained_variance" and "eval/" not in k}
        for r in rows
    ]
    assert drop(straight) == drop(split) and len(straight) == 3 and straight[0]["samples"] == 2 * 2
    evaluated = lambda rows: [r["iteration"] for r in rows if "eval/return_mean" in r]
    assert evaluated(straight) == [3] and evaluated(split) == [2, 3]  # at the end of each train call (eval_every 10)
    assert straight[-1]["eval/return_mean"] == split[-1]["eval/return_mean"]  # the same policy, the same dialogs
    capsys.readouterr()
    assert main(["train", "text", "--env", "nope", "--output-dir", str(tmp_path / "bad")]) != 0
    assert "--env nope: not an embedded dialog task; expected one of counter" in capsys.readouterr().err
    assert main(["train", "text", "--env", "counter", "--reward", "m:f", "--output-dir", str(tmp_path / "bad")]) != 0
    assert "--reward m:f with --env counter: the dialog task gives its own rewards" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["eval", str(tmp_path / "straight"), "--model", "best"]) != 0
    assert "has no best model (runs with --save-best and an evaluation set or --env)" in capsys.readouterr().err


# ------------------------------------------------------------------ evaluation


def replay(dialog, seed, row):
    """An evaluation transcript's environment side, replayed by hand from its seed ``eval<seed>/<dialog>``:
    the messages and the return the environment gives to the transcript's agent turns."""
    key = f"eval{seed}/{dialog['dialog']}"
    env = CounterEnv()
    messages, total = env.reset(random.Random(f"{key}:reset:0"), row), 0.0
    for turn, text in enumerate(m["content"] for m in dialog["messages"] if m["role"] == "assistant"):
        reply = env.step(text, random.Random(f"{key}:{turn}:0"))
        messages, total = [*messages, {"role": "assistant", "content": text}, *reply.messages], total + reply.reward
    return messages, total


def test_dialog_evaluation_plays_the_same_seeded_dialogs_and_its_metrics_are_theirs(chat_lm, tmp_path):
    from rebel.text.evaluation import DialogEvaluator

    openings = [{"digit": d} for d in (3, 5, 7)]
    config = TextConfig(output_dir=str(tmp_path / "run"), iterations=2, prompts_per_iteration=2, num_generations=2, max_new_tokens=4,
                        max_dialog_tokens=200, learning_rate=1e-3, checkpoint_every=100, eval_every=1, eval_generation="both",
                        eval_dialogs=5, log_dialogs=5, seed=3, **FAST)  # fmt: skip
    trainer = TextTrainer(chat_lm, env=CounterEnv, config=config, eval_dataset=openings)
    rows = trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "eval_transcripts.jsonl").read_text().splitlines()]
    for row in rows:
        for mode in ("greedy", "sampled"):
            dialogs = [d for d in logged if d["iteration"] == row["iteration"] and d["mode"] == mode]
            assert [d["dialog"] for d in dialogs] == list(range(5))
            returns = [d["return"] for d in dialogs]
            assert row[f"eval/{mode}/return_mean"] == pytest.approx(sum(returns) / 5)
            assert row[f"eval/{mode}/return_std"] == pytest.approx(torch.tensor(returns).std(unbiased=False).item())
            assert row[f"eval/{mode}/turns_mean"] == sum(d["turns"] for d in dialogs) / 5 == 3  # CounterEnv ends after 3 turns
            assert row[f"eval/{mode}/dialog_tokens_mean"] == pytest.approx(sum(d["tokens"] for d in dialogs) / 5)
            for d in dialogs:  # openings from the rows in turn; the env's replies and rewards from the fixed seeds
                assert replay(d, 3, openings[d["dialog"] % 3]) == (d["messages"], d["return"])
    greedy = [d for d in logged if d["iteration"] == 2 and d["mode"] == "greedy"]
    sampled = [d for d in logged if d["iteration"] == 2 and d["mode"] == "sampled"]
    assert [d["messages"] for d in greedy] != [d["messages"] for d in sampled]
    assert len({r["eval/sampled/return_mean"] for r in rows} | {r["eval/greedy/return_mean"] for r in rows}) > 1  # values to compare
    tokenizer, model = trainer.tokenizer, trainer.model.eval()
    for d in greedy:  # each agent turn: the final model's most likely continuation of the dialog so far
        for k, message in enumerate(d["messages"]):
            if message["role"] == "assistant":
                ids = torch.tensor([tokenizer(render(tokenizer, d["messages"][:k], True), add_special_tokens=False)["input_ids"]])
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                                         eos_token_id=trainer.policy.eos_token_ids, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
                assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == message["content"]
    evaluator = next(c for c in trainer.trainer.callbacks if isinstance(c, DialogEvaluator))
    assert evaluator.evaluate(trainer.trainer, 2) == {k: v for k, v in rows[-1].items() if k.startswith("eval/")}  # same draws


def test_dialog_evaluation_leaves_training_alone(chat_lm, tmp_path):
    def run(name, **kw):
        config = TextConfig(output_dir=str(tmp_path / name), iterations=3, prompts_per_iteration=2, num_generations=2, max_new_tokens=4,
                            learning_rate=1e-2, checkpoint_every=100, log_dialogs=0, **FAST, **kw)  # fmt: skip
        trainer = TextTrainer(chat_lm, env=CounterEnv, config=config)
        return trainer, trainer.train()

    plain, plain_rows = run("plain", eval_every=0)
    evaluated, rows = run("eval", eval_every=1, eval_generation="both", eval_dialogs=4)
    strip = lambda rs: [
        {
            k: v
            for k, v in r.items()
            if "time" not in k and "per_second" not in k and not k.startswith("eval/") and not (isinstance(v, float) and math.isnan(v))
        }
        for r in rs
    ]
    assert strip(rows) == strip(plain_rows) and all("eval/greedy/return_mean" in r for r in rows)
    assert not any(k.startswith("eval/") for r in plain_rows for k in r)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), evaluated.model.named_parameters()):
        assert torch.equal(a, b), name


def counter_task(monkeypatch):
    """Registers CounterEnv as the embedded dialog task ``counter`` (a tiny model, rows of digits)."""
    import sys
    import types

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


def test_best_dialog_model_is_kept_and_rebel_eval_replays_its_evaluation(tmp_path, monkeypatch, capsys, eval_best_and_last, kept_best):
    from huggingface_hub import ModelCard

    from rebel.cli import main

    counter_task(monkeypatch)
    run = tmp_path / "run"
    args = ["train", "text", "--env", "counter", "--output-dir", str(run), "--iterations", "4", "--eval-every", "1", "--eval-dialogs",
            "6", "--eval-generation", "sampled", "--save-best", "--learning-rate", "0.03", "--no-progress", "--report-to", "none",
            "--no-plot", "--checkpoint-every", "100"]  # fmt: skip
    assert main(args) == 0
    assert "eval/return_mean (6 evaluation dialogs): " in capsys.readouterr().out
    rows, best = read_metrics(run), kept_best(run, "eval/return_mean")
    card = ModelCard.load(run / "best" / "README.md")
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("eval/return_mean", round(best["score"], 6))]
    results, before, after = eval_best_and_last(run)
    assert results["best"]["eval/return_mean"] == best["score"]  # the saved best model replays its evaluation
    assert {k: v for k, v in results["last"].items() if k.startswith("eval/")} == {
        k: v for k, v in rows[-1].items() if k.startswith("eval/")
    }
    assert results["last"]["dialogs"] == 6 and sorted(k for k in results["last"] if k.startswith("eval/")) == EVAL_KEYS
    written = json.loads(Path(results["last"]["output"]).read_text())
    assert Path(results["last"]["output"]).parent == run / "eval" and written == {k: v for k, v in results["last"].items() if k != "output"}
    assert {k: v for k, v in after.items() if k in before} == before  # the run's own files are untouched


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
                        checkpoint_every=100, dialog_form=form, seed=0, **{**FAST, "report_to": ["tensorboard"]}, **settings)  # fmt: skip
    rows = TextTrainer(chat_lm, env=SayDigit, config=config).train()
    first, last = sum(r["episode_return"] for r in rows[:3]) / 3, sum(r["episode_return"] for r in rows[-3:]) / 3
    assert last > first + 0.8, [r["episode_return"] for r in rows]  # of at most 3
    events = b"".join(p.read_bytes() for p in (tmp_path / form / "tensorboard").iterdir())
    assert b"dialogs/text_summary" in events and b"**assistant**: " in events  # the transcripts' TensorBoard text


def test_env_tokens_follow_a_chatml_template_after_the_sampled_end_token():
    """A ChatML template (as SmolLM2's, Qwen's) ends an agent message with ``<|im_end|>\\n``: the
    agent samples up to ``<|im_end|>``, and the newline comes first in the env's tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rebel.text.dialog import encode, reply_ids

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
    history = [{"role": "user", "content": "guess 1-16"}]
    sampled = [*encode(tokenizer, "8"), tokenizer.eos_token_id]  # as the agent sampled it: ending at <|im_end|>
    agent = {"role": "assistant", "content": "8"}
    replies = [{"role": "user", "content": "higher"}]
    delta = reply_ids(tokenizer, history, agent, replies, tokenizer.decode(sampled[-1:]))
    assert tokenizer.decode(delta).startswith("\n<|im_start|>user\nhigher")
    whole = encode(tokenizer, render(tokenizer, history, True)) + sampled + delta
    assert tokenizer.decode(whole) == render(tokenizer, [*history, agent, *replies], True)
    cut = reply_ids(tokenizer, history, agent, replies, None)  # a turn cut before its end token: the template closes it
    assert tokenizer.decode(cut).startswith("<|im_end|>\n<|im_start|>user")


@pytest.mark.slow  # about 20 s (two torchrun processes)
def test_two_processes_take_their_own_openings_and_gather_the_transcripts(torchrun_two_processes, chat_lm, tmp_path):
    from pathlib import Path

    rank0, rank1 = torchrun_two_processes(Path(__file__).with_name("dialog_worker.py"), chat_lm, port=29587)
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    for a, b in zip(rank0["openings"], rank1["openings"]):
        assert len(a) == len(b) == 3 and not set(a) & set(b)  # each process had its own rows
    row = rank0["rows"][-1]
    assert row["samples"] == 2 * 2 * 3 * 2 and row["dialogs"] == 2 * 2 * 3 * 2 and row["turns"] == 2 * row["dialogs"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "transcripts.jsonl").read_text().splitlines()]
    assert len(logged) == 2 * 2 * 2  # 2 dialogs of each process per iteration, gathered on the main one
    for a, b in zip(rank0["rows"], rank1["rows"]):  # one evaluation of the 5 dialogs, shared between the processes
        assert {k: v for k, v in a.items() if k.startswith("eval/")} == {k: v for k, v in b.items() if k.startswith("eval/")}
        assert a["eval/turns_mean"] == 2
    evaluated = [json.loads(line) for line in (tmp_path / "run" / "eval_transcripts.jsonl").read_text().splitlines()]
    assert [(d["iteration"], d["dialog"], d["messages"][0]["content"]) for d in evaluated] == [
        (i, k, str(100 + k)) for i in (1, 2) for k in (0, 1)
    ]  # the first 2 of the gathered dialogs, in order
