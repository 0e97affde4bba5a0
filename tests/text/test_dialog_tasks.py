"""The embedded dialog tasks of rebel_envs.dialog_tasks: their environments' semantics with fixed
seeds, the calculator's parsing, the chat tokenizer, and the warmed-up tiny models' play."""

import random

import pytest
import torch

from rebel_envs.dialog_tasks import (
    DIALOG_TASKS,
    CalculatorEnv,
    DialogModelConfig,
    GuessNumberEnv,
    binary_search_guess,
    calculate,
    calculator_dataset,
    chat_tokenizer,
    dialog_ids,
    make_dialog_model,
    play,
)


def test_registry_names_and_entries():
    assert set(DIALOG_TASKS) == {"guess-number", "calculator"}
    assert isinstance(DIALOG_TASKS["guess-number"].make_env(), GuessNumberEnv)
    assert isinstance(DIALOG_TASKS["calculator"].make_env(), CalculatorEnv)
    assert DIALOG_TASKS["guess-number"].dataset is None
    assert DIALOG_TASKS["calculator"].dataset[:3] == calculator_dataset(3)
    assert DIALOG_TASKS["calculator"].optimum == 1.0
    for task in DIALOG_TASKS.values():
        assert task.text_config["max_new_tokens"] > 0 and task.max_length >= 64


def test_unknown_task_and_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="task='chess' is not supported; expected one of guess-number, calculator"):
        make_dialog_model("chess")
    with pytest.raises(ValueError, match="pretrain_good must be in \\[0, 1\\], got 1.5"):
        DialogModelConfig(pretrain_good=1.5)


# ------------------------------------------------------------------ guess the number


def test_guess_number_rewards_fewer_turns_and_caps_the_episode():
    env = GuessNumberEnv(high=8, lie_prob=0.0, max_turns=4, turn_cost=0.15)
    rng = random.Random(0)
    assert env.reset(rng) == [{"role": "user", "content": "guess 1-8"}]
    target = env.target
    assert 1 <= target <= 8 and GuessNumberEnv().reset(random.Random(0)) and GuessNumberEnv().target == 0
    wrong = 1 if target != 1 else 2
    reply = env.step(f" {wrong} ", rng)
    assert reply.messages == [{"role": "user", "content": "higher" if wrong < target else "lower"}]
    assert (reply.reward, reply.terminated, reply.truncated) == (0.0, False, False)
    assert env.step("nine", rng).messages == [{"role": "user", "content": "invalid"}]
    assert env.step("9", rng).messages == [{"role": "user", "content": "invalid"}]  # out of range
    reply = env.step(str(target), rng)
    assert reply.terminated and not reply.truncated and reply.messages == []
    assert reply.reward == pytest.approx(1.0 - 0.15 * 3)
    env.reset(rng)
    for turn in range(1, 5):
        reply = env.step("x", rng)
        assert reply.truncated == (turn == 4) and reply.reward == 0.0 and not reply.terminated


def test_guess_number_judge_lies_at_rate_p_and_only_about_direction():
    env = GuessNumberEnv(high=8, lie_prob=0.3, max_turns=10**6)
    rng = random.Random(1)
    lies = steps = 0
    for _ in range(400):
        env.reset(rng)
        for guess in range(1, 9):
            answer = env.step(str(guess), rng)
            if guess == env.target:
                assert answer.terminated and answer.reward == pytest.approx(1.0 - env.turn_cost * (guess - 1))
                break
            steps += 1
            lies += answer.messages[0]["content"] != ("higher" if guess < env.target else "lower")
    assert steps > 1000
    assert abs(lies / steps - 0.3) < 3 * (0.3 * 0.7 / steps) ** 0.5


def test_guess_number_opening_comes_from_the_rng_or_the_row():
    targets = set()
    for seed in range(50):
        env = GuessNumberEnv()
        env.reset(random.Random(seed))
        twin = GuessNumberEnv()
        twin.reset(random.Random(seed))
        assert env.target == twin.target
        targets.add(env.target)
    assert targets == set(range(1, 9))
    env = GuessNumberEnv()
    env.reset(random.Random(0), {"target": 5})
    assert env.target == 5


