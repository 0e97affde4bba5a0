"""Tests for rebel.control.snapshot: exact (bitwise) replay after restore."""

from __future__ import annotations

import importlib.util
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gymnasium")

import gymnasium as gym

from rebel.control.snapshots import frozen_normalizers, reseed, restore, snapshot

needs_mujoco = pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="mujoco not installed")

Step = tuple[bytes, bytes, bool, bool]


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """MuJoCo appends compiler warnings (half_cheetah.xml uses settotalmass) to ./MUJOCO_LOG.TXT."""
    monkeypatch.chdir(tmp_path)


def _bits(x: Any) -> bytes:
    a = np.asarray(x)
    return str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()


def _actions(space: Any, n: int, seed: int) -> list[Any]:
    space.seed(seed)
    return [space.sample() for _ in range(n)]


def _play(env: Any, actions: list[Any], reset_seeds: Iterator[int | None] | None = None) -> list[Step]:
    """Step through ``actions``; on episode end reset with the next seed and keep going.

    Returns bitwise fingerprints of (obs, reward, terminated, truncated); a reset is
    recorded as a step with reward b"reset".
    """
    seeds = reset_seeds if reset_seeds is not None else iter(lambda: None, 0)
    out: list[Step] = []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        out.append((_bits(obs), _bits(reward), bool(terminated), bool(truncated)))
        if terminated or truncated:
            obs, _ = env.reset(seed=next(seeds))
            out.append((_bits(obs), b"reset", False, False))
    return out


def _play_vec(env: Any, actions: list[Any]) -> tuple[list[tuple[bytes, ...]], int]:
    """Fingerprints of the vector steps and the number of episode ends seen."""
    out: list[tuple[bytes, ...]] = []
    ends = 0
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        out.append((_bits(obs), _bits(reward), _bits(terminated), _bits(truncated)))
        ends += int(np.sum(terminated | truncated))
    return out, ends


def _warm_up(env: Any, n: int, seed: int = 0) -> None:
    env.reset(seed=seed)
    for action in _actions(env.action_space, n, seed + 1000):
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()


def _check_replay(make: Callable[[], Any], warm: int, n: int, reset_seeds: list[int | None] | None = None) -> list[Step]:
    """Snapshot after ``warm`` steps, play ``n`` actions, diverge, restore, replay; also in a fresh instance."""
    env = make()
    _warm_up(env, warm)
    state = snapshot(env)
    actions = _actions(env.action_space, n, seed=1)
    seeds = reset_seeds or []
    reference = _play(env, actions, iter(seeds + [None] * n))

    _play(env, _actions(env.action_space, 7, seed=2))  # wander off on another branch
    restore(env, state)
    assert _play(env, actions, iter(seeds + [None] * n)) == reference
    restore(env, state)  # the state is reusable
    assert _play(env, actions, iter(seeds + [None] * n)) == reference

    other = make()  # e.g. a worker's copy used for a parallel branch rollout
    _warm_up(other, 3, seed=123)
    restore(other, pickle.loads(pickle.dumps(state)))
    assert _play(other, actions, iter(seeds + [None] * n)) == reference
    return reference


@needs_mujoco
def test_halfcheetah_exact_replay() -> None:
    ref = _check_replay(lambda: gym.make("HalfCheetah-v5"), warm=25, n=300)
    assert len(ref) == 300


@needs_mujoco
def test_hopper_exact_replay_through_terminations() -> None:
    # Hopper terminates often under random actions; resets alternate between fixed
    # seeds and unseeded ones (which draw from the restored env RNG).
    ref = _check_replay(lambda: gym.make("Hopper-v5"), warm=5, n=300, reset_seeds=[None, 11, None, 12])
    n_resets = sum(step[1] == b"reset" for step in ref)
    assert n_resets >= 3
    assert any(step[2] for step in ref)  # terminated


@needs_mujoco
def test_ant_reward_reads_stale_kinematics() -> None:
    # Ant's forward reward reads body xpos *before* mj_step, i.e. kinematics of the
    # previous sub-step: mj_setState + mj_forward alone would not reproduce it.
    _check_replay(lambda: gym.make("Ant-v5"), warm=10, n=60)


@needs_mujoco
def test_time_limit_truncation_is_crossed_identically() -> None:
    env = gym.make("HalfCheetah-v5", max_episode_steps=50)
    env.reset(seed=0)
    for action in _actions(env.action_space, 30, seed=3):
        env.step(action)
    state = snapshot(env)
    actions = _actions(env.action_space, 40, seed=4)
    reference = _play(env, actions, iter([5]))
    truncated_at = [i for i, step in enumerate(reference) if step[3]]
    assert truncated_at == [19]  # the 50th step of the episode
    assert reference[20][1] == b"reset"

    other = gym.make("HalfCheetah-v5", max_episode_steps=50)
    other.reset(seed=9)
    for env_ in (env, other):
        restore(env_, state)
        assert _play(env_, actions, iter([5])) == reference


