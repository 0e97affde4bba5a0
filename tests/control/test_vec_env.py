"""Environments stepped in worker processes (``vec_env="async"``): the same results as in this
process, bit for bit, for the pool, every variant and a resumed run; the settings' errors."""

import multiprocessing
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

from rebel.control.agent import Rebel
from rebel.control.envs import EnvPool
from rebel.runs import read_metrics

FAST = {"progress": False, "report_to": "none", "plot": False}
VARIANTS = {
    "trajectory": {"num_groups": 2, "segment_length": 40, "value_bootstrap": True, "value_epochs": 1},
    "mc": {"num_groups": 3, "horizon": 5, "value_epochs": 1, "rollouts_per_action": 2},
    "critic": {
        "num_groups": 64,
        "steps_per_iteration": 100,
        "learning_starts": 100,
        "critic_batch_size": 32,
        "hidden_sizes": [32, 32],
        "critic_hidden_sizes": [32, 32],
    },
}


def strip(rows):
    return [{k: v for k, v in row.items() if "time" not in k and "per_second" not in k} for row in rows]


def test_a_pool_in_worker_processes_steps_snapshots_and_restores_as_one_in_process():
    pools = [EnvPool("Hopper-v5", 5, workers=0), EnvPool("Hopper-v5", 5, workers=2)]
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(40, 5, 3))
    seen = []
    for pool in pools:
        pool.reset(range(5), [0, 1, 2, 3, 4])
        out = []
        for t in range(40):
            out.append((*pool.step([0, 2, 3, 4], actions[t, [0, 2, 3, 4]]), pool.obs.copy()))
            if t == 10:
                states = pool.snapshots([3, 4])
        pool.restore_many([0, 1, 2], [states[0], states[0], states[1]], [7, 7, None])  # across workers, reseeded
        for t in range(30):
            out.append((*pool.step([0, 1, 2], actions[t, [0, 0, 2]]), pool.obs.copy()))
        seen.append((out, states))
    (sync, sync_states), (workers, worker_states) = seen
    assert pools[1].shards == [[0, 1, 2], [3, 4]] and pools[1].envs == []
    for a, b in zip(sync, workers):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(sync[-1][3][0], sync[-1][3][1])  # two copies restored to one state, same seed: same path
    # a snapshot taken in a worker restores in this process (and the other way) to the same continuation
    pools[0].restore_many([0], [worker_states[1]])
    pools[1].restore_many([0], [sync_states[1]])
    steps = [pool.step([0], actions[0, :1]) for pool in pools]
    np.testing.assert_array_equal(steps[0][0], steps[1][0])
    np.testing.assert_array_equal(pools[0].obs[0], pools[1].obs[0])
    for pool in pools:
        pool.close()


@pytest.mark.parametrize("variant", ["trajectory", "mc", "critic"])
def test_every_variant_learns_the_same_in_worker_processes(tmp_path, variant):
    options = {"eval_every": 1, "eval_episodes": 1, "epochs": 1, "minibatch_size": 8, "n_envs": 2, **VARIANTS[variant], **FAST}
    runs = {}
    for vec_env in ("sync", "async"):
        agent = Rebel("Pendulum-v1", variant=variant, seed=3, output_dir=str(tmp_path / vec_env), vec_env=vec_env, **options)
        agent.learn(400)
        runs[vec_env] = agent
    assert strip(read_metrics(tmp_path / "sync")) == strip(read_metrics(tmp_path / "async"))
    assert len(read_metrics(tmp_path / "sync")) >= 2
    for a, b in zip(runs["sync"].policy.state_dict().values(), runs["async"].policy.state_dict().values()):
        assert torch.equal(a, b)
    workers = [p for p in multiprocessing.active_children() if p.name.startswith("Worker<AsyncVectorEnv>")]
    assert workers
    runs["async"].close()
    assert not any(p.is_alive() for p in workers)  # close() ends the worker processes


@pytest.mark.parametrize("variant", ["mc", "critic"])
def test_a_run_in_worker_processes_resumes_exactly_and_across_vec_env(tmp_path, variant):
    options = {"eval_every": 1, "eval_episodes": 1, "epochs": 1, "minibatch_size": 8, "n_envs": 2, **VARIANTS[variant], **FAST}
    straight = Rebel("Pendulum-v1", variant=variant, seed=1, output_dir=str(tmp_path / "a"), vec_env="async", total_steps=400, **options)
    straight.learn()
    Rebel("Pendulum-v1", variant=variant, seed=1, output_dir=str(tmp_path / "b"), vec_env="async", total_steps=400, **options).learn(200)
    Rebel.from_run(tmp_path / "b").learn(resume=True)
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    # a checkpoint written by worker processes resumes in this process (and the other way) to the same run
    Rebel("Pendulum-v1", variant=variant, seed=1, output_dir=str(tmp_path / "c"), vec_env="async", total_steps=400, **options).learn(200)
    Rebel.from_run(tmp_path / "c", vec_env="sync").learn(resume=True)
    Rebel("Pendulum-v1", variant=variant, seed=1, output_dir=str(tmp_path / "d"), vec_env="sync", total_steps=400, **options).learn(200)
    Rebel.from_run(tmp_path / "d", vec_env="async").learn(resume=True)
    for other in ("c", "d"):
        assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / other))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"vec_env": "subproc"}, r"vec_env='subproc' is not supported; expected one of sync, async"),
        ({"n_envs": 0}, "n_envs must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        Rebel("Pendulum-v1", output_dir=str(tmp_path / "run"), **options)


def test_a_pool_has_no_more_workers_than_copies():
    pool = EnvPool("CartPole-v1", 2, workers=4)
    assert pool.shards == [[0], [1]]
    assert isinstance(pool.vector, gym.vector.AsyncVectorEnv) and pool.vector.num_envs == 2
    pool.close()


def test_the_workers_end_when_the_training_process_is_killed(tmp_path):
    script = (
        "import os, time\n"
        "from rebel.control.envs import EnvPool\n"
        "pool = EnvPool('CartPole-v1', 4, workers=2)\n"
        "print(*(p.pid for p in pool.vector.processes), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    proc.kill()  # SIGKILL: the training process runs no clean-up
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)
    assert "Traceback" not in proc.stderr.read()  # the kernel ended them: no broken-pipe noise


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