def test_binary_search_recovers_from_a_lie():
    env = GuessNumberEnv(high=8)
    assert binary_search_guess(env, []) == 4
    assert binary_search_guess(env, [(4, "higher"), (6, "lower")]) == 5
    assert binary_search_guess(env, [(4, "higher"), (5, "lower")]) == 4  # contradiction: the whole range again


@pytest.mark.parametrize("name", sorted(DIALOG_TASKS))
def test_snapshot_and_restore_continue_identically_with_the_same_rng(name):
    env = DIALOG_TASKS[name].make_env()
    env.reset(random.Random(3))
    messages = ["4", "calc(3*4)", "2", "calc 3"]
    env.step(messages[0], random.Random(4))
    state = env.snapshot()

    def continuation():
        rng = random.Random(5)
        return [env.step(m, rng) for m in messages[1:]]

    first = continuation()
    env.restore(state)
    assert continuation() == first
    env.restore(state)  # the snapshot stays usable
    assert continuation() == first


# ------------------------------------------------------------------ calculator


@pytest.mark.parametrize(
    ("expression", "value"),
    [("12*7", 84), ("(2+3)*4", 20), ("-3+1", -2), (" 7 - 10 ", -3), ("2**3", None), ("8/2", None), ("1.5*2", None),
     ("x", None), ("__import__('os')", None), ("3*", None), ("", None), ("1+" * 20 + "1", None)],
)  # fmt: skip
def test_calculate_takes_integer_expressions_of_plus_minus_times_only(expression, value):
    assert calculate(expression) == value


def test_calculator_answers_calls_errors_and_scores_the_final_answer():
    env = CalculatorEnv(max_turns=4)
    assert env.reset(random.Random(0), {"question": "12*7"}) == [{"role": "user", "content": "12*7=?"}]
    rng = random.Random(0)
    assert env.step("calc(12*7)", rng).messages == [{"role": "user", "content": "84"}]
    for malformed in ("calc 12*7", "calc(12*)", "CALC(1+2)", "84"):
        env.turns = 0
        assert env.step(malformed, rng).messages == [{"role": "user", "content": "error"}]
    for answer, reward in (("answer: 84", 1.0), ("answer:84", 1.0), ("answer: 85", 0.0), (" answer: 84 ", 1.0)):
        env.turns = 0
        reply = env.step(answer, rng)
        assert (reply.reward, reply.terminated, reply.truncated, reply.messages) == (reward, True, False, [])
    env.reset(rng)
    assert env.question == calculator_dataset(1, seed=0)[0]["question"] or env.question
    replies = [env.step("calc(1+1)", rng) for _ in range(4)]
    assert [r.truncated for r in replies] == [False, False, False, True] and all(r.reward == 0.0 for r in replies)


# ------------------------------------------------------------------ chat tokenizer and model


