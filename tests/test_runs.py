"""One run owns its folder; signals, damaged checkpoints and torn logs lose nothing and mix nothing."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rebel import Trainer, TrainerConfig
from rebel.cli import main
from rebel.runs import RunInUseError, claim_run, claimed_run_folder, plot_runs, read_config, read_metrics
from rebel_envs.tabular import TabularConfig, make_tabular

FAST = {"progress": False, "report_to": "none", "plot": False}


def tabular_trainer(run_dir, callbacks=(), **overrides):
    config = TrainerConfig(**{"output_dir": str(run_dir), "learning_rate": 0.1, "epochs": 2, **FAST, **overrides})
    torch.manual_seed(config.seed)
    policy, sampler = make_tabular(TabularConfig(), seed=config.seed)
    return Trainer(policy, sampler, config, callbacks=callbacks)


def strip_times(rows):
    return [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k} for r in rows]


def hold_folder(run_dir):
    """A process that claims ``run_dir`` and sleeps; returns once it holds it."""
    code = f"from rebel.runs import claim_run; import sys, time; claim_run({str(run_dir)!r}); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


# ---------------------------------------------------------------- one run, one folder


def test_a_folder_in_use_is_refused_naming_it_and_its_holder_and_a_dead_holder_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_folder(run_dir)
    try:
        with pytest.raises(
            RunInUseError, match=rf"{run_dir} is in use by pid {holder.pid} on .* since .* \(python -c \.\.\.\); wait for that run to end"
        ):
            tabular_trainer(run_dir, iterations=2).train()
        with pytest.raises(RunInUseError, match="in use by"):
            tabular_trainer(run_dir, iterations=2).train(resume=True)  # a resume of a running run too
    finally:
        holder.kill()  # SIGKILL: no clean-up; the kernel drops its lock
        holder.wait()
    assert (run_dir / ".lock").exists()  # the stale lock file is there ...
    rows = tabular_trainer(run_dir, iterations=2).train()  # ... and does not stop the next run
    assert len(rows) == 2 and not (run_dir / ".lock").exists()


def test_a_process_may_claim_its_own_folder_again_and_a_failed_start_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "new"
    with pytest.raises(RuntimeError, match="warm-up failed"), claimed_run_folder(run_dir):
        claim_run(run_dir).release()  # the trainer's claim inside the command's
        assert (run_dir / ".lock").exists()
        raise RuntimeError("warm-up failed")
    assert not run_dir.exists()  # claimed, then failed: nothing left behind
    holder = hold_folder(run_dir)
    try:
        with pytest.raises(RunInUseError), claimed_run_folder(run_dir):
            pass
        assert (run_dir / ".lock").exists()  # a refused command removes nothing of the run in the folder
    finally:
        holder.kill()
        holder.wait()


def test_a_new_run_refuses_a_folder_with_a_run_even_without_a_checkpoint_and_overwrite_replaces_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1, "seed": 99}\n')  # a run that died before its first checkpoint
    with pytest.raises(FileExistsError, match="already holds a run; resume it .*, replace it .*--overwrite"):
        tabular_trainer(run_dir, iterations=2).train()
    assert read_metrics(run_dir) == [{"iteration": 1, "seed": 99}]  # untouched
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        tabular_trainer(run_dir, iterations=2).train(resume=True, overwrite=True)
    rows = tabular_trainer(run_dir, iterations=3).train(overwrite=True)
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2, 3] and len(rows) == 3


def test_a_claim_that_meets_a_lock_before_its_holder_line_waits_for_the_line(tmp_path):
    import fcntl
    import threading

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, holder line not yet written

        def write_holder() -> None:
            time.sleep(0.3)
            held.write("pid 4242 on somehost since now (rebel train tabular)\n")
            held.flush()

        writer = threading.Thread(target=write_holder)
        writer.start()
        with pytest.raises(RunInUseError, match=r"in use by pid 4242 on somehost since now \(rebel train tabular\)"):
            claim_run(run_dir)
        writer.join()


def test_two_commands_started_into_one_folder_at_once_give_one_run(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rebel.cli", "train", "tabular", "--output-dir", str(run_dir), "--no-progress", "--iterations", "40"]
    procs = [subprocess.Popen([*command, "--seed", str(seed)], stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = sorted((p.wait(), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2]
    assert "is in use by pid" in results[1][1] or "already holds a run" in results[1][1], results[1][1]
    assert [r["iteration"] for r in read_metrics(run_dir)] == list(range(1, 41))
    winner = read_config(run_dir)["trainer"]["seed"]
    assert (
        main(["train", "tabular", "--output-dir", str(tmp_path / "straight"), "--no-progress", "--iterations", "40", "--seed", str(winner)])
        == 0
    )
    assert strip_times(read_metrics(tmp_path / "straight")) == strip_times(read_metrics(run_dir))  # one run's rows, not a mix


def test_cli_overwrite_and_resume_exclude_each_other(tmp_path, capsys):
    base = ["train", "tabular", "--output-dir", str(tmp_path / "run"), "--no-progress", "--report-to", "none", "--iterations", "2"]
    assert main(base) == 0
    assert main(base) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*base, "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        main([*base, "--overwrite", "--resume", str(tmp_path / "run")])
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize(("signum", "reason", "code"), [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "SIGINT", 130)])
def test_a_signal_finishes_the_iteration_writes_a_checkpoint_and_resume_is_exact(tmp_path, signum, reason, code):
    def send_at_3(trainer, metrics):
        if trainer.iteration == 3:
            os.kill(os.getpid(), signum)

    straight = tabular_trainer(tmp_path / "straight", iterations=6, checkpoint_every=100)
    straight_rows = straight.train()
    assert (straight.stop_reason, straight.exit_code) == ("done", 0)
    stopped = tabular_trainer(tmp_path / "split", iterations=6, checkpoint_every=100, callbacks=[send_at_3])
    rows = stopped.train()
    assert (len(rows), stopped.stop_reason, stopped.exit_code) == (3, reason, code)
    assert (tmp_path / "split" / "checkpoints" / "iter_000003").is_dir()
    assert signal.getsignal(signum) is not None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    resumed = tabular_trainer(tmp_path / "split", iterations=6, checkpoint_every=100)
    resumed.train(resume=True)
    assert torch.equal(resumed.policy.logits, straight.policy.logits)
    assert strip_times(read_metrics(tmp_path / "split")) == strip_times(straight_rows)


def test_sigterm_to_the_command_exits_143_with_a_checkpoint_of_the_last_iteration(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rebel.cli", "train", "tabular", "--output-dir", str(run_dir)]
    proc = subprocess.Popen([*command, "--no-progress", "--report-to", "none", "--iterations", "100000", "--checkpoint-every", "100000"])
    deadline = time.monotonic() + 60
    while len(read_metrics(run_dir)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    rows = read_metrics(run_dir)
    assert (run_dir / "checkpoints" / f"iter_{rows[-1]['iteration']:06d}").is_dir()  # nothing lost
    assert not (run_dir / ".lock").exists()


# ---------------------------------------------------------------- damaged files


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one_and_resume_stays_exact(tmp_path):
    straight = tabular_trainer(tmp_path / "straight", iterations=8, checkpoint_every=100)
    straight_rows = straight.train()
    run_dir = tmp_path / "run"
    tabular_trainer(run_dir, iterations=6, checkpoint_every=2).train()  # keeps iter_4 and iter_6
    damaged = run_dir / "checkpoints" / "iter_000006" / "trainer.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    resumed = tabular_trainer(run_dir, iterations=8, checkpoint_every=2)
    with pytest.warns(UserWarning, match=rf"checkpoint file {damaged} is damaged or unreadable .*set aside as damaged-iter_000006"):
        resumed.train(resume=True)
    assert torch.equal(resumed.policy.logits, straight.policy.logits)
    assert strip_times(read_metrics(run_dir)) == strip_times(straight_rows)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == [
        "damaged-iter_000006",
        "iter_000006",
        "iter_000008",
    ]


def test_resume_from_a_chosen_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    run_dir = tmp_path / "run"
    straight_rows = tabular_trainer(run_dir, iterations=6, checkpoint_every=2, keep_checkpoints=3).train()
    chosen = run_dir / "checkpoints" / "iter_000002"
    resumed = tabular_trainer(run_dir, iterations=6, checkpoint_every=2)
    with pytest.warns(UserWarning, match="the newer .*iter_000006 is set aside as discarded-iter_000006"):
        resumed.train(resume=chosen)
    assert strip_times(read_metrics(run_dir)) == strip_times(straight_rows)
    assert (run_dir / "checkpoints" / "discarded-iter_000004").is_dir()
    chosen_damaged = run_dir / "checkpoints" / "iter_000006" / "process_0.pt"
    chosen_damaged.write_bytes(b"")
    with pytest.raises(ValueError, match=f"checkpoint file {chosen_damaged} is damaged or unreadable"):
        tabular_trainer(run_dir, iterations=6).train(resume=chosen_damaged.parent)
    assert main(["train", "tabular", "--resume", str(run_dir / "checkpoints" / "iter_000099")]) == 2
    assert "iter_000099 does not exist" in capsys.readouterr().err


def test_no_intact_checkpoint_is_an_error_naming_the_files(tmp_path):
    run_dir = tmp_path / "run"
    tabular_trainer(run_dir, iterations=2, checkpoint_every=1).train()
    for checkpoint in (run_dir / "checkpoints").glob("iter_*"):
        (checkpoint / "trainer.pt").write_bytes(b"not a checkpoint")
    with (
        pytest.warns(UserWarning),
        pytest.raises(FileNotFoundError, match=r"no intact checkpoint .*iter_000002/trainer.pt .*iter_000001/trainer.pt"),
    ):
        tabular_trainer(run_dir, iterations=3).train(resume=True)


def test_an_error_while_collecting_never_replaces_an_existing_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    tabular_trainer(run_dir, iterations=2, checkpoint_every=1).train()
    before = (run_dir / "checkpoints" / "iter_000002" / "process_0.pt").read_bytes()
    trainer = tabular_trainer(run_dir, iterations=4, checkpoint_every=1)

    def fail(policy):
        raise RuntimeError("reward server went away")

    trainer.sampler.collect = fail
    with pytest.raises(RuntimeError, match="reward server went away"):
        trainer.train(resume=True)
    assert (run_dir / "checkpoints" / "iter_000002" / "process_0.pt").read_bytes() == before


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_skipped_by_plot(tmp_path):
    run_dir = tmp_path / "run"
    straight_rows = tabular_trainer(tmp_path / "straight", iterations=4).train()
    tabular_trainer(run_dir, iterations=2).train()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "loss": 0.12')  # killed while writing the row
    with pytest.warns(UserWarning, match=rf"{run_dir / 'metrics.jsonl'} line 3: dropping a torn last line"):
        assert len(read_metrics(run_dir)) == 2
    with pytest.warns(UserWarning, match="torn last line"):
        assert plot_runs([run_dir], tmp_path / "plot.png", metric="loss").is_file()
    with pytest.warns(UserWarning, match="torn last line"):
        tabular_trainer(run_dir, iterations=4).train(resume=True)
    assert strip_times(read_metrics(run_dir)) == strip_times(straight_rows)


def test_a_bad_metrics_line_before_the_last_and_a_malformed_config_are_named(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: not a JSON object: 'not json'"):
        read_metrics(run_dir)
    (run_dir / "config.yaml").write_text("trainer:\n  eta: 1.0\n  seed: [0\n")
    with pytest.raises(ValueError, match=rf"{run_dir / 'config.yaml'} line \d+: malformed YAML"):
        read_config(run_dir)
    (run_dir / "config.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        read_config(run_dir)


# ---------------------------------------------------------------- fault injection


def test_fault_injection_subset_loses_and_mixes_nothing(tmp_path):
    """The fast subset of benchmarks/fault_injection.py: each fault once, mid-run, on the tabular workload."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fault_injection", Path(__file__).parents[1] / "benchmarks" / "fault_injection.py")
    faults = importlib.util.module_from_spec(spec)
    sys.modules["fault_injection"] = faults  # its dataclasses look the module up
    spec.loader.exec_module(faults)
    trials = faults.run_trials(["tabular"], trials=len(faults.FAULTS), seed=0, workdir=tmp_path, at_rows=7)
    assert [t.fault for t in trials] == list(faults.FAULTS)
    assert [t.stage for t in trials] == ["mid-run"] * len(faults.FAULTS)  # every fault hit a running run
    assert [t.problems for t in trials] == [[]] * len(faults.FAULTS)
    assert faults.summary(trials) == f"{len(faults.FAULTS)} faults injected, 0 runs lost or mixed"