def test_cartpole_deep_copy_path() -> None:
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    state = snapshot(env)
    assert state["mujoco"] is None
    assert state["env_id"] == "CartPole-v1"
    ref = _check_replay(lambda: gym.make("CartPole-v1"), warm=5, n=200)
    assert sum(step[1] == b"reset" for step in ref) >= 3  # unseeded resets use the restored RNG


def test_reseed_restarts_only_the_env_generator_in_place() -> None:
    """Slippery FrozenLake draws each move from its generator: after one restore, the same seed
    gives the same moves, other seeds other moves, and the rest of the state stays restored."""
    env = gym.make("FrozenLake-v1", is_slippery=True)
    env.reset(seed=0)
    state = snapshot(env)
    generator = env.unwrapped.np_random

    def continuation(seed: int | None) -> tuple[int, int]:
        """The cell one move down reaches, and the generator's next draw."""
        restore(env, state)
        if seed is not None:
            reseed(env, seed)
        assert env.unwrapped.s == 0 and env.unwrapped.np_random is generator  # state restored, generator kept
        return int(env.step(1)[0]), int(generator.integers(2**31))

    assert continuation(None) == continuation(None)
    assert continuation(7) == continuation(7) != continuation(None)
    assert len({continuation(seed)[0] for seed in range(8)}) > 1  # the slip depends on the seed
    reseed(env, 7)
    assert generator.random() == np.random.default_rng(7).random()  # the stream of default_rng(seed)
    with pytest.raises(TypeError, match="reseed\\(\\) expects a gymnasium.Env, got"):
        reseed(state, 7)


def test_pendulum_exact_replay() -> None:
    ref = _check_replay(lambda: gym.make("Pendulum-v1"), warm=20, n=250)
    assert any(step[3] for step in ref)  # crosses the 200-step time limit


def _normalized_cheetah() -> Any:
    env = gym.make("HalfCheetah-v5")
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env = gym.wrappers.NormalizeObservation(env)
    return gym.wrappers.NormalizeReward(env)


def _stats(env: Any) -> list[bytes]:
    obs_w = env.env  # NormalizeReward -> NormalizeObservation
    rec = obs_w.env
    return [
        _bits(obs_w.obs_rms.mean),
        _bits(obs_w.obs_rms.var),
        _bits(obs_w.obs_rms.count),
        _bits(env.return_rms.mean),
        _bits(env.return_rms.var),
        _bits(env.return_rms.count),
        _bits(env.discounted_reward),
        _bits([rec.episode_returns, rec.episode_lengths, rec.episode_start_time]),
    ]


@needs_mujoco
def test_normalizer_statistics_restored_exactly() -> None:
    env = _normalized_cheetah()
    _warm_up(env, 20)
    state = snapshot(env)
    stats_at_snapshot = _stats(env)
    actions = _actions(env.action_space, 60, seed=5)
    reference = _play(env, actions)
    stats_after = _stats(env)
    assert stats_after != stats_at_snapshot

    restore(env, state)
    assert _stats(env) == stats_at_snapshot
    assert _play(env, actions) == reference
    assert _stats(env) == stats_after

    other = _normalized_cheetah()
    _warm_up(other, 3, seed=7)
    restore(other, state)
    assert _stats(other) == stats_at_snapshot
    assert _play(other, actions) == reference


@needs_mujoco
def test_frozen_normalizers_freeze_and_restore_setting() -> None:
    env = _normalized_cheetah()
    _warm_up(env, 10)
    obs_w = env.env
    env.update_running_mean = False  # a previous setting that must survive the block
    before = _stats(env)[:6]
    with frozen_normalizers(env) as frozen:
        assert {type(w).__name__ for w in frozen} == {"NormalizeObservation", "NormalizeReward"}
        assert not obs_w.update_running_mean and not env.update_running_mean
        _play(env, _actions(env.action_space, 20, seed=6))
        assert _stats(env)[:6] == before
    assert obs_w.update_running_mean is True
    assert env.update_running_mean is False

    with pytest.raises(RuntimeError), frozen_normalizers(env):
        raise RuntimeError("boom")
    assert obs_w.update_running_mean is True

    _play(env, _actions(env.action_space, 5, seed=7))
    assert _stats(env)[:3] != before[:3]  # observation statistics update again


