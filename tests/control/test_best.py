"""The best model of a control run (RUN/best/), stop_on_reward, and rebel eval on best and last."""

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from rebel.cli import main
from rebel.control.agent import Rebel
from rebel.runs import read_best, read_metrics

# CartPole, about 100 env steps an iteration, an evaluation after each: returns go up and down
OPTIONS = {
    "variant": "trajectory",
    "seed": 4,
    "num_groups": 2,
    "segment_length": 25,
    "eval_every": 1,
    "eval_episodes": 2,
    "learning_rate": 3e-3,
    "progress": False,
    "report_to": "none",
    "plot": False,
}


def _improvements(evals: list[tuple[int, float]]) -> list[int]:
    """The iterations whose evaluation beats every earlier one."""
    best, out = -float("inf"), []
    for iteration, score in evals:
        if score > best:
            best, out = score, [*out, iteration]
    return out


def _files(run) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A run of 1500 env steps that records, after each iteration, the best record on disk."""
    run = tmp_path_factory.mktemp("best") / "run"
    seen = []
    agent = Rebel("CartPole-v1", output_dir=str(run), total_steps=1500, callbacks=[lambda t, m: seen.append(read_best(run))], **OPTIONS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite's one_thread fixture starts after a module's fixtures
    try:
        agent.learn()
    finally:
        torch.set_num_threads(threads)
    return run, seen, agent


def test_best_model_is_written_only_when_the_evaluation_improves(straight):
    run, seen, _ = straight
    rows = read_metrics(run)
    evals = [(r["iteration"], r["eval_return"]) for r in rows]
    improved = _improvements(evals)
    assert 1 < len(improved) < len(rows)  # the test sees both improvements and setbacks
    written = [rows[k]["iteration"] for k in range(len(rows)) if seen[k] != (seen[k - 1] if k else None)]
    assert written == improved
    best = read_best(run)
    top = max(evals, key=lambda e: (e[1], -e[0]))  # the first of the highest scores
    assert (best["iteration"], best["eval_return"]) == top
    assert best["env_steps"] == rows[top[0] - 1]["env_steps"] and best["eval_episodes"] == 2


def test_best_model_loads_and_evaluates_to_its_recorded_score(straight):
    run, _, agent = straight
    best = read_best(run)
    loaded = Rebel.load(run / "best")
    assert loaded.evaluate(best["eval_episodes"], seed=best["eval_seed"])["eval_return"] == best["eval_return"]
    assert best["iteration"] < read_metrics(run)[-1]["iteration"]  # not the last policy, nor the last statistics:
    assert 0 < loaded.policy.obs_count < agent.policy.obs_count  # the observation statistics of its own iteration


def test_resume_keeps_the_best_and_stays_exact(straight, tmp_path):
    run, _, _ = straight
    split = tmp_path / "split"
    Rebel("CartPole-v1", output_dir=str(split), total_steps=1500, **OPTIONS).learn(600)
    resumed = Rebel.from_run(split)
    resumed.learn(resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k} for r in rows]
    assert strip(read_metrics(split)) == strip(read_metrics(run))
    assert read_best(split) == read_best(run)
    a, b = Rebel.load(run / "best").policy.state_dict(), Rebel.load(split / "best").policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a best better than any this run reaches is kept through a resume
    again = tmp_path / "again"
    Rebel("CartPole-v1", output_dir=str(again), total_steps=1500, **OPTIONS).learn(600)
    record = read_best(again)
    record["eval_return"] = 1e9
    (again / "best" / "best.json").write_text(json.dumps(record))
    before = _files(again / "best")
    Rebel.from_run(again).learn(resume=True)
    assert _files(again / "best") == before


def test_stop_on_reward_ends_the_run_done_at_the_threshold(straight, tmp_path):
    run, _, _ = straight
    rows = read_metrics(run)
    improved = _improvements([(r["iteration"], r["eval_return"]) for r in rows])
    stop_at = improved[1]  # the first evaluation to beat the first one
    threshold = rows[stop_at - 1]["eval_return"]
    agent = Rebel("CartPole-v1", output_dir=str(tmp_path / "stop"), total_steps=1500, stop_on_reward=threshold, **OPTIONS)
    agent.learn()
    stopped = read_metrics(tmp_path / "stop")
    assert agent.stop_reason == "done" and agent.trainer.exit_code == 0
    assert stopped[-1]["iteration"] == stop_at and stopped[-1]["eval_return"] >= threshold
    assert all(r["eval_return"] < threshold for r in stopped[:-1])
    assert (tmp_path / "stop" / "checkpoints" / f"iter_{stop_at:06d}").is_dir()


def test_rebel_eval_on_best_and_last_writes_new_files_and_leaves_the_run_alone(straight, tmp_path, capsys):
    source, _, _ = straight
    run = tmp_path / "run"
    shutil.copytree(source, run)
    before = _files(run)
    with open(run / ".lock", "a+") as held:  # the run is in use by another process: eval reads it all the same
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        results = {}
        for model in ("best", "last", "best"):
            assert main(["eval", str(run), "--model", model, "--episodes", "2", "--seed", "10004"]) == 0
            results.setdefault(model, []).append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    after = _files(run)
    written = sorted(set(after) - set(before))
    assert len(written) == 3 and all(name.startswith("eval/") for name in written)  # one new file per call, none replaced
    assert {k: v for k, v in after.items() if k in before} == before
    best = results["best"][0]
    assert best["eval_return"] == read_best(run)["eval_return"] == results["best"][1]["eval_return"]
    assert best["best"]["iteration"] == read_best(run)["iteration"]
    assert results["last"][0]["checkpoint"] == f"iter_{read_metrics(run)[-1]['iteration']:06d}"
    assert json.loads(Path(best["output"]).read_text())["eval_return"] == best["eval_return"]
    assert main(["eval", str(run), "--model", "best", "--output", str(run / "metrics.jsonl")]) == 2
    assert "is one of the run's own files" in capsys.readouterr().err
    assert main(["eval", str(run), "--model", str(tmp_path / "nothing.pt")]) == 2
    assert "--model" in capsys.readouterr().err and _files(run) == after
