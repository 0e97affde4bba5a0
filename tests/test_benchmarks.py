"""The benchmark scripts' reports, from made-up measurements (the runs themselves are benchmarks, not tests)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_control_report_merges_runs_and_compares_with_ppo(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    bench = load("control_vs_sb3")

    def run(algo, seed, ret, seconds):
        return {"env": "Hopper-v5", "algorithm": algo, "seed": seed, "final_return": ret, "final_return_std": 0.0,
                "env_steps": 1000, "train_seconds": seconds, "curve": [(500, ret / 2), (1000, ret)]}  # fmt: skip

    first = [run("rebel-critic", 0, 100.0, 10.0), run("sb3-ppo", 0, 50.0, 1.0), run("sb3-ppo", 1, 70.0, 1.0)]
    second = [run("rebel-critic", 0, 300.0, 5.0), run("rebel-critic", 1, 500.0, 5.0)]  # seed 0 again: replaces the first file's
    paths = []
    for k, runs in enumerate((first, second)):
        paths.append(tmp_path / f"part{k}.json")
        paths[-1].write_text(json.dumps(runs))
    out = tmp_path / "out"
    monkeypatch.setattr(
        sys,
        "argv",
        ["control_vs_sb3.py", "--merge", *map(str, paths), "--steps", "1000", "--out", str(out), "--note", "Seed 1's 'run' is new."],
    )
    from benchmarks.common import replace_section

    out.mkdir()
    replace_section(out / "control.md", "vec-env", ["## Written by control_vec_env.py", "", "| a |"])
    bench.main()
    report = (out / "control.md").read_text()
    assert report.endswith("\n<!-- begin vec-env -->\n## Written by control_vec_env.py\n\n| a |\n<!-- end vec-env -->\n")  # kept
    assert f"Command: `python control_vs_sb3.py --merge {paths[0]} {paths[1]} --steps 1000 --out {out} --note '...'`" in report
    assert report.count("Seed 1's 'run' is new.") == 1  # under the table only
    assert "| Hopper-v5 | rebel-critic | 400.0 ± 100.0 | 300, 500 | 200 | 0.20 |" in report
    assert "| Hopper-v5 | sb3-ppo | 60.0 ± 10.0 | 50, 70 | 1000 | 1.00 |" in report
    assert "**Short budget:** 1000 env steps and 2 seed(s)" in report
    assert len(json.loads((out / "control.json").read_text())) == 4 and (out / "control.png").is_file()


def test_control_benchmark_resumes_rebel_runs_exactly_and_reuses_finished_ones(tmp_path, monkeypatch, capsys):
    bench = load("control_vs_sb3")
    work, out = tmp_path / "work", tmp_path / "out"

    def main(steps, *extra):
        args = ["--envs", "Pendulum-v1", "--algorithms", "rebel-trajectory", "--seeds", "0", "--episodes", "1", "--eval-every", "5000"]
        monkeypatch.setattr(
            sys, "argv", ["control_vs_sb3.py", *args, "--steps", str(steps), "--workdir", str(work), "--out", str(out), *extra]
        )
        bench.main()
        return json.loads((out / "control.json").read_text())[0]

    first = main(3000)  # 8 groups x 2 rollouts x 200 steps = 3200 env steps per iteration: one iteration
    run_dir = work / "Pendulum-v1-rebel-trajectory-s0"
    (run_dir / "result.json").unlink()  # as if the process had been stopped before the end
    with pytest.raises(SystemExit):  # other settings than the run started with: refused before any step
        main(9000, "--resume", "--rebel-option", "eta=0.9")
    assert f"--resume: {run_dir} was started with eta=0.5 (these options give 0.9)" in capsys.readouterr().err
    assert len(bench.read_metrics(run_dir)) == 1
    second = main(9000, "--resume")
    rows = bench.read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2, 3]  # continued from the checkpoint of iteration 1, not restarted
    assert [r["env_steps"] for r in rows] == [3200, 6400, 9600] and second["env_steps"] == 9600
    assert [r["env_steps"] for r in rows if "eval_return" in r] == [3200, 6400, 9600]  # evaluations every 5000 steps, and the last
    assert rows[0]["eval_return"] == first["final_return"] and second["train_seconds"] > first["train_seconds"]
    fresh = bench.Rebel(
        "Pendulum-v1", variant="trajectory", seed=0, output_dir=str(tmp_path / "fresh"), progress=False, report_to="none", plot=False
    )
    fresh.learn(9000)
    assert [r["loss"] for r in bench.read_metrics(tmp_path / "fresh")] == [r["loss"] for r in rows]  # exact continuation
    monkeypatch.setattr(bench, "run_rebel", lambda *a, **k: pytest.fail("a finished run started again"))
    assert main(9000, "--resume") == second  # read back from result.json


def test_control_benchmark_default_workdir_is_one_folder_per_budget(tmp_path, monkeypatch):
    bench = load("control_vs_sb3")
    monkeypatch.chdir(tmp_path)
    used = []

    def fake_run(env_id, variant, steps, seed, eval_every, episodes, workdir, resume, options=None):
        used.append(workdir)
        return {"final_return": 1.0, "final_return_std": 0.0, "env_steps": steps, "train_seconds": 1.0, "curve": [(steps, 1.0)]}

    monkeypatch.setattr(bench, "run_rebel", fake_run)
    monkeypatch.setattr(bench, "write_report", lambda *a: None)
    for steps in (60000, 1000000):
        monkeypatch.setattr(sys, "argv", ["control_vs_sb3.py", "--envs", "Hopper-v5", "--algorithms", "rebel-mc", "--steps", str(steps)])
        bench.main()
    # a 60k run and a 1M run of the same env, algorithm and seed keep apart (one folder would refuse the second)
    assert used == [Path("runs/benchmarks/60000-steps"), Path("runs/benchmarks/1000000-steps")]
    assert (tmp_path / "runs/benchmarks/1000000-steps/Hopper-v5-rebel-mc-s0/result.json").is_file()


def test_control_benchmark_sb3_runs_continue_from_their_last_save(tmp_path):
    pytest.importorskip("stable_baselines3")
    bench = load("control_vs_sb3")
    first = bench.run_sb3("Pendulum-v1", "sb3-sac", 300, 0, 200, 1, tmp_path)  # saved at 200 steps, then run to 300
    save = tmp_path / "Pendulum-v1-sb3-sac-s0" / "save"
    assert json.loads((save / "progress.json").read_text())["num_timesteps"] == 200
    second = bench.run_sb3("Pendulum-v1", "sb3-sac", 500, 0, 200, 1, tmp_path, resume=True)  # from the save at 200
    assert [step for step, _ in first["curve"]] == [200, 300] and [step for step, _ in second["curve"]] == [200, 400, 500]
    assert second["curve"][0] == first["curve"][0] and second["env_steps"] == 500
    from stable_baselines3 import SAC

    model = SAC("MlpPolicy", "Pendulum-v1", device="cpu")
    model.load_replay_buffer(save / "replay_buffer.pkl")
    assert model.replay_buffer.pos == 400  # the 200 transitions before the stop came back with the model


def test_diffusion_report_compares_rebel_with_ddpo(tmp_path):
    pytest.importorskip("diffusers")
    bench = load("diffusion_vs_ddpo")
    args = bench.parse_args(["--iterations", "4", "--seeds", "0", "1", "--out", str(tmp_path)])

    def run(rewards, evaluation, seconds, peak):
        return {"reward": rewards, "seconds": [seconds] * 4, "eval_reward": evaluation, "rss_peak_mb": peak,
                "rss_before_mb": 100.0, "cuda_peak_mb": None}  # fmt: skip

    results = {
        "rebel": [run([0.1, 0.2, 0.3, 0.4], 0.30, 2.0, 500.0), run([0.1, 0.2, 0.3, 0.6], 0.40, 2.0, 500.0)],
        "ddpo": [run([0.1, 0.1, 0.2, 0.2], 0.20, 4.0, 1000.0), run([0.1, 0.1, 0.2, 0.2], 0.20, 4.0, 1000.0)],
    }
    bench.write_report(results, 0.15, args, tmp_path, "python benchmarks/diffusion_vs_ddpo.py")
    report = (tmp_path / "diffusion.md").read_text()
    assert "| REBEL | 2.00 ± 0.00 | 500 ± 0 | 400 ± 0 | 0.1000 ± 0.0000 | 0.5000 ± 0.1000 | 0.2750 ± 0.0250 | 0.3500 ± 0.0500 |" in report
    assert "fixed-seed evaluation +0.1500, mean training reward +0.1250, time per iteration x0.50 of DDPO's, peak RSS x0.50" in report
    assert "4 iterations x 8 prompts x 4 images = 128 reward queries per run" in report
    assert (tmp_path / "diffusion.png").is_file()
    # the DDPO baseline is DDPO's loss: clipped per-step ratios of dimension-averaged log-densities
    ddpo = bench.config_for("ddpo", 0, args, tmp_path / "run")
    assert (ddpo.loss, ddpo.clip_range, ddpo.log_prob_reduction) == ("ppo_clip", 1e-4, "mean")
    rebel = bench.config_for("rebel", 0, args, tmp_path / "run")
    assert (rebel.loss, rebel.log_prob_reduction, rebel.learning_rate) == ("rebel", "sum", ddpo.learning_rate)


def test_text_report_rebuilt_from_a_json_file(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    bench = load("text_vs_trl")
    args = vars(bench.parse_args(["--tasks", "tiny", "--seeds", "0", "1", "--iterations", "4"]))

    def run(algo, rewards, seconds, peak):
        return {"algorithm": algo, "reward": rewards, "seconds": [seconds] * 4, "total_seconds": 4 * seconds, "rss_before_mb": 100.0,
                "rss_peak_mb": peak, "ru_maxrss_mb": peak, "cuda_peak_mb": None, "device": "cpu", "optimizer": "AdamW()",
                "eval": {"reward": rewards[-1], "exact": 0.5}}  # fmt: skip

    results = {
        "rebel": [run("rebel", [0.4, 0.5, 0.6, 0.7], 0.1, 400.0), run("rebel", [0.4, 0.5, 0.6, 0.9], 0.1, 400.0)],
        "trl-rloo": [run("trl-rloo", [0.4, 0.4, 0.5, 0.5], 0.2, 500.0), run("trl-rloo", [0.4, 0.4, 0.5, 0.5], 0.2, 500.0)],
    }
    raw = tmp_path / "raw.json"
    raw.write_text(
        json.dumps({"args": args, "start_eval": {"tiny": {"reward": 0.3, "exact": 0.1}}, "results": {"tiny, 1 epochs": results}})
    )
    monkeypatch.setattr(sys, "argv", ["text_vs_trl.py", "--report-from", str(raw), "--out", str(tmp_path)])
    from benchmarks.common import replace_section

    replace_section(tmp_path / "text.md", "other_script", ["## Written by another script", "", "| a |"])
    bench.main()
    report = (tmp_path / "text.md").read_text()
    assert (
        "| REBEL (rebel.text) | 0.100 ± 0.000 | 0.100 ± 0.000 | 0.4 ± 0.0 | 400 ± 0 | 300 ± 0 | 400 ± 0 | 0.400 ± 0.000 | 0.800 ± 0.100 |"
        in report
    )
    assert report.endswith("\n\n<!-- begin other_script -->\n## Written by another script\n\n| a |\n<!-- end other_script -->\n")  # kept
    assert "time per iteration x0.50 of RLOO's, peak RSS x0.80" in report
    assert "held-out reward +0.300" in report and (tmp_path / "text.png").is_file()


def test_text_reports_of_several_runs_merge_their_seeds(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    bench = load("text_vs_trl")

    def raw_file(name, seeds, rewards, iterations=2):
        args = vars(bench.parse_args(["--tasks", "tiny", "--seeds", *map(str, seeds), "--iterations", str(iterations)]))
        run = {"algorithm": "rebel", "reward": rewards, "seconds": [0.1] * 2, "total_seconds": 0.2, "rss_before_mb": 100.0,
               "rss_peak_mb": 400.0, "ru_maxrss_mb": 400.0, "cuda_peak_mb": None, "device": "cpu", "optimizer": "AdamW()", "eval": {}}  # fmt: skip
        results = {"tiny, 1 epochs": {"rebel": [run] * len(seeds), "trl-rloo": [dict(run, algorithm="trl-rloo")] * len(seeds)}}
        path = tmp_path / name
        path.write_text(json.dumps({"args": args, "command": f"python run {name}", "start_eval": {}, "results": results}))
        return path

    first, second = raw_file("a.json", [0], [0.2, 0.4]), raw_file("b.json", [1, 2], [0.2, 0.7])
    monkeypatch.setattr(sys, "argv", ["text_vs_trl.py", "--report-from", str(first), str(second), "--out", str(tmp_path)])
    bench.main()
    report = (tmp_path / "text.md").read_text()
    assert "seeds 0, 1, 2 (mean ± std over seeds)" in report
    assert f"python run a.json\npython run b.json\npython benchmarks/text_vs_trl.py --report-from {first} {second}" in report
    assert "| 0.600 ± 0.141 |" in report  # last-iteration rewards 0.4, 0.7, 0.7 over the three seeds
    two_epochs = json.loads(first.read_text())
    two_epochs["results"] = {"tiny, 2 epochs": two_epochs["results"]["tiny, 1 epochs"]}
    (tmp_path / "e.json").write_text(json.dumps(two_epochs))
    monkeypatch.setattr(
        sys, "argv", ["text_vs_trl.py", "--report-from", str(first), str(second), str(tmp_path / "e.json"), "--out", str(tmp_path)]
    )
    bench.main()
    report = (tmp_path / "text.md").read_text()
    assert "2 epoch(s) per batch (4 optimizer steps), seeds 0." in report and "seeds 0, 1, 2 (mean" in report
    for bad, message in ((raw_file("c.json", [1], [0.1, 0.2]), r"seeds \[1\] of 'tiny, 1 epochs' are already"),
                         (raw_file("d.json", [5], [0.1, 0.2, 0.3], iterations=3), "settings of task 'tiny'")):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["text_vs_trl.py", "--report-from", str(second), str(bad), "--out", str(tmp_path)])
        with pytest.raises(ValueError, match=message):
            bench.main()


def test_text_backend_section_checks_the_target_and_keeps_the_page(tmp_path, monkeypatch):
    bench = load("text_vs_trl")
    argv = [
        "--tasks",
        "smollm2",
        "--seeds",
        "0",
        "1",
        "--iterations",
        "3",
        "--prompts",
        "2",
        "--num-generations",
        "4",
        "--section",
        "backends",
    ]
    args = vars(bench.parse_args(argv))

    def run(algo, seconds, cpu, generation, peak, reward):
        return {"algorithm": algo, "reward": reward, "seconds": seconds, "cpu_seconds": cpu, "generation_seconds": generation,
                "completion_length": [10.0, 20.0, 30.0], "total_seconds": sum(seconds), "rss_before_mb": 100.0, "rss_peak_mb": peak,
                "ru_maxrss_mb": peak, "cuda_peak_mb": None, "device": "cpu", "optimizer": "AdamW()", "eval": {},
                "load_average": [2.0, 4.0]}  # fmt: skip

    # iteration 1 (the engine's start) is left apart: 2+ take 10 s and 8 CPU s (REBEL vLLM), 25 s and 20 CPU s (GRPO)
    ours = run("rebel-vllm", [90.0, 9.0, 11.0], [50.0, 7.0, 9.0], [80.0, 2.0, 3.0], 5000.0, [-0.5, -0.3, -0.1])
    grpo = run("trl-grpo", [30.0, 20.0, 30.0], [25.0, 20.0, 20.0], [10.0, 10.0, 10.0], 4000.0, [-0.5, -0.4, -0.3])
    summary = bench.speed_summary([ours], args["settings"]["smollm2"])
    assert summary["first_s"] == [90.0] and summary["wall_s"] == [10.0] and summary["cpu_s"] == [8.0]
    assert summary["tokens_per_s"] == [(20.0 + 30.0) * 8 / (2.0 + 3.0)]  # 2 prompts x 4 generations of 20 then 30 tokens in 5 s
    rows = bench.target_check(
        bench.speed_summary([ours], args["settings"]["smollm2"]), bench.speed_summary([grpo], args["settings"]["smollm2"])
    )
    assert [(r[0], r[4], r[5]) for r in rows] == [
        ("time per iteration, wall (2+)", "x0.40", True),
        ("time per iteration, process CPU (2+)", "x0.40", True),
        ("peak RSS", "x1.25", False),
        ("reward, mean of all iterations", "+0.100", True),
    ]
    failed = {"algorithm": "trl-grpo-vllm", "failed": "AttributeError: 'Parameter' object has no attribute 'weight_loader' (in x)"}
    results = {"rebel-vllm": [ours, ours], "trl-grpo-vllm": [failed], "trl-grpo": [grpo, grpo]}
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"args": args, "command": "python run", "start_eval": {}, "results": {"smollm2, 1 epochs": results}}))
    (tmp_path / "text.md").write_text("# The page\n\nkept\n")
    monkeypatch.setattr(sys, "argv", ["text_vs_trl.py", "--report-from", str(raw), "--out", str(tmp_path)])
    bench.main()
    page = (tmp_path / "text.md").read_text()
    assert page.startswith("# The page\n\nkept\n\n<!-- begin backends -->\n") and page.endswith("<!-- end backends -->\n")
    assert "| REBEL (rebel.text, vLLM generation) | 90.0 ± 0.0 | 10.00 ± 0.00 | 8.00 ± 0.00 | 80.0 ± 0.0 | 5000 ± 0 |" in page
    assert "* **TRL GRPOTrainer (vLLM colocate)** does not run here: `AttributeError: 'Parameter' object" in page
    assert "load average was 2.0 to 4.0" in page
    assert "| peak RSS | <= x1.00 | 5000 MB | 4000 MB | x1.25 | **not met** |" in page
    assert "| time per iteration, wall (2+) | <= x0.50 | 10.00 s | 25.00 s | x0.40 | met |" in page


def test_logprob_memory_report_writes_its_own_section_of_the_text_page(tmp_path):
    bench = load("text_logprob_memory")
    args = bench.parse_args(["--lengths", "512", "--batch", "4", "--chunk", "256"])

    def run(mode, peak, **extra):
        return {"mode": mode, "length": 512, "seconds": 10.0, "rss_before_mb": 1000.0, "rss_peak_mb": peak, "cuda_peak_mb": None,
                "device": "cpu", "vocab_size": 49152, **extra}  # fmt: skip

    page = tmp_path / "text.md"
    page.write_text("# Text\n\nThe other benchmark.\n")
    for peak in (1800.0, 1500.0):  # a second report replaces the first
        bench.replace_section(
            page, bench.SECTION, bench.report([run("plain", 3000.0), run("lean", peak, max_diff=2e-6)], args, "python run")
        )
    text = page.read_text()
    assert text.startswith("# Text\n\nThe other benchmark.\n\n<!-- begin text_logprob_memory -->\n## Lean log-probs")
    assert text.count("## Lean log-probs") == 1 and text.endswith("<!-- end text_logprob_memory -->\n")
    assert "| 512 | plain (`logprob_chunk_size=0`) | 3000 | 2000 | x1.00 | - | 10.0 | - |" in text
    assert "| 512 | lean (`logprob_chunk_size=256`) | 1500 | 500 | x0.25 | - | 10.0 | 2.0e-06 |" in text
    assert "(0.38 GiB for 4 x 512 tokens" in text and "```bash\npython run\n```" in text


def test_mc_q_accuracy_compares_short_estimates_with_the_long_reference(tmp_path):
    from rebel.control import Rebel

    bench = load("mc_q_accuracy")
    run = tmp_path / "mc"
    options = {"progress": False, "report_to": "none", "plot": False, "eval_every": 0, "eval_episodes": 1}
    Rebel("Pendulum-v1", variant="mc", seed=0, output_dir=str(run), num_groups=8, **options).learn(1000)
    result = bench.measure(str(run), states=6, horizons=(1, 5), reference_horizon=10, reference_rollouts=2)
    assert result.states == 6 and -1 <= result.split_half <= 1
    assert [(r["horizon"], r["value"]) for r in result.rows] == [(1, True), (1, False), (5, True), (5, False)]
    assert all(-1 <= r["corr"] <= 1 and 0 <= r["sign"] <= 1 for r in result.rows)
    # One step, no value: Pendulum's reward -(theta^2 + 0.1 thetadot^2 + 0.001 u^2) differs only in the torque u
    u = Rebel.from_run(run).policy.env_action(result.raw_actions.reshape(12, -1)).reshape(6, 2).double().numpy()
    one_step = result.rows[1]  # horizon 1, no value
    assert one_step["mean_abs"] == pytest.approx(np.abs(0.001 * (u[:, 0] ** 2 - u[:, 1] ** 2)).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="reference_rollouts must be an even number >= 2, got 3"):
        bench.measure(str(run), reference_rollouts=3)
    with pytest.raises(ValueError, match=r"horizons must lie in 1..reference_horizon=10, got \[20\]"):
        bench.measure(str(run), horizons=(20,), reference_horizon=10)


@pytest.mark.parametrize(("option", "value"), [("--eval-every", "0"), ("--steps", "-5"), ("--episodes", "0")])
def test_control_benchmark_refuses_a_count_below_one_before_any_run(tmp_path, monkeypatch, capsys, option, value):
    bench = load("control_vs_sb3")
    argv = [
        "control_vs_sb3.py",
        "--envs",
        "Pendulum-v1",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        option,
        value,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        bench.main()
    assert f"{option} must be >= 1, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_control_benchmark_passes_rebel_options_and_names_them_in_the_report(tmp_path, monkeypatch):
    bench = load("control_vs_sb3")
    seen = []

    def fake_run(env_id, variant, steps, seed, eval_every, episodes, workdir, resume, options=None):
        seen.append(options)
        return {
            "final_return": 1.0,
            "final_return_std": 0.0,
            "env_steps": steps,
            "train_seconds": 1.0,
            "curve": [(steps, 1.0)],
            "options": options,
        }

    monkeypatch.setattr(bench, "run_rebel", fake_run)
    argv = ["control_vs_sb3.py", "--envs", "Hopper-v5", "--algorithms", "rebel-critic", "--steps", "100", "--seeds", "3"]
    out = ["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", [*argv, *out, "--rebel-option", "reward_normalization=none", "--rebel-option", "eta=1.5"])
    bench.main()
    assert seen == [{"reward_normalization": "none", "eta": 1.5}]  # VALUE read as JSON where it parses
    report = (tmp_path / "o" / "control.md").read_text()
    assert '| Hopper-v5 | rebel-critic (eta=1.5, reward_normalization="none") | 1.0 ± 0.0 | 1 | 100 | nan |' in report
    assert "Not the defaults: a row whose algorithm names options in parentheses ran with those options" in report


def test_control_merge_keeps_runs_with_options_apart_from_the_defaults(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    bench = load("control_vs_sb3")

    def run(seed, ret, options=None):
        row = {"env": "Hopper-v5", "algorithm": "rebel-critic", "seed": seed, "final_return": ret, "final_return_std": 0.0,
               "env_steps": 1000, "train_seconds": 1.0, "curve": [(1000, ret)]}  # fmt: skip
        return {**row, "options": options} if options else row

    none = {"reward_normalization": "none"}
    old = [run(0, 10.0, none), run(1, 30.0, none), run(0, 1.0)]
    new = [run(0, 100.0), {**run(9, 50.0), "algorithm": "sb3-ppo"}]  # replaces the seed 0 with the defaults only
    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    for path, runs in zip(paths, (old, new)):
        path.write_text(json.dumps(runs))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["control_vs_sb3.py", "--merge", *map(str, paths), "--steps", "1000", "--out", str(out)])
    bench.main()
    report = (out / "control.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| Hopper-v5")]
    assert rows == [
        "| Hopper-v5 | rebel-critic | 100.0 ± 0.0 | 100 | 1000 | 1.00 |",
        '| Hopper-v5 | rebel-critic (reward_normalization="none") | 20.0 ± 10.0 | 10, 30 | 1000 | 1.00 |',
        "| Hopper-v5 | sb3-ppo | 50.0 ± 0.0 | 50 | 1000 | 1.00 |",
    ]
    merged = json.loads((out / "control.json").read_text())
    assert sorted((r["seed"], r["final_return"]) for r in merged if r["algorithm"] == "rebel-critic") == [(0, 10.0), (0, 100.0), (1, 30.0)]


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("eta", "--rebel-option 'eta' is not KEY=VALUE"),
        ("etta=2", "--rebel-option 'etta' is not an option this benchmark can set"),
        ("seed=4", "--rebel-option 'seed' is not an option this benchmark can set"),
    ],
)
def test_control_benchmark_refuses_a_bad_rebel_option_before_any_run(tmp_path, monkeypatch, capsys, pair, message):
    bench = load("control_vs_sb3")
    argv = ["control_vs_sb3.py", "--envs", "Pendulum-v1", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", [*argv, "--rebel-option", pair])
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_halfcheetah_posture_reads_the_torso_pitch_and_marks_runs_on_their_back(monkeypatch, capsys):
    pytest.importorskip("mujoco")
    import gymnasium as gym

    load("control_vs_sb3")  # the posture script imports its option parser
    posture = load("halfcheetah_posture")

    class StillAgent:  # zero torque: the body stays upright, the return is only the drift
        def predict(self, obs, deterministic=True):
            return np.zeros(6, dtype=np.float32), None

    env = gym.make("HalfCheetah-v5")
    episode_return, pitch = posture.posture_episode(StillAgent(), env)
    env.reset(seed=10_000)
    expected = sum(float(env.step(np.zeros(6, dtype=np.float32))[1]) for _ in range(1000))
    assert episode_return == pytest.approx(expected)
    assert pitch < 0.2

    rows = [{"seed": 1, "env_steps": 10_000, "return": 5.0, "mean_abs_pitch": 0.1},
            {"seed": 1, "env_steps": 20_000, "return": 900.4, "mean_abs_pitch": 3.21},
            {"seed": 2, "env_steps": 10_000, "return": -7.0, "mean_abs_pitch": 1.99}]  # fmt: skip
    assert posture.table(rows).splitlines() == [
        "| seed | 10k | 20k |",
        "| --- | --- | --- |",
        "| 1 | 5 (0.10) | 900 (**3.21**) |",
        "| 2 | -7 (1.99) |  |",
    ]

    monkeypatch.setattr(sys, "argv", ["halfcheetah_posture.py", "--steps", "0"])
    with pytest.raises(SystemExit):
        posture.main()
    assert "--steps and --check-every must be >= 1, got 0 and 10000" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["halfcheetah_posture.py", "--rebel-option", "learning_start=20000"])
    with pytest.raises(SystemExit):
        posture.main()
    assert "--rebel-option 'learning_start' is not an option this benchmark can set" in capsys.readouterr().err


def made_up_text_result(seconds, lengths, rewards, cuda_mb):
    return {"reward": rewards, "seconds": seconds, "completion_length": lengths, "rss_peak_mb": 900.0, "cuda_peak_mb": cuda_mb}


def test_gpu_report_from_made_up_numbers_keeps_the_rest_of_the_page(tmp_path):
    bench = load("gpu")
    tiny = {"prompts": 4, "num_generations": 2}
    rebel = bench.text_row("text-tiny", "rebel", made_up_text_result([9.0, 1.0, 3.0], [5.0, 2.0, 4.0], [0.1, 0.3, 0.5], 2048.0), tiny)
    # iterations 2-3: (2 + 4) tokens x 8 completions in 1 + 3 seconds
    assert (rebel["first_iteration_s"], rebel["iteration_s"], rebel["throughput"]) == (9.0, 2.0, 12.0)
    sd = {"prompts_per_iteration": 2, "num_generations": 2}
    ddpo = bench.diffusion_row(
        "diffusion-sd15", "ddpo", {**made_up_text_result([5.0, 2.0], [0, 0], [-4.0, -3.5], None), "loss": [1.0, 3.0]}, sd
    )
    assert (ddpo["throughput"], ddpo["unit"], ddpo["loss_mean"]) == (2.0, "images/s", 2.0)
    missing = bench.not_run("text-tiny", "trl-grpo", "TRL GRPOTrainer", "not available: trl is not installed (pip install trl)")
    report = {
        "command": "python benchmarks/gpu.py", "device": "NVIDIA H100 80GB HBM3 (79 GiB), CUDA 13.0", "date": "2027-01-01", "smoke": False,
        "seconds": 400.0, "versions": {"torch": "2.11.0", "trl": "not installed"},
        "parts": {
            "text-tiny": {"model": "a tiny GPT-2", "settings": {"iterations": 3}, "rows": [rebel, missing], "budget": 100.0, "seconds": 40.0},
            "diffusion-sd15": {"model": "SD 1.5", "settings": {"iterations": 2}, "rows": [ddpo], "budget": 180.0, "seconds": 90.0},
        },
    }  # fmt: skip
    page = tmp_path / "gpu.md"
    page.write_text(
        "# GPU\n\nHand-written text.\n\n<!-- begin gpu-results -->\nNot measured yet.\n<!-- end gpu-results -->\n\nMore text.\n"
    )
    bench.write_outputs(report, tmp_path)
    text = page.read_text()
    assert text.startswith(
        "# GPU\n\nHand-written text.\n\n<!-- begin gpu-results -->\nMeasured on **NVIDIA H100 80GB HBM3 (79 GiB), CUDA 13.0** (2027-01-01)"
    )
    assert text.endswith("<!-- end gpu-results -->\n\nMore text.\n") and "Not measured yet." not in text
    assert "| text-tiny | REBEL (rebel.text) | 9.00 | 2.000 | 12.0 tokens/s | 2048 | 900 | 0.100 -> 0.500 | - | measured |" in text
    assert "| text-tiny | TRL GRPOTrainer | - | - | - | - | - | - | - | not available: trl is not installed (pip install trl) |" in text
    assert (
        "| diffusion-sd15 | DDPO (clipped per-step loss) | 5.00 | 2.000 | 2.0 images/s | - | 900 | -4.000 -> -3.500 | 2 | measured |"
        in text
    )
    assert "* `text-tiny` (40 s of its 100 s budget): a tiny GPT-2; iterations 3." in text
    assert "Versions: torch 2.11.0, trl not installed." in text
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["parts"]["text-tiny"]["rows"][0]["raw"]["seconds"] == [9.0, 1.0, 3.0]


def test_gpu_script_builds_stable_diffusion_15_and_smollm2_at_their_sizes():
    pytest.importorskip("diffusers")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaForCausalLM

    bench = load("gpu")
    with torch.device("meta"):  # shapes only
        models = [UNet2DConditionModel(**bench.SD15_UNET), AutoencoderKL(**bench.SD15_VAE),
                  CLIPTextModel(CLIPTextConfig(**bench.SD15_TEXT_ENCODER)), LlamaForCausalLM(LlamaConfig(**bench.SMOLLM2_135M))]  # fmt: skip
    # SD 1.5's UNet, VAE and text encoder, and SmolLM2-135M, parameter for parameter
    assert [sum(p.numel() for p in m.parameters()) for m in models] == [859_520_964, 83_653_863, 123_060_480, 134_515_008]
    assert models[0].config.sample_size * 2 ** (len(models[1].config.block_out_channels) - 1) == 512


def test_gpu_script_chat_tokenizer_round_trips_a_chat_prompt():
    bench = load("gpu")
    tokenizer = bench.chat_tokenizer(600)
    assert len(tokenizer) == 600 and (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?\n\nReply."}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nWhat is 2 + 3?\n\nReply.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(2) == 1 and len(ids) == 2 + len("user\nWhat is 2 + 3?\n\nReply.") + 2 + len("assistant\n")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nWhat is 2 + 3?\n\nReply.\nassistant\n"
    assert tokenizer.decode([tokenizer.convert_tokens_to_ids("5"), 599, 2], skip_special_tokens=True) == f"5<|x{599 - 3 - 96}|>"
    with pytest.raises(ValueError, match="vocab_size must be at least 99"):
        bench.chat_tokenizer(50)


def test_gpu_script_ends_a_run_at_its_budget_with_the_processes_it_started(tmp_path, monkeypatch):
    bench = load("gpu")
    script = tmp_path / "worker.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(bench, "MIN_RUN_SECONDS", 0.0)
    budget = bench.Budget("text-tiny", 1.5)
    result, status = bench.run_worker(script, [], tmp_path / "r.json", budget, dict(os.environ))
    assert result is None and status == "timed out: ended at the part's 2 s budget"
    pid = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the grandchild got SIGKILL with its session; wait for it to go
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid}, started by the worker, outlived the timeout")
    assert bench.run_worker(script, [], tmp_path / "r.json", budget, dict(os.environ)) == (
        None,
        "skipped: 0 s of the part's 2 s budget were left",
    )
    failing = tmp_path / "failing.py"
    failing.write_text("raise ValueError('no such model')\n")
    assert bench.run_worker(failing, [], tmp_path / "f.json", bench.Budget("text-tiny", 60.0), dict(os.environ)) == (
        None,
        "failed (exit 1): ValueError: no such model",
    )


def test_gpu_script_says_why_a_run_cannot_start(monkeypatch, capsys):
    bench = load("gpu")
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    assert bench.unavailable("trl-grpo") == "not available: trl is not installed (pip install trl)"
    assert bench.unavailable("rebel-vllm").startswith("not available: ")
    assert bench.unavailable("rebel") is None
    for argv, message in [
        (
            ["--budget", "text-tiny=0"],
            "--budget text-tiny=0: expected PART=SECONDS with PART one of text-tiny, text-smollm2, diffusion-sd15",
        ),
        (["--budget", "tiny=10"], "--budget tiny=10: expected PART=SECONDS"),
        (
            ["--smollm2", "/no/such/folder"],
            "--smollm2 /no/such/folder: expected a folder with a saved causal LM and its tokenizer, or random",
        ),
        (["--device", "cpu", "--threads", "0"], "--threads 0: expected a count >= 1"),
    ]:
        with pytest.raises(SystemExit) as stop:
            bench.parse_args(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    args = bench.parse_args(["--device", "cpu", "--smoke", "--budget", "diffusion-sd15=30"])
    assert args.budgets == {**bench.BUDGETS, "diffusion-sd15": 30.0} and args.out == Path("runs/gpu_smoke") and args.threads == 1


@pytest.mark.slow
def test_gpu_script_smoke_runs_every_part_on_a_cpu(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--smoke", "--out", str(out)]
    subprocess.run(command, check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    report = json.loads((out / "gpu.json").read_text())
    assert report["smoke"] and list(report["parts"]) == ["text-tiny", "text-smollm2", "diffusion-sd15"]
    rows = {(row["part"], row["run"]): row for part in report["parts"].values() for row in part["rows"]}
    has_trl = importlib.util.find_spec("trl") is not None
    for (part, run), row in rows.items():
        if run.startswith("trl") and not has_trl:
            assert row["status"] == "not available: trl is not installed (pip install trl)"
        elif run != "rebel-vllm":
            assert row["status"] == "measured", (part, run, row["status"])
            assert row["iterations"] == 2 and row["throughput"] > 0 and row["gpu_peak_mb"] is None
    assert len(rows) == 2 * 4 + 2 and rows[("diffusion-sd15", "ddpo")]["loss_mean"] is not None
    page = (out / "gpu.md").read_text()
    assert page.startswith("<!-- begin gpu-results -->\n**Toy sizes (`--smoke`) on CPU")
    assert page.count("\n| text-") == 8 and page.count("\n| diffusion-sd15 |") == 2


def test_gpu_script_goes_on_after_a_part_that_cannot_build_its_model(tmp_path, monkeypatch, capsys):
    bench = load("gpu")

    def broken(part, args, tmp, budget):
        raise OSError("no GGUF file here\nsecond line")

    def diffusion(part, args, tmp, budget):
        return {"model": "SD 1.5", "settings": {"iterations": 3}, "rows": [bench.not_run(part, "rebel", "REBEL", "skipped: 0 s left")]}

    monkeypatch.setattr(bench, "run_text_part", broken)
    monkeypatch.setattr(bench, "run_diffusion_part", diffusion)
    bench.main(["--device", "cpu", "--parts", "text-smollm2", "diffusion-sd15", "--out", str(tmp_path)])
    page = (tmp_path / "gpu.md").read_text()
    assert "| text-smollm2 | (the part's model) | - | - | - | - | - | - | - | failed: OSError: no GGUF file here |" in page
    assert "| diffusion-sd15 | REBEL | - | - | - | - | - | - | - | skipped: 0 s left |" in page
    assert "OSError: no GGUF file here" in capsys.readouterr().err  # the traceback
    assert list(json.loads((tmp_path / "gpu.json").read_text())["parts"]) == ["text-smollm2", "diffusion-sd15"]


def test_generation_report_leaves_the_first_iteration_apart():
    bench = load("text_generation")
    result = {"seconds": [30.0, 2.0, 4.0], "collect": [29.0, 1.0, 3.0], "tokens": [100.0, 100.0, 300.0], "reward": [0.2, 0.4, 0.6],
              "start_log_ratio_max": 0.0, "peak_rss_gb": 1.5, "push": [0.25, 0.75]}  # fmt: skip
    header, rule, row = bench.task_table("tiny", {"vllm": result})
    assert header.startswith("| backend | iteration 1 (s) |") and rule.startswith("| --- |")
    assert row == "| vllm | 30.00 | 3.000 | 2.000 | 100 | 0.500 | 1.50 | 0.400 | 0 |"  # 400 tokens in 4 s of iterations 2-3
