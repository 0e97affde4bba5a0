"""Making environments, and a pool of them that steps only the live ones."""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from rebel.control.policy import check_spaces
from rebel.control.snapshots import reseed, restore, snapshot

EnvSource = str | Callable[[], gym.Env]
CONTROL_EXTRA = ("mujoco", "pygame")  # what pip install 'rebel-rl[control]' brings besides gymnasium


def make_env(env: EnvSource, **kwargs: Any) -> gym.Env:
    """``gymnasium.make(env, **kwargs)`` for an id (a clear error naming close ids when it is
    unknown), or ``env()`` for a factory; checks the spaces are supported. A missing package
    is a one-line ValueError saying what to install."""
    route_mujoco_warnings()
    if not isinstance(env, str) and not callable(env):
        raise TypeError(f"env must be a gymnasium id or a function returning an env, got {type(env).__name__}")
    try:
        made = gym.make(env, **kwargs) if isinstance(env, str) else env()
    except (gym.error.Error, ImportError) as error:
        missing = missing_package(error)
        if missing is not None:
            raise ValueError(f"cannot make environment {env_name(env)!r}: {missing}") from error
        if not isinstance(env, str) or isinstance(error, ImportError):
            raise
        close = difflib.get_close_matches(env, list(gym.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"cannot make environment {env!r}: {error}{hint}") from error
    if isinstance(env, str):
        name = env
    else:
        name = made.spec.id if made.spec is not None else type(made.unwrapped).__name__
    check_observation_space(made.observation_space, name)
    if isinstance(made.observation_space, FLATTENED_OBSERVATIONS):
        made = gym.wrappers.FlattenObservation(made)
    check_spaces(made.observation_space, made.action_space, name)
    return made


#: Observation spaces :func:`make_env` flattens into a ``Box`` (gymnasium's ``FlattenObservation``):
#: a Dict's entries in its key order, Discrete / MultiDiscrete parts one-hot, MultiBinary as 0/1.
FLATTENED_OBSERVATIONS = (gym.spaces.Dict, gym.spaces.Tuple, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
OBSERVATION_LEAVES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


def check_observation_space(space: gym.Space, env_name: str, whole: gym.Space | None = None) -> None:
    """A one-line ValueError naming the space for an observation space rebel.control cannot
    flatten (Graph, Sequence, Text, OneOf, ..., alone or inside a Dict / Tuple)."""
    whole = space if whole is None else whole
    if isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):
        for part in space.spaces.values() if isinstance(space, gym.spaces.Dict) else space.spaces:
            check_observation_space(part, env_name, whole)
    elif not isinstance(space, OBSERVATION_LEAVES):
        inside = "" if space is whole else f" (inside {whole})"
        raise ValueError(  # noqa: TRY004 (a bad setting, as the other space errors)
            f"{env_name} has a {type(space).__name__} observation space {space}{inside}; rebel.control supports Box, Discrete, "
            "MultiDiscrete and MultiBinary observations and Dict / Tuple spaces of them"
        )


def missing_package(error: BaseException) -> str | None:
    """``PACKAGE is not installed; install it with pip install '...'`` when ``error`` (or an
    error it was raised from) is gymnasium's DependencyNotInstalled or a failed import; None
    otherwise. MuJoCo and pygame come with rebel-rl's control extra; others with the
    gymnasium extra the error names."""
    while error is not None and not isinstance(error, (gym.error.DependencyNotInstalled, ModuleNotFoundError)):
        error = error.__cause__  # type: ignore[assignment]
    if error is None:
        return None
    package = error.name if isinstance(error, ModuleNotFoundError) else str(error).split()[0]
    extra = re.search(r"gymnasium\[([\w-]+)\]", str(error))
    if str(package).split(".")[0].lower() in CONTROL_EXTRA:
        install = "pip install 'rebel-rl[control]'"
    elif extra is not None:
        install = f"pip install 'gymnasium[{extra.group(1)}]'"
    else:
        install = f"pip install the package that provides {package}"
    return f"{package} is not installed; install it with {install}"


def route_mujoco_warnings() -> None:
    """Send MuJoCo's C-level warnings to Python's ``warnings`` (so each is shown once, not at
    every model load: MuJoCo 3.3+ warns about ``settotalmass`` in gymnasium's HalfCheetah and
    Ant models). A handler the user installed is left in place."""
    try:
        import mujoco
    except ImportError:
        return
    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_mujoco_warning)


def _mujoco_warning(message: str) -> None:
    warnings.warn(f"MuJoCo: {message.strip()}", RuntimeWarning, stacklevel=2)