@pytest.mark.parametrize("env_id", ["CartPole-v1", pytest.param("Hopper-v5", marks=needs_mujoco)])
def test_sync_vector_env_round_trip(env_id: str) -> None:
    def make() -> Any:
        return gym.make_vec(env_id, num_envs=3, vectorization_mode="sync")

    env = make()
    env.reset(seed=0)
    for i, action in enumerate(_actions(env.action_space, 200, seed=8)):
        env.step(action)
        if i > 5 and env._autoreset_envs.any():  # snapshot with an autoreset pending
            break
    assert env._autoreset_envs.any()
    state = snapshot(env)
    assert state["kind"] == "sync_vector" and len(state["envs"]) == 3
    actions = _actions(env.action_space, 100, seed=9)
    reference, ends = _play_vec(env, actions)
    assert ends > 0  # autoresets happen during the replay

    restore(env, state)
    assert _play_vec(env, actions)[0] == reference
    other = make()
    other.reset(seed=42)
    restore(other, pickle.loads(pickle.dumps(state)))
    assert _play_vec(other, actions)[0] == reference


def test_async_vector_env_is_rejected() -> None:
    env = gym.vector.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2)
    try:
        with pytest.raises(TypeError, match="SyncVectorEnv"):
            snapshot(env)
        with pytest.raises(TypeError, match="SyncVectorEnv"):
            restore(env, {})
    finally:
        env.close()


class _UncopyableEnv(gym.Env):
    """A pure-Python env holding something deepcopy cannot handle."""

    def __init__(self, holder: str = "lock") -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.resource = threading.Lock() if holder == "lock" else (i for i in range(3))

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(1, np.float32), 0.0, False, False, {}


@pytest.mark.parametrize("holder", ["lock", "generator"])
def test_uncopyable_env_raises_clear_type_error(holder: str) -> None:
    env_id = "RebelTestUncopyable-v0"
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=_UncopyableEnv)  # type: ignore[arg-type]
    env = gym.make(env_id, holder=holder)
    env.reset(seed=0)
    with pytest.raises(TypeError, match=env_id) as info:
        snapshot(env)
    message = str(info.value)
    assert "resource" in message and "MuJoCo" in message and "deep-copyable" in message

    bare = _UncopyableEnv(holder)  # no spec: the class name is used instead
    with pytest.raises(TypeError, match="_UncopyableEnv"):
        snapshot(bare)


@needs_mujoco
def test_restore_rejects_a_different_env() -> None:
    cheetah = gym.make("HalfCheetah-v5")
    cheetah.reset(seed=0)
    state = snapshot(cheetah)

    hopper = gym.make("Hopper-v5")
    hopper.reset(seed=0)
    with pytest.raises(ValueError, match="HalfCheetah-v5.*Hopper-v5"):
        restore(hopper, state)

    wrapped = gym.wrappers.NormalizeObservation(gym.make("HalfCheetah-v5"))
    wrapped.reset(seed=0)
    with pytest.raises(ValueError, match="wrapper chain"):
        restore(wrapped, state)

    vec = gym.make_vec("HalfCheetah-v5", num_envs=2, vectorization_mode="sync")
    with pytest.raises(ValueError):
        restore(vec, state)
    with pytest.raises(ValueError, match="not a snapshot"):
        restore(cheetah, {"qpos": np.zeros(9)})


@needs_mujoco
def test_state_is_plain_and_does_not_alias_the_env() -> None:
    env = _normalized_cheetah()
    _warm_up(env, 5)
    state = snapshot(env)
    blob = pickle.dumps(state)
    physics = state["mujoco"]["physics"].copy()
    assert isinstance(state["mujoco"]["physics"], np.ndarray)
    _play(env, _actions(env.action_space, 10, seed=1))
    assert np.array_equal(state["mujoco"]["physics"], physics)  # stepping does not mutate the state
    restore(env, state)
    _play(env, _actions(env.action_space, 10, seed=1))
    assert pickle.dumps(state) == blob  # neither does restoring and stepping again


def test_frozen_normalizers_reaches_vector_and_sub_env_wrappers() -> None:
    env = gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync", wrappers=[gym.wrappers.NormalizeReward])
    env = gym.wrappers.vector.NormalizeObservation(env)
    with frozen_normalizers(env) as frozen:
        assert [type(w).__name__ for w in frozen] == ["NormalizeObservation", "NormalizeReward", "NormalizeReward"]
        assert not any(w.update_running_mean for w in frozen)
    assert all(w.update_running_mean for w in frozen)
