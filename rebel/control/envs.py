"""Making environments, and a pool of them that steps only the live ones."""

from __future__ import annotations

import difflib
import re
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
    check_spaces(made.observation_space, made.action_space, name)
    return made


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


class EnvPool:
    """``n`` copies of one environment stepped together, only those still running.

    Unlike ``gymnasium.vector`` it never resets behind the caller's back: the samplers
    decide when a copy restarts (from a seed or a snapshot) and step copies whose
    episodes have ended no further, so that no environment step is wasted.
    """

    def __init__(self, env: EnvSource, n: int, **kwargs: Any) -> None:
        self.envs = [make_env(env, **kwargs) for _ in range(n)]
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space
        self.obs = np.zeros((n, *self.observation_space.shape), dtype=self.observation_space.dtype)
        self.steps = 0  # environment steps taken, all copies together

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, index: Sequence[int], seeds: Sequence[int | None]) -> None:
        for i, seed in zip(index, seeds):
            self.obs[i], _ = self.envs[i].reset(seed=seed)

    def step(self, index: Sequence[int], actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step copies ``index`` with ``actions``; returns their rewards, terminated, truncated."""
        rewards = np.zeros(len(index))
        terminated = np.zeros(len(index), dtype=bool)
        truncated = np.zeros(len(index), dtype=bool)
        for k, (i, action) in enumerate(zip(index, actions)):
            self.obs[i], rewards[k], terminated[k], truncated[k], _ = self.envs[i].step(action)
        self.steps += len(index)
        return rewards, terminated, truncated

    def snapshot(self, i: int) -> tuple[dict[str, Any], np.ndarray]:
        """Copy ``i``'s exact state and its current observation."""
        return snapshot(self.envs[i]), self.obs[i].copy()

    def restore(self, i: int, state: tuple[dict[str, Any], np.ndarray], seed: int | None = None) -> None:
        """Put copy ``i`` in a state from :meth:`snapshot` (of any copy); with ``seed``, then
        restart its random generator from it (:func:`~rebel.control.snapshots.reseed`)."""
        env_state, obs = state
        restore(self.envs[i], env_state)
        if seed is not None:
            reseed(self.envs[i], seed)
        self.obs[i] = obs

    def close(self) -> None:
        for env in self.envs:
            env.close()