def env_name(env: EnvSource) -> str:
    if isinstance(env, str):
        return env
    return getattr(env, "__name__", type(env).__name__)


VEC_ENVS = ("sync", "async")


class SnapshotAccess(gym.Wrapper):
    """Snapshot and restore of the env it wraps, callable from the process that owns a gymnasium
    ``AsyncVectorEnv`` of such envs: ``call("take_snapshot")`` answers each worker's
    :func:`~rebel.control.snapshots.snapshot`; ``set_attr("incoming", states)`` then
    ``call("put_snapshot")`` restores them. What is captured is the env under this wrapper, the
    same states ``snapshot`` takes of a ``SyncVectorEnv``'s sub-envs."""

    incoming: Any = None

    def take_snapshot(self) -> dict[str, Any]:
        return snapshot(self.env)

    def put_snapshot(self) -> None:
        restore(self.env, self.incoming)
        self.incoming = None


def remote_env(env: EnvSource, kwargs: dict[str, Any]) -> gym.Env:
    """:func:`make_env` inside :class:`SnapshotAccess`, for an ``AsyncVectorEnv`` worker."""
    return SnapshotAccess(make_env(env, **kwargs))


class EnvPool:
    """``n`` copies of one environment stepped together, only those still running.

    Unlike ``gymnasium.vector`` it never resets behind the caller's back: the samplers
    decide when a copy restarts (from a seed or a snapshot) and step copies whose
    episodes have ended no further, so that no environment step is wasted.

    ``workers=0`` keeps the copies in this process; ``workers=k`` divides them into ``k``
    contiguous shards, each held by a worker process of a gymnasium ``AsyncVectorEnv``
    (:class:`_Shard`), which steps, resets, snapshots and restores its copies there. Every
    copy goes through the same calls either way, so the results are the same bit for bit.
    """

    def __init__(self, env: EnvSource, n: int, workers: int = 0, **kwargs: Any) -> None:
        probe = make_env(env, **kwargs)
        self.observation_space, self.action_space, self.spec = probe.observation_space, probe.action_space, probe.spec
        self.name = probe.spec.id if probe.spec is not None else type(probe.unwrapped).__name__
        self.size = n
        self.obs = np.zeros((n, *self.observation_space.shape), dtype=self.observation_space.dtype)
        self.steps = 0  # environment steps taken, all copies together
        self.vector: gym.vector.AsyncVectorEnv | None = None
        if workers:
            probe.close()
            self.envs: list[gym.Env] = []
            self.shards = [list(part) for part in np.array_split(np.arange(n), min(workers, n))]
            factories = [
                functools.partial(_Shard, env, len(part), kwargs, self.observation_space, self.action_space) for part in self.shards
            ]
            self.vector = gym.vector.AsyncVectorEnv(factories, shared_memory=False, copy=False)
            self.vector.call("make_copies")  # each worker makes its copies now, as the in-process pool does
            self.where = {int(i): (w, j) for w, part in enumerate(self.shards) for j, i in enumerate(part)}  # copy -> (worker, local)
        else:
            self.envs = [probe, *(make_env(env, **kwargs) for _ in range(n - 1))]

    def __len__(self) -> int:
        return self.size

    def _run(self, method: str, index: Sequence[int], *columns: Sequence[Any]) -> list[Any]:
        """``method`` of each copy in ``index`` with its entries of ``columns``: in this process,
        or each worker's share in its process (all workers at once); results in ``index``'s order."""
        if self.vector is None:
            return [OPERATIONS[method](self.envs[i], *row) for i, *row in zip(index, *columns)]
        # each worker gets the local copies and the arguments of its share, column by column
        where = [self.where[int(i)] for i in index]
        positions = [[k for k, (w, _) in enumerate(where) if w == worker] for worker in range(len(self.shards))]
        self.vector.set_attr(
            "inbox", [([where[k][1] for k in ks], *(_take(column, ks) for column in columns)) for ks in positions]
        )  # fmt: skip
        results: list[Any] = [None] * len(index)
        for ks, answers in zip(positions, self.vector.call("run", method)):
            for k, answer in zip(ks, answers if method not in COLUMNS else zip(*answers)):
                results[k] = answer
        return results

    def reset(self, index: Sequence[int], seeds: Sequence[int | None]) -> None:
        for i, obs in zip(index, self._run("reset", index, seeds)):
            self.obs[i] = obs

    def step(self, index: Sequence[int], actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step copies ``index`` with ``actions``; returns their rewards, terminated, truncated."""
        rewards = np.zeros(len(index))
        terminated = np.zeros(len(index), dtype=bool)
        truncated = np.zeros(len(index), dtype=bool)
        for k, (i, result) in enumerate(zip(index, self._run("step", index, actions))):
            self.obs[i], rewards[k], terminated[k], truncated[k] = result
        self.steps += len(index)
        return rewards, terminated, truncated

    def snapshots(self, index: Sequence[int]) -> list[tuple[dict[str, Any], np.ndarray]]:
        """Copies ``index``'s exact states and current observations (see :meth:`snapshot`)."""
        return [(state, self.obs[i].copy()) for i, state in zip(index, self._run("snapshot", index))]

    def snapshot(self, i: int) -> tuple[dict[str, Any], np.ndarray]:
        """Copy ``i``'s exact state and its current observation."""
        return self.snapshots([i])[0]

    def restore_many(
        self, index: Sequence[int], states: Sequence[tuple[dict[str, Any], np.ndarray]], seeds: Sequence[int | None] | None = None
    ) -> None:
        """:meth:`restore` copy ``index[k]`` to ``states[k]`` (then reseed it from ``seeds[k]``)."""
        seeds = [None] * len(index) if seeds is None else seeds
        self._run("restore", index, [state for state, _ in states], seeds)
        for i, (_, obs) in zip(index, states):
            self.obs[i] = obs

    def restore(self, i: int, state: tuple[dict[str, Any], np.ndarray], seed: int | None = None) -> None:
        """Put copy ``i`` in a state from :meth:`snapshot` (of any copy); with ``seed``, then
        restart its random generator from it (:func:`~rebel.control.snapshots.reseed`)."""
        self.restore_many([i], [state], [seed])

    def close(self) -> None:
        if self.vector is not None:
            self.vector.close()
        for env in self.envs:
            env.close()


def _reset(env: gym.Env, seed: int | None) -> np.ndarray:
    return env.reset(seed=seed)[0]


def _step(env: gym.Env, action: Any) -> tuple[np.ndarray, float, bool, bool]:
    obs, reward, terminated, truncated, _ = env.step(action)
    return obs, float(reward), bool(terminated), bool(truncated)


def _restore(env: gym.Env, state: dict[str, Any], seed: int | None) -> None:
    restore(env, state)
    if seed is not None:
        reseed(env, seed)


def _take(column: Sequence[Any], positions: list[int]) -> Any:
    """The entries of ``column`` at ``positions``: an array's rows as one array, else a list."""
    return column[positions] if isinstance(column, np.ndarray) else [column[k] for k in positions]


#: What :class:`EnvPool` does to one copy, by name (in this process or in a :class:`_Shard`).
OPERATIONS: dict[str, Callable[..., Any]] = {"reset": _reset, "step": _step, "snapshot": snapshot, "restore": _restore}
#: Operations whose answers a worker sends as stacked columns.
COLUMNS = ("step",)


def _end_with_parent() -> None:
    """Have the kernel kill this worker process when the process that started it dies, even
    by SIGKILL (Linux's ``PR_SET_PDEATHSIG``; elsewhere the worker ends when its pipe breaks)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call took effect
        os._exit(1)


class _Shard(gym.Env):
    """A worker's share of an :class:`EnvPool`: ``n`` copies, made in the worker by
    :meth:`make_copies` (not in the process that builds the ``AsyncVectorEnv`` and makes one
    ``_Shard`` there to read the spaces). The pool puts ``(local copies, *argument columns)`` in :attr:`inbox`
    (``AsyncVectorEnv.set_attr``), then has every worker :meth:`run` an operation
    (``AsyncVectorEnv.call``), which answers for each copy in order."""

    inbox: tuple[Any, ...] = ()  # (local copies, *argument columns), set through AsyncVectorEnv.set_attr

    def __init__(self, env: EnvSource, n: int, kwargs: dict[str, Any], observation_space: gym.Space, action_space: gym.Space) -> None:
        self.source, self.n, self.kwargs = env, n, kwargs
        self.observation_space, self.action_space = observation_space, action_space
        self.copies: list[gym.Env] = []

    def make_copies(self) -> None:
        _end_with_parent()
        self.copies = [make_env(self.source, **self.kwargs) for _ in range(self.n)]

    def run(self, operation: str) -> Any:
        local, *columns = self.inbox
        answers = [OPERATIONS[operation](self.copies[j], *row) for j, *row in zip(local, *columns)]
        if operation in COLUMNS and answers:  # arrays, not one small object per copy, through the pipe
            return tuple(np.stack(column) for column in zip(*answers))
        return answers

    def close(self) -> None:
        for env in self.copies:
            env.close()