def test_chat_template_ends_every_turn_with_eos_and_matches_the_warm_up_ids(tmp_path):
    tokenizer = chat_tokenizer()
    messages = [{"role": "user", "content": "12*7=?"}, {"role": "assistant", "content": "calc(12*7)"}, {"role": "user", "content": "84"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<usr>12*7=?<eos><bot>calc(12*7)<eos><usr>84<eos><bot>"
    ids, labels = dialog_ids(tokenizer, messages)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    agent = [i for i, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(agent) == "calc(12*7)<eos>" and agent[-1] == tokenizer.eos_token_id
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.apply_chat_template(messages, tokenize=False) == text[: -len("<bot>")]
    assert loaded("calc(1+2)")["input_ids"] == tokenizer("calc(1+2)")["input_ids"]


def model_player(model, tokenizer, max_new_tokens):
    """The model's turn, sampled at temperature 1 (the policy REBEL starts from; greedy play
    would pick the warm-up's majority, the good play) from the chat-templated dialog so far."""

    def player(env, messages, rng):
        ids = torch.tensor([tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=True,
                             top_k=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return player


@pytest.mark.parametrize("name", sorted(DIALOG_TASKS))
def test_warmed_up_model_plays_between_the_worst_and_the_optimum(name):
    task = DIALOG_TASKS[name]
    model, tokenizer = task.make_model()
    player = model_player(model, tokenizer, task.text_config["max_new_tokens"])
    rng = random.Random(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        returns = [play(task.make_env(), player, rng)[1] for _ in range(16)]
    mean = sum(returns) / len(returns)
    assert 0.0 < mean < 1.0  # 0: never right / never found; 1: the best possible return
    again, _ = task.make_model()  # cached: the same weights, a fresh copy
    assert again is not model and all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))


# ------------------------------------------------------------------ learning with whole-dialog REBEL


# the calculator's seed 0 runs by default (seconds); the other three are slow (guess-number needs 100 iterations)
@pytest.mark.parametrize(
    ("name", "seed"),
    [
        ("calculator", 0),
        pytest.param("calculator", 1, marks=pytest.mark.slow),
        pytest.param("guess-number", 0, marks=pytest.mark.slow),
        pytest.param("guess-number", 1, marks=pytest.mark.slow),
    ],
)
def test_whole_dialog_rebel_raises_the_return_of_each_embedded_task(name, seed, tmp_path):
    from rebel.text import TextConfig, TextTrainer

    task = DIALOG_TASKS[name]
    model, tokenizer = task.make_model()
    settings = {"max_dialog_tokens": task.max_length, **task.text_config, **LEARNING[name]}
    config = TextConfig(
        output_dir=str(tmp_path), checkpoint_every=1000, seed=seed, eval_every=0, progress=False, report_to="none", plot=False, **settings
    )
    rows = TextTrainer(model, None, task.dataset, config, env=task.make_env, processing_class=tokenizer).train()
    returns = [r["episode_return"] for r in rows]
    window = WINDOW[name]
    first, last = sum(returns[:window]) / window, sum(returns[-window:]) / window
    assert last > first + MARGIN[name], returns


# guess-number learns slowly (a noisy judge, returns spread over turns); the calculator fast
LEARNING = {"guess-number": {"iterations": 100}, "calculator": {"iterations": 30}}
WINDOW = {"guess-number": 10, "calculator": 5}
MARGIN = {"guess-number": 0.05, "calculator": 0.05}


# ------------------------------------------------------------------ benchmarks/text_dialogs.py


def test_benchmark_dialogs_mask_the_environments_tokens_and_report_keeps_its_notes(tmp_path, monkeypatch):
    import argparse

    from benchmarks import text_dialogs
    from rebel_envs.text_tasks import tiny_gpt2

    tokenizer = chat_tokenizer()
    model = tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_positions=128, seed=0).eval()
    task = DIALOG_TASKS["calculator"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        dialogs = text_dialogs.play_batch(model, tokenizer, task, ["a", "a", "b"], ["1", "2", "3"], max_new_tokens=6)
    assert dialogs[0]["opening"] == dialogs[1]["opening"] != dialogs[2]["opening"]  # a group shares its opening
    for d in dialogs:
        text = tokenizer.decode(d["opening"] + d["ids"])
        assert text.startswith("<usr>") and text.endswith("<eos>") and len(d["ids"]) == len(d["mask"])
        agent = [t for t, m in zip(d["ids"], d["mask"]) if m]
        assert len(agent) == d["agent_tokens"] and all(
            m == 0 for t, m in zip(d["ids"], d["mask"]) if t == tokenizer.convert_tokens_to_ids("<usr>")
        )
    state = torch.get_rng_state()
    final = text_dialogs.evaluate(model, tokenizer, task, 6, seed=5)  # rebel-rl's dialog evaluation, sampled at temperature 1
    assert final == text_dialogs.evaluate(model, tokenizer, task, 6, seed=5) and 0 <= final <= 1
    assert torch.equal(torch.get_rng_state(), state)  # fixed seeds of its own: the caller's RNG is left alone
    (tmp_path / "dialogs.md").write_text("old tables\n" + text_dialogs.NOTES + "\nhand-written notes\n")
    run = {"curve": [(10.0, 0.5), (20.0, 0.7)], "final": 0.75, "total_seconds": 3.0, "rss_peak_mb": 400.0}
    args = argparse.Namespace(budget=20, prompts=2, num_generations=2, learning_rate=1e-3, seeds=[0], eval_dialogs=8, out=str(tmp_path))
    text_dialogs.write_report({"calculator": {"rebel-whole": [run]}}, {"calculator": 0.4}, args, 60.0)
    page = (tmp_path / "dialogs.md").read_text()
    assert "| REBEL, whole dialog | 0.750 | 0.600 | 0.600 | 2 | 3 | 400 |" in page
    assert page.endswith(text_dialogs.NOTES + "\nhand-written notes\n") and "old tables" not in page
